"""Bytes per client per round: full weights (fedavg) vs LoRA factors (centralization).

Counted the way the Flower apps count them: the server's `bytes_down` is the size of every
ArrayRecord of a train message (server/strategies.py configure_train), `bytes_up` the size of a
reply's arrays, both with cl_fed.centralize.state_bytes. The records come from the server
strategies' own `sync_records` and the client's reply rules (clients/client_app.py):

- fedavg: up = every weight and buffer in fp32; down = the full base (it changes every round);
- centralization: up = the LoRA factors; down = the averaged adapter while a stage goes on, and
  after a merge the merge instruction: every merged site's factors (config fields, such as the
  sites' weights, are not arrays and not counted, as in the apps). A site that joins or missed a
  merge gets the full base instead, as under fedavg.
Whisper ties its output projection to the token embedding: the state dict, and so the apps'
records, carry that matrix twice, and the full-weight figures here do too.

Targets: LoRA >= 20x smaller for the default model, >= 50x for Whisper-small with r=32 on q/v.
Prints figures only; no pass/fail.

    python -m benchmarks.bytes_per_round [--models tiny,whisper-small] [--sites N]
"""

from __future__ import annotations

import argparse

import torch
from flwr.app import ArrayRecord

from benchmarks.models import MODELS, build, name_list
from cl_fed.adapters import adapter_state, attach_lora
from cl_fed.centralize import example_weights, state_bytes
from cl_fed.config import make_config
from cl_fed.data.scenario import load_scenario
from server.strategies import Centralization, FedAvgFull, MergeInstruction, ServerState

TARGETS = {"tiny": 20.0, "whisper-small": 50.0}


def sent_bytes(strategy, node: int) -> int:
    """What configure_train sends `node`: its sync records, plus the adapter the round starts from."""
    _, records = strategy.sync_records(node)
    start = strategy.start_adapter()
    if start is not None:
        records["adapter"] = ArrayRecord(start)
    return sum(state_bytes(record.to_torch_state_dict()) for record in records.values())


def reply_bytes(arrays: dict[str, torch.Tensor]) -> int:
    """What the server counts for a reply: its arrays, after Flower's ArrayRecord round trip."""
    return state_bytes(ArrayRecord(arrays).to_torch_state_dict())


def measure(name: str, sites: int, stages: int) -> dict:
    cfg = make_config({})
    display, model, spec = build(name)
    full_reply = {k: v.detach().to(torch.float32).clone() for k, v in model.state_dict().items()}
    probe = attach_lora(model, spec, seed=cfg.seed)  # as the ServerApp does: the adapters' shapes
    adapter = adapter_state(probe)
    base = {k: v.detach().clone() for k, v in probe.unload().state_dict().items()}
    reference = {k: v.shape for k, v in adapter.items()}
    schedule = cfg.schedule(stages)

    # fedavg: every round ends with a new base, so every site is sent the full base
    fedavg = FedAvgFull(cfg, schedule, ServerState(base=base, checksum="new"), reference, 1.0, sites)
    fedavg.state.node_base[1] = "old"

    # centralization: a site one merge behind gets the instruction; mid-stage, the averaged adapter
    adapters = [{k: v.clone() for k, v in adapter.items()} for _ in range(sites)]  # sizes, not values, count
    instruction = MergeInstruction("old", "new", adapters, example_weights([1] * sites))
    after_merge = Centralization(
        cfg,
        schedule,
        ServerState(base=base, checksum="new", instruction=instruction),
        reference,
        spec.scale,
        sites,
    )
    after_merge.state.node_base[1] = "old"
    mid_stage = Centralization(
        cfg, schedule, ServerState(base=base, checksum="new", adapter=adapter), reference, spec.scale, sites
    )
    mid_stage.state.node_base[1] = "new"
    return dict(
        model=display,
        key=name,
        spec=spec,
        sites=sites,
        rounds=cfg.rounds_per_stage,
        every=cfg.centralize_every,
        full_up=reply_bytes(full_reply),
        full_down=sent_bytes(fedavg, 1),
        lora_up=reply_bytes(adapter),
        merge_down=sent_bytes(after_merge, 1),
        adapter_down=sent_bytes(mid_stage, 1),
    )


def report(m: dict) -> list[float]:
    """Print one model's table; return its ratios (full / LoRA) for up, merge-round down, stage mean."""
    rounds = m["rounds"]
    if m["every"] != "stage":
        raise ValueError(
            f"bytes_per_round assumes centralize-every='stage' (the default), got {m['every']!r}"
        )
    # a merge after every stage: round 1 of a stage brings the merge instruction, later rounds the adapter
    stage_down = (m["merge_down"] + (rounds - 1) * m["adapter_down"]) / rounds
    spec = m["spec"]
    print(
        f"\n{m['model']}: LoRA r={spec.rank} on {','.join(spec.target_modules)}, {m['sites']} sites, "
        f"{rounds} rounds per stage, centralize-every={m['every']} (the defaults)"
    )
    rows = [
        ("fedavg, full weights", m["full_up"], m["full_down"]),
        ("centralization, round after a merge (merge instruction down)", m["lora_up"], m["merge_down"]),
        ("centralization, later round of a stage (averaged adapter down)", m["lora_up"], m["adapter_down"]),
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
    per_site = m["merge_down"] / m["sites"]
    print(
        f"  the merge instruction grows with the sites merged: it reaches the full base's size at "
        f"{m['full_down'] / per_site:.0f} sites"
    )
    target = TARGETS.get(m["key"])
    if target:
        print(
            f"  target: >= {target:.0f}x smaller; measured {min(ratios):.1f}x at worst (the merge round's download)"
        )
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
