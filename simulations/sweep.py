"""Hydra sweeps: every combination of run-config values, each run through `flwr run`.

    python -m simulations.sweep -m strategy=fedavg,centralization centralize-every=1,3 seed=0,1,2
    python -m simulations.sweep -m scenario=tiny strategy=centralization,fedavg-lora seed=0,1 sweep=tiny
    python -m simulations.report runs/sweeps/tiny

Keys are the run-config keys of `cl_fed.config.DEFAULTS` (scenario, model, strategy,
centralize-every, merge, lora-rank, rounds-per-stage, sites, seed, ...), plus `sweep` (the name
of the sweep folder) and `mode`: `federated` runs the Flower app on Flower's simulation engine
(one private SuperLink for the whole sweep; the same path as `flwr run .`), `single-site` runs the paper's
setting (`cl_fed.run`), `joint` the centralized joint-training upper bound.

Resumable: a run whose results.json is complete is not run again (rerun the same command after an
interruption; a run stopped midway resumes from its last round's checkpoint), and combinations
that train the same way (e.g. fedavg under two schedules, which it ignores) run once. A run that
fails for infrastructure reasons (Ray start-up, the SuperLink gone) is retried twice from its
checkpoint; other failures are not.
"""

from __future__ import annotations

import atexit
import json
import re
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


def run_one(overrides: dict, mode: str, output_dir: Path, env: dict | None = None) -> tuple[Path, bool]:
    """Run one configuration unless it is complete already; returns (run directory, ran).
    `env`: the environment of a SuperLink to submit federated runs to (SharedSuperLink.env());
    None starts a private one for this run only."""
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
        if env is not None:
            flwr_run(overrides, env=env)
        else:
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


# (pattern, short reason): failures of the machinery around a run, not of the run itself. Each names
# something only Ray, the SuperLink or the Flower CLI says, so that a bug in our code, whose
# traceback shares the same output, is not mistaken for one.
INFRASTRUCTURE = [
    (r"timed out during startup", "Ray node start-up timed out"),
    (r"\bGCS\b|gcs_server|GcsClient|GcsRpc", "Ray GCS not reachable"),
    (r"raylet died|raylet (?:crashed|exited|is terminated)|RayletDied|marked dead", "Ray raylet died"),
    (r"ActorDiedError|ActorUnavailableError|WorkerCrashedError|NodeDiedError", "a Ray worker died"),
    (r"ray\.exceptions\.OutOfMemoryError|node running low on memory", "Ray killed a worker for memory"),
    (r"Connection to the SuperLink is unavailable", "SuperLink not reachable"),
    (
        r"Connection refused|ConnectError|ConnectTimeout|failed to connect to all addresses",
        "connection refused",
    ),
    (r"StatusCode\.UNAVAILABLE|Server disconnected|RemoteProtocolError", "SuperLink connection lost"),
    (r"SuperLink did not come up|Failed to start local SuperLink", "SuperLink did not start"),
    (r"shared SuperLink died", "SuperLink died"),
    (r"unknown to the SuperLink", "the SuperLink lost the run"),
]
ATTEMPTS = 3  # a run and up to two retries


def infrastructure_failure(text: str) -> str | None:
    """Why a failed run's error text (exception, `flwr run` output, SuperLink log) is an infrastructure
    failure worth retrying, in a few words; None for a genuine error (config, our code)."""
    for pattern, reason in INFRASTRUCTURE:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return reason
    return None


def run_with_retries(
    overrides: dict, mode: str, output_dir: Path, superlink=None, name: str = "", attempts: int = ATTEMPTS
) -> tuple[Path, bool]:
    """run_one, retried (resuming from the run's checkpoint) when it fails for infrastructure reasons.
    `superlink`: a simulations.superlink.SharedSuperLink for federated runs (restarted if it died);
    None gives each attempt a private one."""
    for attempt in range(1, attempts + 1):
        log_start = _log_size(superlink)
        try:
            env = superlink.env() if superlink is not None and mode == "federated" else None
            return run_one(overrides, mode, output_dir, env=env)
        except Exception as err:
            if mode != "federated" or attempt == attempts:
                raise  # single-site and joint runs have no infrastructure of their own
            reason = infrastructure_failure(_failure_text(err, superlink, log_start))
            if reason is None:
                raise
            what = f"infrastructure failure ({reason}); attempt {attempt + 1}/{attempts}"
            print(f"[retry] {name or mode}: {what}", flush=True)
            if superlink is not None:
                # a fresh SuperLink, and the failed attempt's simulation stopped: one that lost only its
                # `flwr run` may still be training, and would write the run's folder beside the retry
                superlink.close()
    raise AssertionError("unreachable")


def _log_size(superlink) -> int:
    try:
        return superlink.log_path.stat().st_size if superlink is not None else 0
    except OSError:
        return 0


def _failure_text(err: Exception, superlink, log_start: int) -> str:
    """The error, plus what the shared SuperLink logged during the attempt (the simulation's own
    errors, e.g. Ray's, may only be there) and whether it is still running."""
    text = f"{type(err).__name__}: {err}"
    if superlink is not None:
        try:
            with superlink.log_path.open("rb") as log:
                log.seek(log_start)
                text += "\n" + log.read()[-20000:].decode("utf-8", "replace")
        except OSError:
            pass
        if superlink.process is not None and not superlink.alive():
            text += "\nthe shared SuperLink died"
    return text


_SHARED: dict = {}  # the sweep process's one SuperLink: {"superlink": SharedSuperLink}


def shared_superlink(output_dir: Path):
    """The SuperLink every federated run of this hydra sweep submits to: started on first use (a
    sweep of single-site runs starts none), stopped at the end of the multirun or at exit."""
    from simulations.superlink import SharedSuperLink

    work = Path(output_dir) / ".flower"
    current = _SHARED.get("superlink")
    if current is None or current.work_dir != work:
        if current is not None:
            current.close()
        current = _SHARED["superlink"] = SharedSuperLink(work)
        atexit.register(current.close)
    return current


def close_shared_superlink() -> None:
    superlink = _SHARED.pop("superlink", None)
    if superlink is not None:
        superlink.close()


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

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        close_shared_superlink()


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
        superlink = shared_superlink(output_dir) if conf.mode == "federated" else None
        directory, ran = run_with_retries(overrides, conf.mode, output_dir, superlink, name)
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
