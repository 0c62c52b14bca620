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
import time
from dataclasses import replace
from pathlib import Path

from cl_fed.adapters import adapter_state, attach_lora, base_state, load_base_state, reset_adapters
from cl_fed.centralize import AdapterPool, centralize
from cl_fed.config import DEFAULTS, RunConfig, make_config
from cl_fed.continual import (
    evaluate_all,
    lora_spec,
    prepare_data,
    round_seed,
    starting_model,
    test_sets,
    train_config,
)
from cl_fed.paths import runs_root
from cl_fed.results import RunRecord
from cl_fed.train import train_local

SINGLE_SITE_STRATEGIES = ("centralization", "fedavg", "fedavg-lora")


def run_single_site(cfg: RunConfig, site: str = "all", progress: bool = True) -> Path:
    """Run the continual loop on one site; returns the run directory."""
    if cfg.strategy not in SINGLE_SITE_STRATEGIES:
        raise ValueError(
            f"strategy={cfg.strategy!r} needs several sites; the single-site runner "
            f"takes {', '.join(SINGLE_SITE_STRATEGIES)}"
        )
    refuse_privacy(cfg)
    start = time.perf_counter()
    scenario, stream = prepare_data(cfg, progress=progress)
    stages = stream.stages
    schedule = cfg.schedule(len(stages))
    sites = stream.sites if site == "all" else [site]
    if site != "all" and site not in stream.sites:
        raise ValueError(f"site={site!r} is not in the data; sites: {', '.join(stream.sites)}")
    speech = starting_model(cfg, scenario, progress=progress)
    sets = test_sets(stream)
    run_name = cfg.default_run_name() if cfg.run_name else f"{cfg.default_run_name()}-single-{site}"
    run_dir = Path(cfg.output_dir or runs_root()) / run_name
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
    record.initial = evaluate_all(speech, sets, "initial")

    lora = cfg.strategy != "fedavg"
    if lora:
        spec = lora_spec(cfg, speech)
        speech.model = attach_lora(speech.model, spec, seed=round_seed(cfg, 0, 0))
    pool = AdapterPool(schedule.every) if cfg.strategy == "centralization" else None

    def merge(adapters, weights, seed):
        merged = centralize(base_state(speech.model), adapters, weights, spec.scale, cfg.merge)
        load_base_state(speech.model, merged)
        reset_adapters(speech.model, seed)

    views = {s: stream.site(s) for s in sites}
    for t, stage in enumerate(stages):
        data = [u for s in sites for u in views[s].enter(t)]
        if not data:
            raise ValueError(f"stage {stage!r} has no training data for site(s) {sites}")
        for r in range(cfg.rounds_per_stage):
            seed = round_seed(cfg, t, r)
            result = train_local(speech, data, train_config(cfg, full=not lora, seed=seed, progress=progress))
            entry = {
                "stage": t,
                "stage_name": stage,
                "round": r,
                "loss": result.loss,
                "num_examples": result.num_examples,
                "audio_seconds": result.audio_seconds,
                "seconds": result.wall_seconds,
                "bytes_up": 0,
                "bytes_down": 0,
                "clients_used": [site],
                "clients_dropped": [],
                "merged": False,
            }
            if pool is not None and schedule.merge_after_round():
                merge([adapter_state(speech.model)], [1.0], round_seed(cfg, t, r + 1))
                entry["merged"] = True
            record.rounds.append(entry)
            _say(
                progress,
                f"[cl-fed] stage {t + 1}/{len(stages)} {stage} round {r + 1}/{cfg.rounds_per_stage}: "
                f"loss {result.loss:.3f}, {result.audio_seconds / max(result.wall_seconds, 1e-9):.0f}x real time",
            )
        pending = None
        if pool is not None and schedule.unit == "stage":
            pool.add(adapter_state(speech.model))
            next_seed = round_seed(cfg, t + 1, 0)
            if schedule.merge_after_stage(t):
                merge(*pool.drain(), next_seed)
                record.rounds[-1]["merged"] = True
            else:  # a fresh adapter for the next chunk; evaluate as if the pool were merged now
                reset_adapters(speech.model, next_seed)
                pending = base_state(speech.model)
                load_base_state(speech.model, centralize(pending, *pool.pending(), spec.scale, cfg.merge))
        record.after_stage.append(evaluate_all(speech, sets, stage))
        if pending is not None:
            load_base_state(speech.model, pending)
        row = record.after_stage[-1].wer
        _say(progress, f"[cl-fed] after {stage}: WER " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    record.wall_seconds = time.perf_counter() - start
    speech.save(run_dir / "model")
    record.write(run_dir)
    _say(progress, f"[cl-fed] results: {(run_dir / 'results.json').resolve()}")
    return run_dir


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
    cfg = replace(cfg, strategy="fedavg").effective()  # full fine-tuning: no schedule, no LoRA knobs
    run_name = joint_run_name(cfg)
    run_dir = Path(cfg.output_dir or runs_root()) / run_name
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
    record.initial = evaluate_all(speech, sets, "initial")
    data = [u for s in stream.sites for t in range(len(stream.stages)) for u in stream.site(s).enter(t)]
    for r in range(cfg.rounds_per_stage):
        result = train_local(
            speech, data, train_config(cfg, full=True, seed=round_seed(cfg, 0, r), progress=progress)
        )
        record.rounds.append(
            {
                "stage": None,
                "stage_name": "all",
                "round": r,
                "loss": result.loss,
                "num_examples": result.num_examples,
                "audio_seconds": result.audio_seconds,
                "seconds": result.wall_seconds,
                "bytes_up": 0,
                "bytes_down": 0,
                "clients_used": ["all"],
                "clients_dropped": [],
                "merged": False,
            }
        )
        _say(progress, f"[cl-fed] joint round {r + 1}/{cfg.rounds_per_stage}: loss {result.loss:.3f}")
    record.after_stage.append(evaluate_all(speech, sets, "joint"))
    record.wall_seconds = time.perf_counter() - start
    speech.save(run_dir / "model")
    record.write(run_dir)
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
    args = vars(parser.parse_args(argv))
    site, quiet = args.pop("site"), args.pop("quiet")
    cfg = make_config({k: v for k, v in args.items() if v is not None}, source="command line")
    run_single_site(cfg, site=site, progress=not quiet)


if __name__ == "__main__":
    main()
