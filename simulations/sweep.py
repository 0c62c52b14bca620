"""Hydra sweeps: every combination of run-config values, each run through `flwr run`.

    python -m simulations.sweep -m strategy=fedavg,centralization centralize-every=1,3 seed=0,1,2
    python -m simulations.sweep -m scenario=tiny strategy=centralization,fedavg-lora seed=0,1 sweep=tiny
    python -m simulations.report runs/sweeps/tiny

Keys are the run-config keys of `cl_fed.config.DEFAULTS` (scenario, model, strategy,
centralize-every, merge, lora-rank, rounds-per-stage, sites, seed, ...), plus `sweep` (the name
of the sweep folder) and `mode`: `federated` runs the Flower app on Flower's simulation engine
(a private SuperLink per run; the same path as `flwr run .`), `single-site` runs the paper's
setting (`cl_fed.run`), `joint` the centralized joint-training upper bound.

Resumable: a run whose results.json is complete is not run again (rerun the same command after an
interruption; a run stopped midway resumes from its last round's checkpoint), and combinations
that train the same way (e.g. fedavg under two schedules, which it ignores) run once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cl_fed.config import DEFAULTS, RunConfig, make_config
from cl_fed.paths import runs_root

MODES = ("federated", "single-site", "joint")

ConfigStore.instance().store(name="run", node=dict(DEFAULTS))  # the one list of defaults
OmegaConf.register_new_resolver(
    "sweep_dir", lambda name, output_dir: str(sweep_dir(str(name), str(output_dir or ""))), replace=True
)


def sweep_dir(name: str, output_dir: str = "") -> Path:
    return Path(output_dir) if output_dir else runs_root() / "sweeps" / name


def run_dir(cfg: RunConfig, mode: str) -> Path:
    """Where a run of this sweep writes: named after everything that changes its results."""
    from cl_fed.run import joint_run_name

    if mode == "joint":
        return Path(cfg.output_dir) / joint_run_name(cfg)
    name = cfg.default_run_name()
    if mode == "single-site" and not cfg.run_name:
        name += "-single-all"
    return Path(cfg.output_dir) / name


def is_complete(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "results.json").read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError):
        return False


def run_one(overrides: dict, mode: str, output_dir: Path) -> tuple[Path, bool]:
    """Run one configuration unless it is complete already; returns (run directory, ran)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
    overrides = {**overrides, "output-dir": str(output_dir)}
    cfg = make_config(overrides, source="sweep")
    directory = run_dir(cfg, mode)
    if is_complete(directory):
        return directory, False
    if mode == "federated":
        from server.checkpoint import CHECKPOINT
        from simulations.flower import flwr_run
        from simulations.superlink import private_superlink

        if (directory / CHECKPOINT).is_file():
            overrides["resume"] = True  # a run interrupted midway goes on from its last round
        with private_superlink(Path(output_dir) / ".flower") as env:
            flwr_run(overrides, env=env)
    elif mode == "single-site":
        from cl_fed.run import run_single_site

        run_single_site(cfg)
    else:
        from cl_fed.run import run_joint

        run_joint(cfg)
    if not is_complete(directory):
        raise RuntimeError(f"the run ended without a complete {directory / 'results.json'}")
    return directory, True


class SweepProgress(Callback):
    """Counts the sweep's runs for the progress lines (hydra runs jobs one after another in-process)."""

    total = 1
    started = 0.0
    ran: list[float] = []

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        SweepProgress.total = sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
        SweepProgress.started = time.monotonic()
        SweepProgress.ran = []


def progress_line(index: int, name: str) -> str:
    total, ran = SweepProgress.total, SweepProgress.ran
    elapsed = time.monotonic() - SweepProgress.started if SweepProgress.started else 0.0
    line = f"[sweep {index + 1}/{total}] {name}"
    if ran:
        left = sum(ran) / len(ran) * (total - index)
        line += f" ({elapsed / 60:.1f} min so far, at most ~{left / 60:.0f} min left)"
    return line


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep")
def main(conf: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    values = OmegaConf.to_container(conf, resolve=True)
    overrides = {k: values[k] for k in DEFAULTS if values[k] != DEFAULTS[k] and k != "output-dir"}
    output_dir = sweep_dir(str(conf.sweep), str(conf["output-dir"] or ""))
    index = HydraConfig.get().job.get("num", 0) or 0
    name = run_dir(make_config({**overrides, "output-dir": str(output_dir)}, source="sweep"), conf.mode).name
    print(progress_line(index, f"{name}: {conf.mode} run"), flush=True)
    start = time.monotonic()
    try:
        directory, ran = run_one(overrides, conf.mode, output_dir)
    except Exception as err:
        print(f"[sweep {index + 1}/{SweepProgress.total}] {name} FAILED: {err}", file=sys.stderr, flush=True)
        raise
    if ran:
        SweepProgress.ran.append(time.monotonic() - start)
        print(
            f"[sweep {index + 1}/{SweepProgress.total}] {name}: done in {time.monotonic() - start:.0f} s",
            flush=True,
        )
    else:
        print(
            f"[sweep {index + 1}/{SweepProgress.total}] {name}: already complete, not run again", flush=True
        )
    print(f"[sweep] results: {directory}   report: python -m simulations.report {output_dir}", flush=True)


if __name__ == "__main__":
    from simulations.sweep import main as sweep  # one module object for hydra's callback and the task

    sweep()
