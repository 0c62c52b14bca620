"""Centralization: merge averaged LoRA adapters into the base weights (pure tensor math, no peft).

Naming (defined here, re-exported by cl_fed.adapters): an adapter state holds ``x.lora_A``
(rank x in) and ``x.lora_B`` (out x rank); the base weight they update is ``x.weight`` (out x in).

For adapters (A_i, B_i) with weights p_i (summing to 1) and LoRA scale s = alpha / rank:
- ``product`` (exact mean update, as the paper's code does): W <- W + s * sum_i p_i B_i A_i
- ``factors`` (factor averaging, FedIT-style): W <- W + s * (sum_i p_i B_i)(sum_i p_i A_i)
The two agree when all A_i (or all B_i) are equal; otherwise they differ by a cross-client
covariance term.
Deltas are computed in float64 and cast back to the base dtype once.
"""

from __future__ import annotations

import math

import torch

MERGE_MODES = ("product", "factors")


def base_key(module_path: str) -> str:
    """Name of the base weight that the adapter on `module_path` updates."""
    return f"{module_path}.weight"


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group an adapter state into {module path: (A, B)}, sorted by path; every A needs its B."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        path, dot, factor = key.rpartition(".")
        if not dot or factor not in ("lora_A", "lora_B"):
            raise ValueError(f"adapter key {key!r} does not end in '.lora_A' or '.lora_B'")
        halves.setdefault(path, {})[factor] = tensor
    pairs = {}
    for path in sorted(halves):
        found = halves[path]
        if set(found) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in found else "lora_A"
            raise ValueError(f"adapter for module {path!r} has no {path}.{missing}")
        pairs[path] = (found["lora_A"], found["lora_B"])
    return pairs


class AdapterRejected(ValueError):
    """A client's adapter failed the server's checks; the message says which key and why."""


def example_weights(num_examples: list[int], uniform: bool = False) -> list[float]:
    """Averaging weights p_i = n_i / sum n (or 1/N when uniform); they sum to 1."""
    if not num_examples:
        raise ValueError("example_weights: no clients given (empty list)")
    for index, count in enumerate(num_examples):
        is_number = isinstance(count, (int, float)) and not isinstance(count, bool)
        if not is_number or not math.isfinite(count) or count < 0:
            raise ValueError(f"example_weights: num_examples[{index}] = {count!r} is not a count >= 0")
    total = float(sum(num_examples))
    if total == 0:
        raise ValueError(f"example_weights: all {len(num_examples)} clients report 0 examples")
    if uniform:
        return [1.0 / len(num_examples)] * len(num_examples)
    return [count / total for count in num_examples]


def _check_weights(weights: list[float], count: int, what: str) -> None:
    if len(weights) != count:
        raise ValueError(f"{what}: {len(weights)} weights for {count} adapters")
    if count == 0:
        raise ValueError(f"{what}: no adapters given")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{what}: weights[{index}] = {weight!r} is not a finite number >= 0")
    # Unnormalised weights would silently scale the merge; use example_weights() or pass `scale`.
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"{what}: weights sum to {sum(weights)!r}, expected 1 (example_weights)")


def _check_factors(As: list[torch.Tensor], Bs: list[torch.Tensor], what: str) -> None:
    if len(As) != len(Bs):
        raise ValueError(f"{what}: {len(As)} A factors but {len(Bs)} B factors")
    for index, (a, b) in enumerate(zip(As, Bs)):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{what}: adapter {index} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                "expected A (rank x in) and B (out x rank)"
            )
        if a.shape[1] != As[0].shape[1] or b.shape[0] != Bs[0].shape[0]:
            raise ValueError(
                f"{what}: adapter {index} updates a {b.shape[0]}x{a.shape[1]} weight, "
                f"adapter 0 a {Bs[0].shape[0]}x{As[0].shape[1]} one"
            )


def product_delta(
    As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float], scale: float
) -> torch.Tensor:
    """Exact mean update scale * sum_i p_i B_i A_i (float64; ranks may differ between adapters).

    Server and sites must compute the very same bits (sites check the merged base's checksum),
    whatever their thread counts: so one plain matmul per client, summed in client order, in a
    reused buffer (the same operations as `delta += p * (B @ A)` without its temporaries). Neither
    one matmul over the concatenated factors nor `addmm_` keeps the bits fixed across thread
    counts with MKL (measured; see benchmarks/centralize_speed.py for the timings).
    """
    _check_factors(As, Bs, "product_delta")
    _check_weights(weights, len(As), "product_delta")
    delta = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float64, device=As[0].device)
    product = torch.empty_like(delta)
    for weight, a, b in zip(weights, As, Bs):
        torch.mm(b.to(delta), a.to(delta), out=product)
        delta.add_(product.mul_(weight))
    return delta.mul_(scale)


