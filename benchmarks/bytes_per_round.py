"""Bytes per client per round: full weights (fedavg) vs LoRA factors (centralization).

Counted the way the Flower apps count them: the server's `bytes_down` is the size of every
ArrayRecord of a train message (server/strategies.py configure_train: the records of
WeightsSync.records plus the adapter a round continues from), `bytes_up` the size of a reply's
arrays, both with cl_fed.centralize.state_bytes. The server's state moves as the ServerApp moves it
(cl_fed.state.ContinualState: apply the plan's aggregate, then merge), and WeightsSync sends a site
that holds the previous version only the tensors that changed since:

- fedavg: up = every weight and buffer, in its own dtype (cl_fed.continual.train_round); down =
  every tensor the round's average changed: all of them but the frozen parameters;
- centralization: up = the LoRA factors; down, in the round after a merge, the changed weights: the
  dense merged weights of the adapted layers (the round starts a fresh adapter, drawn from its seed:
  no adapter is sent); in a later round of a stage, the averaged adapter plus the adapted layers'
  weights the exact aggregate's residual was folded into (merge=product; with merge=factors, or a
  single site, the residual is zero and only the adapter goes down). A site that joins or missed a
  version gets every tensor instead, as under fedavg.
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


def changed_since(sync: WeightsSync, weights: dict[str, torch.Tensor]) -> None:
    """NODE trained on the current version (its reply says so), then the server moved to `weights`."""
    sync.nodes[NODE] = sync.checksum
    sync.update(weights)


def measure(name: str, sites: int, stages: int) -> dict:
    cfg = make_config({})
    display, model, spec = build(name)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    full_reply = {k: v.detach().clone() for k, v in model.state_dict().items()}
    probe = attach_lora(model, spec, seed=cfg.seed)  # as the ServerApp does: the adapters' shapes
    shapes = adapter_shapes(probe)
    base = {k: v.detach().clone() for k, v in probe.unload().state_dict().items()}
    names = [f"stage-{t}" for t in range(stages)]

    # fedavg: the round's average changes every tensor training touches
    fedavg_cfg = make_config({"strategy": "fedavg"})
    fedavg = bound(fedavg_cfg, base, {k: tuple(v.shape) for k, v in base.items()}, 1.0)
    changed_since(fedavg.sync, {k: v if k in frozen else v + 1 for k, v in base.items()})
    full_step = next(s for s in continual_plan(fedavg_cfg, names) if isinstance(s, Train))
    full_down = sent_bytes(fedavg, full_step, None)
    del fedavg

    # centralization: stage 0, round 0 aggregated (exact: residual folded), a later round, the merge
    strategy = bound(cfg, base, shapes, spec.scale)
    steps = [s for s in continual_plan(cfg, names) if isinstance(s, Train)]
    later = next((s for s in steps if s.stage == 0 and s.round == 1), None) or replace(
        steps[0], round=1, start="continue"
    )
    after_merge = next((s for s in steps if s.stage == 1 and s.round == 0), None) or steps[0]
    adapters = [trained_factors(shapes, seed=i) for i in range(sites)]
    state = ContinualState.start(base)
    state.apply(strategy.rule, aggregate(strategy.rule, adapters, example_weights([1] * sites), spec.scale))
    changed_since(strategy.sync, state.weights)
    adapter_down = sent_bytes(strategy, later, state.adapter)
    state.merge(spec.scale, cfg.merge, commit=True)  # centralize-every=stage: merged after every stage
    changed_since(strategy.sync, state.weights)
    merge_down = sent_bytes(strategy, after_merge, None)
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
        lora_up=reply_bytes(adapters[0]),
        merge_down=merge_down,
        adapter_down=adapter_down,
        adapted_layers=len(adapted),
        adapted_bytes=state_bytes({k: base[k] for k in adapted}),
    )


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
        ("centralization, round after a merge (changed weights down)", m["lora_up"], m["merge_down"]),
        ("centralization, later round of a stage (adapter + changed down)", m["lora_up"], m["adapter_down"]),
        (f"centralization, mean over a stage's {rounds} rounds", m["lora_up"], stage_down),
    ]
    for label, up, down in rows:
        print(
            f"  {label:<66} up {up:>13,.0f} B ({up / 2**20:8.2f} MiB)  "
            f"down {down:>13,.0f} B ({down / 2**20:8.2f} MiB)"
        )
    ratios = [m["full_up"] / m["lora_up"], m["full_down"] / m["merge_down"], m["full_down"] / stage_down]
    print(
        f"  ratio full / LoRA: up {ratios[0]:.1f}x, down after a merge {ratios[1]:.1f}x, "
        f"down over a stage {ratios[2]:.1f}x, total over a stage "
        f"{(m['full_up'] + m['full_down']) / (m['lora_up'] + stage_down):.1f}x"
    )
    print(
        f"  the changed weights are the {m['adapted_layers']} adapted layers' dense weights, "
        f"{100 * m['adapted_bytes'] / m['full_down']:.1f}% of fedavg's download, whatever the number of sites"
    )
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
