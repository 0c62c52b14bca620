"""Bytes per client per round: full weights (fedavg) vs LoRA factors (centralization).

Counted the way the Flower apps count them: the server's `bytes_down` is the size of every
ArrayRecord of a train message (server/strategies.py configure_train: the records of
WeightsSync.records plus the adapter a round continues from), `bytes_up` the size of a reply's
arrays, both with cl_fed.centralize.state_bytes. The server's state moves as the ServerApp moves it
(cl_fed.state.ContinualState: apply the plan's aggregate, then merge), and a site that holds the
previous version gets the operations the server applied since (cl_fed/updates.py, what
ContinualState.log records and the ServerApp hands WeightsSync.update):

- fedavg: up = every weight and buffer, in its own dtype (cl_fed.continual.train_round); down =
  the averaged model as "set" tensors: every weight and buffer (the frozen ones too);
- centralization: up = the LoRA factors; down, in a later round of a stage, the averaged adapter
  plus the exact aggregate's residual as a low-rank factorisation (merge=product: rank up to
  (sites + 1) x r per adapted layer, the sites' spans and the float32 rounding of the mean factors;
  with merge=factors, or a single site, the residual is zero and only the adapter goes down); in
  the round after a merge, the last round's residual factors plus the merged adapter's s * B_bar
  and A_bar (the round starts a fresh adapter, drawn from its seed: no adapter is sent). A site
  that joins or missed a version gets every tensor instead, as a new fedavg site does.
The sites' adapters here are independent random draws. Sites whose factors differ by only ~0.1%
(one more line of the table) show where the residual's low-rank form is lost: its float64
rounding noise, of the size of the products that cancel, reads as rank and it goes dense.
Whisper ties its output projection to the token embedding: the state dict, and so the apps'
records, carry that matrix twice, and the full-weight figures here do too.

Targets: LoRA >= 20x smaller for the default model, >= 50x for Whisper-small with r=32 on q/v.
Prints figures only; no pass/fail.

    python -m benchmarks.bytes_per_round [--models tiny,whisper-small] [--sites N]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from flwr.app import ArrayRecord

from benchmarks.models import MODELS, build, name_list
from cl_fed import protocol as P
from cl_fed import updates
from cl_fed.adapters import adapter_shapes, attach_lora
from cl_fed.aggregation import aggregate
from cl_fed.centralize import example_weights, state_bytes
from cl_fed.config import RunConfig, make_config
from cl_fed.data.scenario import load_scenario
from cl_fed.plan import Train, continual_plan, rule_for
from cl_fed.state import ContinualState
from server.strategies import ContinualStrategy, WeightsSync, build_strategy

TARGETS = {"tiny": 20.0, "whisper-small": 50.0}
NODE = 1  # the site measured
CLOSE = 1e-3  # relative spread of the "close sites'" factors around one adapter


def bound(cfg: RunConfig, weights: dict, shapes: dict, scale: float) -> ContinualStrategy:
    """The run's strategy, bound as the ServerApp binds it."""
    strategy = build_strategy(cfg)
    strategy.bind(cfg, shapes, scale, rule_for(cfg), WeightsSync(weights))
    return strategy


def sent_bytes(strategy: ContinualStrategy, step: Train, adapter: dict | None) -> int:
    """What configure_train sends NODE for `step`: its sync records, plus the adapter a round
    that continues starts from (DP, which always sends it, aside)."""
    _, records = strategy.sync_records(NODE)
    if strategy.lora and step.start == "continue":
        records[P.ADAPTER] = ArrayRecord(adapter)
    return sum(state_bytes(record.to_torch_state_dict()) for record in records.values())


def reply_bytes(arrays: dict[str, torch.Tensor]) -> int:
    """What the server counts for a reply: its arrays, after Flower's ArrayRecord round trip."""
    return state_bytes(ArrayRecord(arrays).to_torch_state_dict())