def factors_delta(
    As: list[torch.Tensor], Bs: list[torch.Tensor], weights: list[float], scale: float
) -> torch.Tensor:
    """Factor-averaged update scale * (sum_i p_i B_i)(sum_i p_i A_i) (float64; equal ranks)."""
    _check_factors(As, Bs, "factors_delta")
    _check_weights(weights, len(As), "factors_delta")
    for index, a in enumerate(As):
        if a.shape != As[0].shape:
            raise ValueError(
                f"factors_delta: adapter {index} has rank {a.shape[0]}, adapter 0 rank {As[0].shape[0]}"
            )
    mean_a = sum(w * a.to(torch.float64) for w, a in zip(weights, As))
    mean_b = sum(w * b.to(torch.float64) for w, b in zip(weights, Bs))
    return torch.mm(mean_b, mean_a).mul_(scale)


def centralize(
    base: dict[str, torch.Tensor],
    adapters: list[dict[str, torch.Tensor]],
    weights: list[float],
    scale: float,
    mode: str = "product",
) -> dict[str, torch.Tensor]:
    """New base state with W <- W + delta for every LoRA module; inputs are not modified.

    Weights of modules without LoRA are shared with `base`, not copied.
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"unknown merge mode {mode!r}; choose one of {MERGE_MODES}")
    _check_weights(weights, len(adapters), "centralize")
    pairs = [lora_pairs(adapter) for adapter in adapters]
    for index, adapter_pairs in enumerate(pairs[1:], start=1):
        if adapter_pairs.keys() != pairs[0].keys():
            differ = sorted(adapter_pairs.keys() ^ pairs[0].keys())
            raise ValueError(f"centralize: adapter {index} covers other modules than adapter 0: {differ[:5]}")
    delta_of = product_delta if mode == "product" else factors_delta
    merged = dict(base)
    for path in pairs[0]:
        key = base_key(path)
        if key not in base:
            raise ValueError(f"centralize: base state has no {key!r} for the adapter on {path!r}")
        weight = base[key]
        As = [adapter_pairs[path][0].to(weight.device) for adapter_pairs in pairs]
        Bs = [adapter_pairs[path][1].to(weight.device) for adapter_pairs in pairs]
        delta = delta_of(As, Bs, weights, scale)
        if delta.shape != weight.shape:
            raise ValueError(
                f"centralize: update for {key!r} is {tuple(delta.shape)}, weight is {tuple(weight.shape)}"
            )
        merged[key] = delta.add_(weight).to(weight.dtype)  # in float64, rounded to the base dtype once
    return merged


def average_adapters(
    adapters: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """Factor-wise weighted average (FedAvg of LoRA factors) between merges; fp32, keys sorted."""
    _check_weights(weights, len(adapters), "average_adapters")
    keys = sorted(adapters[0])
    for index, adapter in enumerate(adapters[1:], start=1):
        if set(adapter) != set(keys):
            differ = sorted(set(adapter) ^ set(keys))
            raise ValueError(f"average_adapters: adapter {index} has other keys than adapter 0: {differ[:5]}")
        for key in keys:
            got, first = tuple(adapter[key].shape), tuple(adapters[0][key].shape)
            if got != first:
                raise ValueError(
                    f"average_adapters: adapter {index} {key!r} has shape {got}, adapter 0 {first}"
                )
    average = {}
    for key in keys:
        total = sum(w * adapter[key].to(torch.float64) for w, adapter in zip(weights, adapters))
        average[key] = total.to(torch.float32)
    return average


def validate_adapter(
    state: dict[str, torch.Tensor],
    reference: dict[str, torch.Size | torch.Tensor],
    max_norm: float | None = None,
) -> None:
    """Raise AdapterRejected on missing/extra keys, wrong shapes, non-float tensors, NaN/Inf, or a
    Frobenius norm above `max_norm` for any factor or for the whole update (all factors together).
    `reference` maps each expected key to its shape (or to a tensor of that shape)."""
    missing = sorted(set(reference) - set(state))
    if missing:
        raise AdapterRejected(f"adapter is missing {len(missing)} keys, e.g. {missing[:3]}")
    extra = sorted(set(state) - set(reference))
    if extra:
        raise AdapterRejected(f"adapter has {len(extra)} unexpected keys, e.g. {extra[:3]}")
    total_squares = 0.0
    for key in sorted(reference):
        tensor = state[key]
        want = reference[key]
        expected = tuple(want.shape if isinstance(want, torch.Tensor) else want)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise AdapterRejected(f"adapter {key!r} is not a floating-point tensor ({kind})")
        if tuple(tensor.shape) != expected:
            raise AdapterRejected(f"adapter {key!r} has shape {tuple(tensor.shape)}, expected {expected}")
        if not torch.isfinite(tensor).all():
            raise AdapterRejected(f"adapter {key!r} contains NaN or Inf")
        norm = float(torch.linalg.vector_norm(tensor.to(torch.float64)))
        if max_norm is not None and norm > max_norm:
            raise AdapterRejected(f"adapter {key!r} has Frobenius norm {norm:.6g} > bound {max_norm:.6g}")
        total_squares += norm**2
    total = math.sqrt(total_squares)
    if max_norm is not None and total > max_norm:
        raise AdapterRejected(f"adapter update has total Frobenius norm {total:.6g} > bound {max_norm:.6g}")


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Payload size of a tensor dict in bytes (for communication accounting)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in state.values())
