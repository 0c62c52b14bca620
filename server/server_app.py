"""Flower ServerApp: the continual loop, stages x rounds, then evaluation on every stage's test set.

    flwr run .                                         default scenario, centralization every stage
    flwr run . --run-config "strategy='fedavg' seed=1"

Every knob is a run-config key (cl_fed.config.DEFAULTS). Results land in
<output-dir>/<run-name>/ in the format of cl_fed.results; the state is checkpointed after every
round, and `resume=true` continues an interrupted run.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from cl_fed import protocol as P
from cl_fed.adapters import adapter_shapes, attach_lora
from cl_fed.aggregation import fold, start_arrays
from cl_fed.clmethods import Carried, ends_stage_with_fisher
from cl_fed.config import RunConfig, make_config
from cl_fed.continual import (
    evaluate_weights,
    lora_spec,
    merge_recorder,
    on_device,
    prepare_data,
    start_adapter,
    starting_model,
    state_checksum,
    test_sets,
    validation_scorer,
)
from cl_fed.faults import InjectedCrash, stop_after_round
from cl_fed.gate import gate_sites, validation_name
from cl_fed.history import MergeHistory
from cl_fed.loop import walk
from cl_fed.plan import Evaluate, Merge, Train, continual_plan, rule_for
from cl_fed.privacy import new_secret, privacy_report
from cl_fed.results import Evaluation, RunRecord, wer_line
from cl_fed.state import ContinualState, adapter_update
from cl_fed.tracking import Tracker
from server.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from server.strategies import WeightsSync, build_strategy, last_line, load_optimizer_state, optimizer_state

app = ServerApp()
CARRIED = "cl/"  # checkpoint prefix of the cl-method's state (cl_fed.clmethods.Carried)
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
    run_server(grid, dict(context.run_config))


def run_server(grid: Grid, run_config: dict) -> Path:
    """Walk the continual plan over Flower's grid; returns the run directory."""
    start = time.perf_counter()
    cfg = make_config(run_config, source="run config")
    scenario, stream = prepare_data(cfg)  # checks the scenario before any training
    stages = stream.stages
    schedule = cfg.schedule(len(stages))
    wait_for_sites(grid, len(stream.sites))
    run_name = cfg.default_run_name()
    run_dir = cfg.run_dir(run_name)
    speech = starting_model(cfg, scenario)  # the server evaluates a plain model
    sets = test_sets(stream) if cfg.evaluation == "server" else {s: [] for s in stages}
    federated = cfg.evaluation == "federated" or cfg.site_models  # site models are scored at the sites
    base = {k: v.detach().clone() for k, v in speech.model.state_dict().items()}
    on_device(cfg, speech)  # evaluation only; the weights and merges stay on the CPU (float64 math)
    strategy = build_strategy(cfg)
    if strategy.lora:
        spec = lora_spec(cfg, speech)
        # the adapters' names and shapes, from a probe (the server itself evaluates a plain model)
        shapes = adapter_shapes(attach_lora(copy.deepcopy(speech.model), spec, seed=cfg.seed))
        scale = spec.scale
    else:
        shapes, scale = {k: tuple(v.shape) for k, v in base.items()}, 1.0
    state = ContinualState.start(base)
    record = RunRecord(
        run_name=run_name,
        strategy=cfg.strategy,
        schedule={**schedule.to_dict(), "merge": cfg.merge, "rounds_per_stage": cfg.rounds_per_stage},
        config=cfg.to_dict(),
        stages=stages,
    )
    plan = continual_plan(cfg, stages)
    next_step = 0
    checkpoint = run_dir / CHECKPOINT
    secret = new_secret() if cfg.dp_noise else ""  # the noise's secret: drawn here, kept in the checkpoint
    sites_hold, extra = "", {}
    if cfg.resume and checkpoint.is_file():
        state, record, next_step, extra, secret, sites_hold = load_checkpoint(
            checkpoint, state, cfg.to_dict()
        )
        load_optimizer_state(strategy, extra)
        where = f"at plan step {next_step + 1}/{len(plan)}" if next_step < len(plan) else "(its plan is done)"
        print(f"[cl-fed] resuming {run_name} {where}", flush=True)
    elif cfg.rollback_to >= 0:
        raise ValueError(
            f"rollback-to={cfg.rollback_to}: {checkpoint} is not there to roll back (resume=true)"
        )
    elif secret:
        # before anything is released: a run that cannot keep its secret (and so resume with the same
        # noise) refuses to start
        save_checkpoint(checkpoint, state, record, next_step, optimizer_state(strategy), secret)
    # cl-method: the running Fisher (ewc) or merged subspaces (olora), kept in the checkpoint
    carried = Carried.from_tensors({k[len(CARRIED) :]: v for k, v in extra.items() if k.startswith(CARRIED)})
    sync = WeightsSync(state.weights, sites_hold)
    rule = rule_for(cfg)
    strategy.bind(cfg, shapes, scale, rule, sync, secret=secret)
    history = MergeHistory(run_dir)
    history.start(state_checksum(base), resume=next_step > 0)

    def evaluate(label: str) -> Evaluation:
        weights = state.evaluated(scale)
        if federated:
            sync.update(state.weights, state.log)
            state.log.clear()
            return federated_evaluation(grid, strategy, label, stages, weights, cfg)
        return evaluate_weights(speech, weights, sets, label)

    def federated_score(weights: dict, names: list[str]) -> dict[str, float]:
        """The gate's validation WER, scored by the sites on their own validation rows: counts only."""
        sync.update(state.weights, state.log)
        state.log.clear()
        wer = federated_evaluation(
            grid, strategy, "gate", [validation_name(n) for n in names], weights, cfg
        ).wer
        return {n: wer[validation_name(n)] for n in names}

    score = None
    if cfg.merge_gate != "none":
        score = federated_score if cfg.evaluation == "federated" else validation_scorer(speech, stream, cfg)
    gate, on_merge = merge_recorder(
        cfg, stages, scale, record, history, score, lambda t: print(t, flush=True)
    )
    current: list[Train] = []  # the round being trained (the site gate judges its stage)

    def site_gate(updates: dict[str, dict]) -> dict[str, dict]:
        """gate-sites=alone: each site's model (the weights it trained on plus its own adapter) judged
        against the committed base on the server's validation rows."""
        tick = time.perf_counter()
        models = {site: fold(state.weights, adapter_update(u, scale)) for site, u in updates.items()}
        verdicts = gate_sites(cfg, state.base, models, current[-1].stage, stages, score)
        strategy.round_log["gate_seconds"] = round(time.perf_counter() - tick, 3)
        for site, verdict in verdicts.items():
            if not verdict["passed"]:
                print(
                    f"[cl-fed] site gate: {site} left out of round {current[-1].server_round} "
                    f"({verdict['reason']})",
                    flush=True,
                )
        return verdicts

    if cfg.gate_sites != "none":
        strategy.site_gate = site_gate

    def server_extra() -> dict:
        """The checkpoint's extra tensors: the server optimiser's and the cl-method's state."""
        return {**optimizer_state(strategy), **{CARRIED + k: v for k, v in carried.to_tensors().items()}}

    if cfg.rollback_to >= 0:  # the operator's rollback of a resumed run, broadcast to the sites
        roll_back(cfg, state, record, history, strategy, grid, stages, next_step)
        save_checkpoint(checkpoint, state, record, next_step, server_extra(), secret, sync.checksum)

    # resumed: the restored record is logged again (cl_fed/tracking.py); a missing package fails here
    tracker = Tracker.open(cfg.tracking, run_dir, resume=next_step > 0)
    if record.initial is None:
        print(f"[cl-fed] {run_name}: evaluating the starting base", flush=True)
        record.initial = evaluate("initial")
        history.evaluated("initial", record.initial.wer)
        print(wer_line("starting base", record.initial.wer), flush=True)

    def train(step: Train) -> dict | None:
        tick = time.perf_counter()
        current.append(step)
        sync.update(state.weights, state.log)
        state.log.clear()
        adapter = start_adapter(step, state.adapter, shapes) if strategy.lora else None
        arrays = ArrayRecord(start_arrays(rule, adapter, state.weights) if adapter is not None else {})
        strategy.broadcast = carried.broadcast(cfg)
        messages = strategy.configure_train(
            step.server_round, arrays, ConfigRecord(P.train_config(step)), grid
        )
        timeout = cfg.round_timeout + (120 if step.server_round == 1 else 0)  # first round: workers start
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        again = strategy.resend_to_stale(replies)
        if again:  # each retried node's reply takes its error's place: the same order as without
            answers = {strategy.replying_node(r): r for r in grid.send_and_receive(again, timeout=timeout)}
            replies = [answers.get(strategy.replying_node(r), r) for r in replies]
        aggregated, metrics = strategy.aggregate_train(step.server_round, replies)
        if ends_stage_with_fisher(cfg, step):  # the sites' Fisher estimates join the running one
            carried.add_fisher(cfg, [f for f, _ in strategy.fishers], [n for _, n in strategy.fishers])
        entry = {
            **strategy.round_log,
            "stage": step.stage,
            "round": step.round,
            "stage_name": stages[step.stage],
            "seconds": round(time.perf_counter() - tick, 3),
            "merged": False,
        }
        entry["loss"] = float(metrics[P.TRAIN_LOSS]) if entry["losses"] else None  # example-weighted
        record.rounds.append(entry)
        if cfg.dp_noise:
            record.privacy = privacy_now(cfg, record.rounds)
            entry["epsilon"] = record.privacy["epsilon"]  # spent up to and including this round
        print(
            f"[cl-fed] stage {step.stage + 1}/{len(stages)} {stages[step.stage]} round "
            f"{step.round + 1}/{cfg.rounds_per_stage}: {len(entry['clients_used'])} sites used, "
            f"{len(entry['clients_dropped'])} dropped, loss "
            f"{entry['loss'] if entry['loss'] is not None else float('nan'):.3f}"
            f"{privacy_line(record.privacy) if cfg.dp_noise else ''}",
            flush=True,
        )
        return aggregated.to_torch_state_dict() if aggregated is not None else None

    def merged(step: Merge, before: dict) -> None:
        on_merge(step, before, state)
        if step.commit and strategy.lora:  # olora: the merged update's subspace
            carried.merged(cfg, before, state.base, shapes, spec.rank)
        if step.commit:
            print(f"[cl-fed] stage {step.stage + 1} round {step.round + 1}: merged into the base", flush=True)

    def after_stage(step: Evaluate) -> None:
        record.after_stage.append(evaluate(step.label))
        wers = record.after_stage[-1].wer
        history.evaluated(step.label, wers)
        print(wer_line(f"after {step.label}", wers), flush=True)

    def save(step, index: int) -> None:
        tracker.sync(record)  # after each round and evaluation
        save_checkpoint(checkpoint, state, record, index, server_extra(), secret, sync.checksum)
        crash_if_injected(record.rounds[-1]["server_round"] if record.rounds else 0)

    walk(
        plan,
        state,
        scale=scale,
        mode=cfg.merge,
        train=train,
        evaluate=after_stage,
        checkpoint=save,
        merged=merged,
        gate=gate,
        start=next_step,
    )
    record.wall_seconds += time.perf_counter() - start
    record.base_checksum = state_checksum(state.base)
    if strategy.lora or cfg.strategy == "fedavg":
        speech.model.load_state_dict(state.evaluated(scale))
    speech.save(run_dir / "model")  # the model the last evaluation scored (local: the starting base)
    record.write(run_dir)
    tracker.finish(record, run_dir)
    print(f"[cl-fed] results: {(run_dir / 'results.json').resolve()}", flush=True)
    return run_dir