def trained_factors(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """A site's trained adapter: A and B both non-zero (sizes count, values only make the sites differ)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: 0.01 * torch.randn(tuple(shape), generator=generator) for k, shape in sorted(shapes.items())}


def close_factors(adapter: dict[str, torch.Tensor], sites: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`sites` adapters within a relative CLOSE of `adapter` (sites that continued from one adapter)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {k: v * (1 + CLOSE * torch.randn(v.shape, generator=generator)) for k, v in adapter.items()}
        for _ in range(sites)
    ]


def moved(sync: WeightsSync, state: ContinualState) -> list[dict[str, tuple]]:
    """NODE trained on the current version (its reply says so), then the server moved on: the
    ServerApp hands WeightsSync the operations applied since (state.log) and clears them."""
    steps = list(state.log)
    sync.nodes[NODE] = sync.checksum
    sync.update(state.weights, state.log)
    state.log.clear()
    return steps


def lowrank_ranks(steps: list[dict[str, tuple]]) -> list[int]:
    return [op[1].shape[1] for ops in steps for op in ops.values() if op[0] == "lowrank"]


def measure(name: str, sites: int, stages: int) -> dict:
    cfg = make_config({})
    display, model, spec = build(name)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    full_reply = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = attach_lora(model, spec, seed=cfg.seed)  # as the ServerApp does: the adapters' shapes
    shapes = adapter_shapes(probe)
    base = {k: v.detach().clone() for k, v in probe.unload().state_dict().items()}
    names = [f"stage-{t}" for t in range(stages)]

    # fedavg: the round's average (training changes every tensor but the frozen parameters) replaces
    # the weights: "set" operations of every tensor the aggregate holds
    fedavg_cfg = make_config({"strategy": "fedavg"})
    fedavg = bound(fedavg_cfg, base, {k: tuple(v.shape) for k, v in base.items()}, 1.0)
    state = ContinualState.start(base)
    state.apply(fedavg.rule, {k: v.clone() if k in frozen else v + 1 for k, v in base.items()})
    moved(fedavg.sync, state)
    full_step = next(s for s in continual_plan(fedavg_cfg, names) if isinstance(s, Train))
    full_down = sent_bytes(fedavg, full_step, None)
    del fedavg, state

    # centralization: stage 0's first round aggregated (exact: the residual folded), the later round
    # that continues from it; then that round aggregated and the merge, and the next stage's first round
    strategy = bound(cfg, base, shapes, spec.scale)
    steps = [s for s in continual_plan(cfg, names) if isinstance(s, Train)]
    later = next((s for s in steps if s.stage == 0 and s.round == 1), None) or replace(
        steps[0], round=1, start="continue"
    )
    after_merge = next((s for s in steps if s.stage == 1 and s.round == 0), None) or steps[0]
    weights = example_weights([1] * sites)
    adapters = [trained_factors(shapes, seed=i) for i in range(sites)]
    state = ContinualState.start(base)
    state.apply(strategy.rule, aggregate(strategy.rule, adapters, weights, spec.scale))
    round_ops = moved(strategy.sync, state)
    adapter_down = sent_bytes(strategy, later, state.adapter)
    second = [trained_factors(shapes, seed=sites + i) for i in range(sites)]
    state.apply(strategy.rule, aggregate(strategy.rule, second, weights, spec.scale))
    state.merge(spec.scale, cfg.merge, commit=True)  # centralize-every=stage: merged after every stage
    merge_ops = moved(strategy.sync, state)
    merge_down = sent_bytes(strategy, after_merge, None)

    # the later round again, with sites close to one adapter (as sites that continued from one are)
    close = bound(cfg, base, shapes, spec.scale)
    state = ContinualState.start(base)
    state.apply(
        close.rule, aggregate(close.rule, close_factors(adapters[0], sites, seed=99), weights, spec.scale)
    )
    close_ops = moved(close.sync, state)
    close_down = sent_bytes(close, later, state.adapter)
    adapted = {k.rsplit(".", 1)[0] + ".weight" for k in shapes}
    return dict(
        model=display,
        key=name,
        spec=spec,
        sites=sites,
        rounds=cfg.rounds_per_stage,
        every=cfg.centralize_every,
        full_up=reply_bytes(full_reply),
        full_down=full_down,
        frozen_bytes=state_bytes({k: base[k] for k in frozen}),
        lora_up=reply_bytes(adapters[0]),
        merge_down=merge_down,
        adapter_down=adapter_down,
        residual_bytes=state_bytes(updates.to_tensors(round_ops)),
        merge_bytes=state_bytes(updates.to_tensors(merge_ops[1:])),
        residual_ranks=sorted(set(lowrank_ranks(round_ops) + lowrank_ranks(merge_ops[:1]))),
        residual_dense=sum(op[0] == "set" for ops in round_ops + merge_ops[:1] for op in ops.values()),
        merge_ranks=sorted(set(lowrank_ranks(merge_ops[1:]))),
        close_down=close_down,
        close_dense=sum(op[0] == "set" for ops in close_ops for op in ops.values()),
        close_sent=sum(len(ops) for ops in close_ops),
        adapted_layers=len(adapted),
        adapted_bytes=state_bytes({k: base[k] for k in adapted}),
    )


def mib(size: float) -> str:
    return f"{size / 2**20:.2f} MiB"


def report(m: dict) -> list[float]:
    """Print one model's table; return its ratios (full / LoRA) for up, merge-round down, stage mean."""
    rounds = m["rounds"]
    if m["every"] != "stage":
        raise ValueError(
            f"bytes_per_round assumes centralize-every='stage' (the default), got {m['every']!r}"
        )
    # a merge after every stage: round 1 of a stage brings the merged layers, later rounds the adapter too
    stage_down = (m["merge_down"] + (rounds - 1) * m["adapter_down"]) / rounds
    spec = m["spec"]
    print(
        f"\n{m['model']}: LoRA r={spec.rank} on {','.join(spec.target_modules)}, {m['sites']} sites, "
        f"{rounds} rounds per stage, centralize-every={m['every']} (the defaults)"
    )
    rows = [
        ("fedavg, full weights", m["full_up"], m["full_down"]),
        (
            "centralization, round after a merge (residual + merged factors down)",
            m["lora_up"],
            m["merge_down"],
        ),
        (
            "centralization, later round of a stage (adapter + residual factors down)",
            m["lora_up"],
            m["adapter_down"],
        ),
        (f"centralization, mean over a stage's {rounds} rounds", m["lora_up"], stage_down),
        (f"centralization, later round, sites' factors within {CLOSE:g}", m["lora_up"], m["close_down"]),
    ]
    for label, up, down in rows:
        print(
            f"  {label:<74} up {up:>13,.0f} B ({up / 2**20:8.2f} MiB)  "
            f"down {down:>13,.0f} B ({down / 2**20:8.2f} MiB)"
        )
    ratios = [m["full_up"] / m["lora_up"], m["full_down"] / m["merge_down"], m["full_down"] / stage_down]
    print(
        f"  ratio full / LoRA: up {ratios[0]:.1f}x, down after a merge {ratios[1]:.1f}x, "
        f"down over a stage {ratios[2]:.1f}x, total over a stage "
        f"{(m['full_up'] + m['full_down']) / (m['lora_up'] + stage_down):.1f}x"
    )
    residual = m["residual_bytes"]
    ranks = "-".join(str(r) for r in (m["residual_ranks"][:1] + m["residual_ranks"][1:][-1:])) or "none"
    print(
        f"  the residual: rank {ranks} on each of the {m['adapted_layers']} adapted layers "
        f"(at most (sites + 1) x r = {(m['sites'] + 1) * spec.rank}), {m['residual_dense']} dense; "
        f"{mib(residual)} = {100 * residual / m['adapted_bytes']:.1f}% of the layers' dense weights "
        f"({mib(m['adapted_bytes'])}, what the changed tensors were)"
    )
    print(
        f"  the merge: s * B_bar and A_bar, rank {'-'.join(map(str, m['merge_ranks'])) or 'none'}: "
        f"{mib(m['merge_bytes'])}, an adapter's size"
    )
    print(
        f"  sites within {CLOSE:g}: {m['close_sent']} of {m['adapted_layers']} residuals sent "
        f"({m['close_dense']} dense); the rest are below the weights' precision, so nothing changes"
    )
    if m["frozen_bytes"]:
        print(f"  fedavg's download leaves out the frozen parameters, unchanged: {mib(m['frozen_bytes'])}")
    target = TARGETS.get(m["key"])
    if target:
        print(f"  target: >= {target:.0f}x smaller; measured {min(ratios):.1f}x at worst (a download)")
    return ratios


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        type=name_list(MODELS, "--models"),
        default=["tiny", "whisper-small"],
        help=f"comma-separated, from {', '.join(MODELS)}",
    )
    parser.add_argument(
        "--sites", type=int, default=0, help="sites per round (default: the default scenario's)"
    )
    args = parser.parse_args(argv)
    scenario = load_scenario(make_config({}).scenario)
    sites = args.sites or len(scenario.sites)
    if sites < 1:
        parser.error(f"--sites {args.sites}: must be >= 1")
    print(
        "bytes per client per round, counted as server/strategies.py counts bytes_up / bytes_down "
        f"(array records; scenario {scenario.name!r}: {len(scenario.stages)} stages)"
    )
    return {name: report(measure(name, sites, len(scenario.stages))) for name in args.models}


if __name__ == "__main__":
    main()
