"""Flower ServerApp: the continual loop, stages x rounds, then evaluation on every stage's test set.

    flwr run .                                         default scenario, centralization every stage
    flwr run . --run-config "strategy='fedavg' seed=1"

Every knob is a run-config key (cl_fed.config.DEFAULTS). Results land in
<output-dir>/<run-name>/ in the format of cl_fed.results; the state is checkpointed after every
round, and `resume=true` continues an interrupted run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from cl_fed.adapters import LoraSpec, adapter_state, attach_lora
from cl_fed.centralize import centralize
from cl_fed.config import RunConfig, make_config
from cl_fed.continual import evaluate_all, lora_spec, prepare_data, starting_model, state_checksum, test_sets
from cl_fed.faults import InjectedCrash, stop_after_round
from cl_fed.paths import runs_root
from cl_fed.privacy import privacy_report
from cl_fed.results import Evaluation, RunRecord
from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategies import STRATEGY_CLASSES, ServerState, last_line, stack

app = ServerApp()
log = logging.getLogger("cl_fed.server")


def wait_for_sites(grid: Grid, num_sites: int, timeout: float = 120.0) -> list[int]:
    """All SuperNodes must be up, and there must be exactly one per site."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) > num_sites:
            raise ValueError(
                f"{len(nodes)} SuperNodes are connected but the data has {num_sites} sites: "
                f"start one SuperNode per site (simulation: num-supernodes={num_sites})"
            )
        if len(nodes) == num_sites:
            return nodes
        if time.monotonic() > deadline:
            raise ValueError(
                f"only {len(nodes)} SuperNodes connected after {timeout:.0f} s, but the data has "
                f"{num_sites} sites (simulation: num-supernodes={num_sites})"
            )
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    start = time.perf_counter()
    cfg = make_config(dict(context.run_config), source="run config")
    scenario, stream = prepare_data(cfg)  # checks the scenario before any training
    stages = stream.stages
    schedule = cfg.schedule(len(stages))
    wait_for_sites(grid, len(stream.sites))
    run_name = cfg.default_run_name()
    run_dir = Path(cfg.output_dir or runs_root()) / run_name
    speech = starting_model(cfg, scenario)
    sets = test_sets(stream) if cfg.evaluation == "server" else {s: [] for s in stages}
    federated = cfg.evaluation == "federated" or cfg.strategy == "local"

    lora = STRATEGY_CLASSES[cfg.strategy].lora
    if lora:
        spec = lora_spec(cfg, speech)
        probe = attach_lora(speech.model, spec, seed=cfg.seed)  # the adapters' names and shapes
        reference = {k: v.shape for k, v in adapter_state(probe).items()}
        speech.model = probe.unload()  # the server itself evaluates a plain model
    else:
        spec = LoraSpec(rank=1, alpha=1.0, dropout=0.0, target_modules=("unused",))
        reference = {k: v.shape for k, v in speech.model.state_dict().items()}
    base = {k: v.detach().clone() for k, v in speech.model.state_dict().items()}
    state = ServerState(base=base, checksum=state_checksum(base))
    record = RunRecord(
        run_name=run_name,
        strategy=cfg.strategy,
        schedule={**schedule.to_dict(), "merge": cfg.merge, "rounds_per_stage": cfg.rounds_per_stage},
        config=cfg.to_dict(),
        stages=stages,
    )
    position = (0, 0)
    if cfg.resume and (run_dir / "checkpoint.pt").is_file():
        state, record, position = load_checkpoint(run_dir / "checkpoint.pt", state)
        log.warning("resuming %s at stage %d round %d", run_name, *position)
        print(f"[cl-fed] resuming {run_name} at stage {position[0] + 1} round {position[1] + 1}", flush=True)
    strategy = STRATEGY_CLASSES[cfg.strategy](cfg, schedule, state, reference, spec.scale, len(stream.sites))
    if strategy.dp:
        strategy.fresh_adapter = lambda seed: fresh_adapter(speech, spec, seed)

    def evaluate(label: str) -> Evaluation:
        adapters, weights = strategy.pending()
        if federated:
            return federated_evaluation(grid, strategy, label, stages, adapters, weights, cfg)
        weights_now = (
            centralize(state.base, adapters, weights, spec.scale, cfg.merge) if adapters else state.base
        )
        speech.model.load_state_dict(weights_now)
        return evaluate_all(speech, sets, label)

    if record.initial is None:
        print(f"[cl-fed] {run_name}: evaluating the starting base", flush=True)
        record.initial = evaluate("initial")
    server_round = position[0] * cfg.rounds_per_stage + position[1]
    for t in range(position[0], len(stages)):
        strategy.stage = t
        first_round = position[1] if t == position[0] else 0
        for r in range(first_round, cfg.rounds_per_stage):
            server_round += 1
            strategy.round, strategy.last_round_of_stage = r, r == cfg.rounds_per_stage - 1
            tick = time.perf_counter()
            messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            timeout = cfg.round_timeout + (120 if server_round == 1 else 0)  # first round: workers start
            replies = grid.send_and_receive(messages, timeout=timeout)
            strategy.aggregate_train(server_round, replies)
            entry = {
                **strategy.round_log,
                "stage_name": stages[t],
                "seconds": round(time.perf_counter() - tick, 3),
            }
            entry["loss"] = (
                (
                    sum(l * n for l, n in zip(entry["losses"], entry["num_examples"]))
                    / max(sum(entry["num_examples"]), 1)
                )
                if entry["losses"]
                else None
            )
            record.rounds.append(entry)
            if cfg.dp_noise:
                record.privacy = privacy_now(cfg, record.rounds)
            print(
                f"[cl-fed] stage {t + 1}/{len(stages)} {stages[t]} round {r + 1}/{cfg.rounds_per_stage}: "
                f"{len(entry['clients_used'])} sites used, {len(entry['clients_dropped'])} dropped, "
                f"loss {entry['loss'] if entry['loss'] is not None else float('nan'):.3f}"
                f"{', merged into the base' if entry['merged'] else ''}"
                f"{privacy_line(record.privacy) if cfg.dp_noise else ''}",
                flush=True,
            )
            last = r == cfg.rounds_per_stage - 1
            if not last:
                save_checkpoint(run_dir / "checkpoint.pt", state, record, (t, r + 1))
                crash_if_injected(server_round)
        record.after_stage.append(evaluate(stages[t]))
        wers = record.after_stage[-1].wer
        print(
            f"[cl-fed] after {stages[t]}: WER " + ", ".join(f"{k} {v:.1f}" for k, v in wers.items()),
            flush=True,
        )
        save_checkpoint(run_dir / "checkpoint.pt", state, record, (t + 1, 0))
        crash_if_injected(server_round)
    record.wall_seconds += time.perf_counter() - start
    speech.model.load_state_dict(state.base)
    speech.save(run_dir / "model")
    record.write(run_dir)
    print(f"[cl-fed] results: {(run_dir / 'results.json').resolve()}", flush=True)


