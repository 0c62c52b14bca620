"""Single-site runner: the paper's setting, no Flower.

    python -m cl_fed.run --scenario tiny --strategy centralization --centralize-every 3

One site (by default all of the scenario's sites pooled into one, or `--site NAME`) goes through
the stages in order, rehearsal-free. `centralization` trains a fresh LoRA adapter per stage (per
round with `--centralize-every round`) on the frozen base, pools adapters and merges their average
into the base on the schedule; `fedavg` is sequential full fine-tuning; `fedavg-lora` keeps one
adapter for all stages and never merges. Writes the results format of `cl_fed.results`.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from dataclasses import replace
from pathlib import Path

from cl_fed.adapters import adapter_shapes, attach_lora
from cl_fed.aggregation import SHARED_A_RULES, aggregate, personal, sent_factors
from cl_fed.clmethods import Anchors, Carried, ends_stage_with_fisher, round_loss, site_fisher, training_data
from cl_fed.config import DEFAULTS, RunConfig, make_config
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
    train_round,
    training_rows,
    validation_scorer,
)
from cl_fed.history import MergeHistory
from cl_fed.loop import walk
from cl_fed.models.base import SpeechModel
from cl_fed.plan import Evaluate, Train, continual_plan, round_seed, rule_for
from cl_fed.results import RunRecord, wer_line
from cl_fed.state import ContinualState
from cl_fed.tracking import Tracker

SINGLE_SITE_STRATEGIES = ("centralization", "fedavg", "fedavg-lora")


def run_single_site(cfg: RunConfig, site: str = "all", progress: bool = True) -> Path:
    """Walk the continual plan on one site (a grid of one); returns the run directory."""
    if cfg.strategy not in SINGLE_SITE_STRATEGIES:
        raise ValueError(
            f"strategy={cfg.strategy!r} needs several sites; the single-site runner "
            f"takes {', '.join(SINGLE_SITE_STRATEGIES)}"
        )
    refuse_privacy(cfg)
    if cfg.gate_sites != "none":
        raise ValueError(
            f"gate-sites={cfg.gate_sites!r} scores each site's update alone; the single-site runner "
            "trains one (use flwr run, or merge-gate alone)"
        )
    if cfg.drill:
        raise ValueError(f"drill={cfg.drill!r} makes one site of a federation faulty; use flwr run")
    if cfg.server_optimizer != "none":
        raise ValueError(
            f"server-optimizer={cfg.server_optimizer!r} is a federated server's optimiser; "
            "the single-site runner has none (use flwr run)"
        )
    # proximal-mu is honoured (cl_fed.continual.train_config): each round's training is held near the
    # weights or adapter it starts from, as a site of a federation of one
    start = time.perf_counter()
    scenario, stream = prepare_data(cfg, progress=progress)
    stages = stream.stages
    schedule = cfg.schedule(len(stages))
    sites = stream.sites if site == "all" else [site]
    if site != "all" and site not in stream.sites:
        raise ValueError(f"site={site!r} is not in the data; sites: {', '.join(stream.sites)}")
    evaluator = starting_model(cfg, scenario, progress=progress)  # plain model, as the server's
    trainer = copy.deepcopy(evaluator)  # the site's model: LoRA-wrapped for the LoRA strategies
    spec = lora_spec(cfg, trainer) if cfg.strategy != "fedavg" else None
    if spec is not None:
        trainer.model = attach_lora(trainer.model, spec, seed=cfg.seed)
    on_device(cfg, trainer, training=True)  # an unavailable device or precision fails here
    scale = spec.scale if spec is not None else 1.0
    shapes = adapter_shapes(trainer.model) if spec is not None else {}
    sets = test_sets(stream)
    run_name = cfg.default_run_name() if cfg.run_name else f"{cfg.default_run_name()}-single-{site}"
    run_dir = cfg.run_dir(run_name)
    record = RunRecord(
        run_name=run_name,
        strategy=cfg.strategy,
        schedule={**schedule.to_dict(), "merge": cfg.merge, "mode": "single-site", "site": site},
        config={**cfg.to_dict(), "site": site},
        stages=stages,
    )
    _say(
        progress,
        f"[cl-fed] single site ({site}): {len(stages)} stages, strategy {cfg.strategy}; "
        f"evaluating the starting base on {len(sets)} test sets",
    )
    state = ContinualState.start({k: v.detach().clone() for k, v in evaluator.model.state_dict().items()})
    on_device(cfg, evaluator)  # the state stays on the CPU: merges are float64 there
    tracker = Tracker.open(cfg.tracking, run_dir)  # a missing tracking package fails here
    record.initial = evaluate_weights(evaluator, state.evaluated(scale), sets, "initial")
    _say(progress, wer_line("starting base", record.initial.wer))
    views = {s: stream.site(s) for s in sites}
    history = MergeHistory(run_dir)
    history.start(state_checksum(state.base))
    history.evaluated("initial", record.initial.wer)
    score = validation_scorer(evaluator, stream, cfg) if cfg.merge_gate != "none" else None
    gate, on_merge = merge_recorder(
        cfg, stages, scale, record, history, score, lambda text: _say(progress, text)
    )

    carried, anchors = Carried(), Anchors()  # cl-method: what the server would keep; the site's anchor
    replay_dir = run_dir / "replay"
    shutil.rmtree(replay_dir, ignore_errors=True)  # this run's own buffer (the runner does not resume)

    def train(step: Train) -> dict:
        state.log.clear()  # no site to send the operations to
        rows = [u for s in sites for u in training_rows(cfg, views[s].enter(step.stage))]
        if not rows:
            raise ValueError(f"stage {stages[step.stage]!r} has no training data for site(s) {sites}")
        data = training_data(cfg, rows, replay_dir, site, step.stage)
        adapter = start_adapter(step, state.adapter, shapes)
        extra = round_loss(cfg, trainer, step, state.weights, adapter, scale, anchors, carried.broadcast(cfg))
        update, result = train_round(
            trainer, data, cfg, step, state.weights, adapter, progress=progress, extra_loss=extra
        )
        if ends_stage_with_fisher(cfg, step):
            carried.add_fisher(cfg, [site_fisher(cfg, trainer, rows, step.seed)], [len(rows)])
        record.rounds.append(round_entry(step, stages, result, [site]))
        _say(
            progress,
            f"[cl-fed] stage {step.stage + 1}/{len(stages)} {stages[step.stage]} round "
            f"{step.round + 1}/{cfg.rounds_per_stage}: loss {result.loss:.3f}, "
            f"{result.audio_seconds / max(result.wall_seconds, 1e-9):.0f}x real time",
        )
        rule = rule_for(cfg)
        if rule in SHARED_A_RULES:  # fedsa, one site: the mean A is its own, and it keeps its B
            return personal(aggregate(rule, [sent_factors(rule, update)], [1.0], scale), update)
        return aggregate(rule, [update], [1.0], scale)

    def evaluate(step: Evaluate) -> None:
        record.after_stage.append(evaluate_weights(evaluator, state.evaluated(scale), sets, step.label))
        row = record.after_stage[-1].wer
        history.evaluated(step.label, row)
        _say(progress, wer_line(f"after {step.label}", row))

    def merged(step, before: dict) -> None:
        on_merge(step, before, state)
        if step.commit and spec is not None:
            carried.merged(cfg, before, state.base, shapes, spec.rank)

    walk(
        continual_plan(cfg, stages),
        state,
        scale=scale,
        mode=cfg.merge,
        train=train,
        evaluate=evaluate,
        merged=merged,
        gate=gate,
        checkpoint=lambda step, index: tracker.sync(record),  # after each round and evaluation
    )
    record.wall_seconds = time.perf_counter() - start
    record.base_checksum = state_checksum(state.base)
    save_evaluated(evaluator, state.evaluated(scale), run_dir)
    record.write(run_dir)
    tracker.finish(record, run_dir)
    _say(progress, f"[cl-fed] results: {(run_dir / 'results.json').resolve()}")
    return run_dir


def round_entry(step: Train, stages: list[str], result, used: list[str]) -> dict:
    """One row of results.json `rounds` for an in-process round."""
    return {
        "stage": step.stage,
        "stage_name": stages[step.stage],
        "round": step.round,
        "server_round": step.server_round,
        "loss": result.loss,
        "num_examples": result.num_examples,
        "audio_seconds": result.audio_seconds,
        "seconds": result.wall_seconds,
        "lr_mean": result.lr_mean,
        "bytes_up": 0,
        "bytes_down": 0,
        "clients_used": used,
        "clients_dropped": [],
        "merged": False,
    }


def save_evaluated(speech: SpeechModel, weights: dict, run_dir: Path) -> None:
    """`model/` = the model the last evaluation scored (pending pool and live adapter merged in)."""
    speech.model.load_state_dict(weights)
    speech.save(run_dir / "model")


def refuse_privacy(cfg: RunConfig) -> None:
    """Differential privacy is site-level noise on the federated mean; one site has no mean to noise."""
    if cfg.dp_noise:
        raise ValueError(
            f"dp-noise={cfg.dp_noise!r}: differential privacy applies to federated runs only "
            "(`flwr run`); the single-site and joint runners have no federation to protect"
        )


def joint_run_name(cfg: RunConfig) -> str:
    """`<scenario>-joint[-<key><value>...]-seed<N>`: the fedavg name of the same settings, renamed."""
    if cfg.run_name:
        return cfg.run_name
    name = replace(cfg, strategy="fedavg").default_run_name()
    scenario = Path(cfg.scenario).stem
    return f"{scenario}-joint{name[len(scenario) + len('-fedavg') :]}"


def run_joint(cfg: RunConfig, progress: bool = True) -> Path:
    """The joint-training upper bound: every site's data of every stage at once, centralized, full
    fine-tuning (full-lr) for as many passes over each utterance as the continual runs make
    (rounds-per-stage x local-epochs). Not rehearsal-free by design; one evaluation at the end."""
    start = time.perf_counter()
    scenario, stream = prepare_data(cfg, progress=progress)
    speech = starting_model(cfg, scenario, progress=progress)
    sets = test_sets(stream)
    refuse_privacy(cfg)
    # full fine-tuning: no schedule, no LoRA knobs; no FedProx (the bound is centralized training)
    cfg = replace(cfg, strategy="fedavg", proximal_mu=0.0, cl_method="none").effective()
    run_name = joint_run_name(cfg)
    run_dir = cfg.run_dir(run_name)
    record = RunRecord(
        run_name=run_name,
        strategy="joint",
        schedule={"mode": "joint"},
        config={**cfg.to_dict(), "mode": "joint"},
        stages=stream.stages,
    )
    _say(
        progress,
        f"[cl-fed] joint training on all {len(stream.stages)} stages of {len(stream.sites)} sites at once",
    )
    weights = {k: v.detach().clone() for k, v in speech.model.state_dict().items()}
    on_device(cfg, speech, training=True)
    tracker = Tracker.open(cfg.tracking, run_dir)
    record.initial = evaluate_weights(speech, weights, sets, "initial")
    data = [u for s in stream.sites for t in range(len(stream.stages)) for u in stream.site(s).enter(t)]
    rounds = cfg.rounds_per_stage
    for r in range(rounds):
        step = Train(
            0,
            r,
            r + 1,
            round_seed(cfg.seed, 0, r),
            "full",
            r if cfg.lr_span == "stage" else 0,
            rounds if cfg.lr_span == "stage" else 1,
        )
        weights, result = train_round(speech, data, cfg, step, weights, None, progress=progress)
        record.rounds.append({**round_entry(step, ["all"], result, ["all"]), "stage": None})
        tracker.sync(record)
        _say(progress, f"[cl-fed] joint round {r + 1}/{rounds}: loss {result.loss:.3f}")
    record.after_stage.append(evaluate_weights(speech, weights, sets, "joint"))
    record.wall_seconds = time.perf_counter() - start
    record.base_checksum = state_checksum(weights)
    save_evaluated(speech, weights, run_dir)
    record.write(run_dir)
    tracker.finish(record, run_dir)
    _say(progress, f"[cl-fed] results: {(run_dir / 'results.json').resolve()}")
    return run_dir


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cl_fed.run", description=__doc__.split("\n\n")[0])
    for key, default in DEFAULTS.items():  # every run-config key is a flag, same defaults
        parser.add_argument(f"--{key}", default=None, help=f"default: {default!r}")
    parser.add_argument("--site", default="all", help="a site name, or 'all' to pool every site (default)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    args = vars(parser.parse_args(argv))
    site, quiet, traceback = args.pop("site"), args.pop("quiet"), args.pop("traceback")
    try:
        cfg = make_config({k: v for k, v in args.items() if v is not None}, source="command line")
        run_single_site(cfg, site=site, progress=not quiet)
    except (ValueError, FileNotFoundError) as error:
        if traceback:
            raise
        parser.exit(2, f"{parser.prog}: error: {error}\n")  # one line, what to fix


if __name__ == "__main__":
    main()
