"""Server centralization time (the real `cl_fed.centralize.centralize`) against the machine's floors.

For every model, merge mode and number of clients, merges random client adapters into the model's
base and prints the best of --repeats wall times next to two floors measured in the same run:

- memory floor: one float32 read pass (a sum) over as many bytes as the merge must read (every
  client's LoRA factors plus the base weights they update) and one write pass over the merged weights;
- compute floor: the float64 matmuls the mode cannot avoid, timed at their real shapes. `product`
  (the exact mean of B_i A_i) is one (out x clients*rank) @ (clients*rank x in) product per adapted
  weight, so its FLOPs grow with clients x rank; `factors` multiplies one averaged rank-r pair.

The ratio is to the larger floor (the bound). Targets: within 3x of the floor, linear in clients.
On a shared machine, `--threads 1 --clock cpu` (process CPU time, which leaves out the time other
jobs hold the core) is steadier than wall time; both clocks time the floors the same way.
Models: the embedded tiny model with its real LoRA targets, and Whisper shapes built locally from a
WhisperConfig (random weights, the project's Whisper LoRA: r=32 on q_proj/v_proj); nothing downloads.
Prints figures only; no pass/fail.

    python -m benchmarks.centralize_speed [--models tiny,whisper-base,whisper-small]
        [--clients 2,5,10,20,50,100] [--modes product,factors] [--repeats 3] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass

import torch

from benchmarks.models import MODELS, build, name_list
from cl_fed.adapters import adapter_state, attach_lora, base_state
from cl_fed.centralize import MERGE_MODES, base_key, centralize, example_weights, lora_pairs, state_bytes

TARGET_RATIO = 3.0
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Subject:
    """A base state and the shapes of one client's adapter on it."""

    name: str
    base: dict[str, torch.Tensor]
    adapter_shapes: dict[str, torch.Size]
    scale: float
    rank: int


def build_subject(name: str) -> Subject:
    """The base and adapter shapes through the project's own LoRA path (attach_lora, adapter_state)."""
    display, model, spec = build(name)
    peft_model = attach_lora(model, spec, seed=0)
    shapes = {key: tensor.shape for key, tensor in adapter_state(peft_model).items()}
    return Subject(display, base_state(peft_model), shapes, spec.scale, spec.rank)


def random_adapters(subject: Subject, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {key: 0.01 * torch.randn(shape, generator=generator) for key, shape in subject.adapter_shapes.items()}
        for _ in range(count)
    ]