def roll_back(cfg, state, record, history, strategy, grid, stages, next_step) -> None:
    """`rollback-to=STEP` with `resume=true`: the base becomes the history's base after STEP (bit for
    bit), recorded as a history step of its own, and the sites are brought to it at once by a
    federated evaluation, whose messages carry only the operations that undo the later merges
    (cl_fed.state.ContinualState.roll_back) rather than every weight; then the plan goes on."""
    steps = history.load()["steps"]
    if state.adapter is not None or state.pool:
        print("[cl-fed] rollback: the adapter and pool in progress are dropped", flush=True)
        state.discard()
    before = state.base
    target = history.base_at(cfg.rollback_to, state.base, state_checksum(state.base), state_checksum)
    state.roll_back(target)
    checksums = (state_checksum(before), state_checksum(state.base))
    server_round = record.rounds[-1]["server_round"] if record.rounds else 0
    meta = {"kind": "rollback", "to": cfg.rollback_to, "stage": None, "stage_name": None, "round": None}
    number = history.record(before, state.base, checksums, {**meta, "server_round": server_round})
    strategy.sync.update(state.weights, state.log)
    state.log.clear()
    evaluation = federated_evaluation(grid, strategy, f"rollback-{cfg.rollback_to}", stages, state.base, cfg)
    history.evaluated(evaluation.label, evaluation.wer)
    record.rollbacks.append(
        {
            "to": cfg.rollback_to,
            "step": number,
            "checksum": checksums[1],
            "wer": evaluation.wer,
            "plan_step": next_step,
        }
    )
    print(
        f"[cl-fed] rolled back to step {cfg.rollback_to} of {len(steps) - 1} (base {checksums[1][:12]}, as "
        f"recorded: {checksums[1] == steps[cfg.rollback_to]['checksum_after']}); the sites hold it",
        flush=True,
    )
    print(wer_line("after the rollback", evaluation.wer), flush=True)