def fresh_adapter(speech, spec, seed: int) -> dict:
    """The adapter a site's reset_adapters(seed) draws, drawn by the same code on the server's model
    (which evaluates without LoRA, so the adapter is detached again)."""
    probe = attach_lora(speech.model, spec, seed=seed)
    try:
        return adapter_state(probe)
    finally:
        speech.model = probe.unload()


def privacy_now(cfg: RunConfig, rounds: list[dict]) -> dict:
    """The privacy spent so far: one Gaussian release per round whose updates were noised. It derives
    from the checkpointed round log alone, so a resumed run reports what an uninterrupted one does."""
    source = "run seed and round" + (
        " and the server's CL_FED_DP_SECRET"
        if os.environ.get("CL_FED_DP_SECRET")
        else " (reproducible by anyone who knows the run config; set CL_FED_DP_SECRET on "
        "the server to keep the noise secret)"
    )
    steps = sum(r.get("dp_noise_std") is not None for r in rounds)
    return privacy_report(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, cfg.fraction_train, steps, source)


def privacy_line(privacy: dict) -> str:
    return f", DP epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g}"


def crash_if_injected(server_round: int) -> None:
    if stop_after_round() == server_round:
        raise InjectedCrash(f"injected server crash after round {server_round} (checkpoint written)")


def federated_evaluation(grid, strategy, label, stages, adapters, weights, cfg) -> Evaluation:
    """Each site scores the model on its share of every test set and returns error counts only.

    A site that fails (for example because its base was not the one assumed) is asked once more
    with the full base, so one stale site does not leave a test set unscored."""
    test_names = list(stages)

    def message(node: int) -> Message:
        sync, records = strategy.sync_records(node)  # may itself be a merge instruction: keep it whole
        if adapters:
            records["pending"] = ArrayRecord(stack(adapters))
        config = ConfigRecord(
            {
                **sync,
                "pending-count": len(adapters),
                "pending-weights": list(weights) or [0.0],
                "test-sets": test_names,
                "stage": strategy.stage,
            }
        )
        return Message(
            content=RecordDict({**records, "config": config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )

    totals: dict[str, float] = {}
    nodes = list(grid.get_node_ids())
    for attempt in range(2):
        failed = []
        for reply in grid.send_and_receive([message(node) for node in nodes], timeout=cfg.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                print(
                    f"[cl-fed] evaluation failed on node {node}: {last_line(reply.error.reason)}", flush=True
                )
                strategy.state.node_base.pop(node, None)  # next time: the full base
                failed.append(node)
                continue
            for key, value in reply.content["metrics"].items():
                totals[key] = totals.get(key, 0) + value
        nodes = failed
        if not nodes:
            break

    def rate(errors: str, total: str, name: str) -> float:
        n = totals.get(f"{name}:{total}", 0)
        return 100.0 * totals.get(f"{name}:{errors}", 0) / n if n else float("nan")  # no site scored it

    wer = {s: rate("word-errors", "words", s) for s in test_names}
    cer = {s: rate("char-errors", "chars", s) for s in test_names}
    return Evaluation(label=label, wer=wer, cer=cer, predictions=[])