def best_of(repeats: int, work, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        work()
        times.append(clock() - start)
    return min(times)


def weight_shapes(subject: Subject) -> Counter:
    """How many adapted weights of each (out, in) shape the model has."""
    pairs = lora_pairs(subject.adapter_shapes)
    return Counter(tuple(subject.base[base_key(path)].shape) for path in pairs)


def compute_floor(shapes: Counter, inner: int, repeats: int, clock) -> float:
    """Seconds for one float64 (out x inner) @ (inner x in) matmul per adapted weight."""
    total = 0.0
    for (rows, cols), count in shapes.items():
        left = torch.randn(rows, inner, dtype=torch.float64)
        right = torch.randn(inner, cols, dtype=torch.float64)
        total += count * best_of(repeats, lambda left=left, right=right: torch.mm(left, right), clock)
    return total


def memory_floor(buffer: torch.Tensor, read_bytes: int, write_bytes: int, repeats: int, clock) -> float:
    """Seconds to read `read_bytes` once (a float32 sum, the cheapest full pass) and write `write_bytes`."""
    inputs, outputs = buffer[: read_bytes // 4], buffer[: write_bytes // 4]
    return best_of(repeats, lambda: inputs.sum(), clock) + best_of(repeats, lambda: outputs.fill_(1.0), clock)


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def bench_subject(subject: Subject, clients: list[int], modes: list[str], repeats: int, clock) -> list[dict]:
    adapters = random_adapters(subject, max(clients))
    shapes = weight_shapes(subject)
    adapter_bytes = state_bytes(adapters[0])
    touched = {base_key(path): subject.base[base_key(path)] for path in lora_pairs(subject.adapter_shapes)}
    touched_bytes = state_bytes(touched)
    print(
        f"# {subject.name}: {len(touched)} adapted weights ({touched_bytes / 2**20:.1f} MiB), LoRA rank "
        f"{subject.rank}, {adapter_bytes / 2**20:.2f} MiB of factors per client",
        flush=True,
    )
    buffer = torch.ones((adapter_bytes * max(clients) + touched_bytes) // 4)  # the floors' bytes
    rows = []
    for mode in modes:
        for count in clients:
            chosen = adapters[:count]
            weights = example_weights([100 + 7 * i for i in range(count)])
            seconds = best_of(
                repeats,
                lambda chosen=chosen, weights=weights, mode=mode: centralize(
                    subject.base, chosen, weights, subject.scale, mode
                ),
                clock,
            )
            memory = memory_floor(
                buffer, adapter_bytes * count + touched_bytes, touched_bytes, repeats, clock
            )
            inner = subject.rank * count if mode == "product" else subject.rank
            compute = compute_floor(shapes, inner, repeats, clock)
            floor = max(memory, compute)
            row = dict(
                model=subject.name,
                mode=mode,
                clients=count,
                seconds=seconds,
                memory_floor=memory,
                compute_floor=compute,
                ratio=seconds / floor,
                bound="compute" if compute > memory else "memory",
                per_client=seconds / count,
            )
            print_row(row)
            rows.append(row)
    del buffer
    return rows


HEADER = (
    f"{'model':<24} {'mode':<8} {'clients':>7} {'seconds':>9} {'mem floor':>9} {'cmp floor':>9} "
    f"{'ratio':>7} {'bound':<7} {'s/client':>9}"
)


def print_row(row: dict) -> None:
    print(
        f"{row['model']:<24} {row['mode']:<8} {row['clients']:>7} {row['seconds']:>9.4f} "
        f"{row['memory_floor']:>9.4f} {row['compute_floor']:>9.4f} {row['ratio']:>7.2f} {row['bound']:<7} "
        f"{row['per_client']:>9.5f}",
        flush=True,
    )


def print_summary(rows: list[dict]) -> None:
    """Per model and mode: rows within the target ratio, and how time grows with clients."""
    print("\nsummary (targets: within 3x of the floor, linear in clients)")
    for key in dict.fromkeys((r["model"], r["mode"]) for r in rows):
        group = [r for r in rows if (r["model"], r["mode"]) == key]
        within = [r["clients"] for r in group if r["ratio"] <= TARGET_RATIO]
        xs, ys = [r["clients"] for r in group], [r["seconds"] for r in group]
        intercept, slope = fit_line(xs, ys)
        worst = max(abs(y - (intercept + slope * x)) / y for x, y in zip(xs, ys))
        growth = ys[-1] / ys[0]
        print(
            f"{key[0]:<24} {key[1]:<8} within 3x at {len(within)}/{len(group)} client counts {within}; "
            f"fit {intercept:.4f} s + {slope:.5f} s/client (worst residual {100 * worst:.0f}%); "
            f"{xs[-1] / xs[0]:.0f}x clients -> {growth:.1f}x time"
        )


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--clients {text!r}: every count must be >= 1")
    return sorted(values)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=name_list(MODELS, "--models"), default=list(MODELS))
    parser.add_argument("--clients", type=int_list, default=[2, 5, 10, 20, 50, 100])
    parser.add_argument("--modes", type=name_list(MERGE_MODES, "--modes"), default=list(MERGE_MODES))
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (all threads' together: use with --threads 1)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"centralize(): best of {args.repeats}, {torch.get_num_threads()} torch threads, {args.clock} clock; "
        "floors measured in the same run; seconds per merge"
    )
    print(HEADER)
    rows = []
    for name in args.models:
        subject = build_subject(name)
        rows += bench_subject(subject, args.clients, args.modes, args.repeats, CLOCKS[args.clock])
        del subject
    print_summary(rows)
    return rows


if __name__ == "__main__":
    main()