def privacy_now(cfg: RunConfig, rounds: list[dict]) -> dict:
    """The privacy spent so far: one Gaussian release per round whose updates were noised. It derives
    from the checkpointed round log alone, so a resumed run reports what an uninterrupted one does."""
    steps = sum(r.get("dp_noise_std") is not None for r in rounds)
    return privacy_report(cfg.dp_noise, cfg.dp_clip, cfg.dp_delta, cfg.fraction_train, steps)


def privacy_line(privacy: dict) -> str:
    return f", DP epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g}"


def crash_if_injected(server_round: int) -> None:
    if stop_after_round() == server_round:
        raise InjectedCrash(f"injected server crash after round {server_round} (checkpoint written)")


def federated_evaluation(grid, strategy, label, stages, weights, cfg) -> Evaluation:
    """Each site scores the model on its share of every test set and returns error counts only.

    The model is `weights` (the server's evaluated model), sent as the site's training weights plus
    the tensors that differ (EVALUATED); a site with a model of its own (`local`, fedsa) scores that.
    A site that fails (for example because its weights were not the ones assumed) is asked once more
    with everything. The WER pools every site's counts; `site_wer` is each site's own."""
    test_names = list(stages)
    current = strategy.sync.weights
    evaluated = {k: v for k, v in weights.items() if v is not current[k] and not torch.equal(v, current[k])}

    def message(node: int) -> Message:
        fields, records = strategy.sync_records(node)
        if evaluated and not cfg.site_models:
            records[P.EVALUATED] = ArrayRecord(evaluated)
        config = ConfigRecord({**fields, P.TEST_SETS: test_names})
        return Message(
            content=RecordDict({**records, P.CONFIG: config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )

    totals: dict[str, float] = {}
    by_site: dict[str, dict[str, float]] = {}  # site -> its counts (per-site WER)
    nodes = list(grid.get_node_ids())
    for _attempt in range(2):
        failed = []
        for reply in grid.send_and_receive([message(node) for node in nodes], timeout=cfg.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                print(
                    f"[cl-fed] evaluation failed on node {node}: {last_line(reply.error.reason)}", flush=True
                )
                strategy.sync.nodes.pop(node, None)  # next time: everything
                failed.append(node)
                continue
            # it synced to the current weights (a `local` site: it runs its own state from now on)
            strategy.sync.nodes[node] = strategy.sync.checksum
            about = reply.content[P.SITE] if P.SITE in reply.content else {}
            site = by_site.setdefault(str(about.get(P.SITE_NAME, node)), {})
            for key, value in reply.content[P.METRICS].items():
                totals[key] = totals.get(key, 0) + value
                site[key] = site.get(key, 0) + value
        nodes = failed
        if not nodes:
            break

    def rate(counts: dict, errors: str, total: str, name: str) -> float:
        n = counts.get(f"{name}:{total}", 0)
        return 100.0 * counts.get(f"{name}:{errors}", 0) / n if n else float("nan")  # nobody scored it

    wer = {s: rate(totals, P.WORD_ERRORS, P.WORDS, s) for s in test_names}
    cer = {s: rate(totals, P.CHAR_ERRORS, P.CHARS, s) for s in test_names}
    sites = {
        name: {s: rate(counts, P.WORD_ERRORS, P.WORDS, s) for s in test_names}
        for name, counts in sorted(by_site.items())
    }
    return Evaluation(label=label, wer=wer, cer=cer, predictions=[], site_wer=sites)
