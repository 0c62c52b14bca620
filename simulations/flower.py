"""Run the Flower app through `flwr run`, and wait for it.

By default `flwr run` submits to the local simulation engine: a local SuperLink that it starts in
the background on first use (from the directory it was called in, with the caller's environment).
With `superlink=<name>` it submits to that SuperLink connection of the CLI's config.toml instead
(the Deployment Engine, see deploy/). `flwr run --stream` exits 0 even when the run failed, so the
outcome is read back with `flwr ls`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from cl_fed.config import make_config
from cl_fed.data.scenario import load_scenario
from cl_fed.paths import project_root

BIN = Path(sys.executable).parent


class FlowerRunError(RuntimeError):
    pass


def flower_env(extra: dict | None = None) -> dict:
    """Offline: no per-run dependency installation; the venv's Flower executables first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Ray's "Tip" FutureWarning at every simulation start (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO): its
    # remedy would let CPU-only ClientApps see every GPU, so the tip is silenced, not followed
    quiet = "ignore::FutureWarning:ray._private.worker"
    if quiet not in env.get("PYTHONWARNINGS", ""):
        env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS", ""), quiet]))
    env.update(extra or {})
    return env


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "") + "'"


def run_config_arg(overrides: dict) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())


def configure_local_federation(
    num_supernodes: int, cpus_per_client: int = 1, env: dict | None = None
) -> None:
    """Make plain `flwr run .` simulate one SuperNode per site on the local SuperLink (persistent)."""
    subprocess.run(
        [
            str(BIN / "flwr"),
            "federation",
            "simulation-config",
            "--num-supernodes",
            str(num_supernodes),
            "--client-resources-num-cpus",
            str(cpus_per_client),
        ],
        env=flower_env(env),
        check=True,
        capture_output=True,
        text=True,
        cwd=project_root(),
    )


def flwr_run(
    overrides: dict | None = None,
    *,
    num_supernodes: int | None = None,
    cpus_per_client: int = 1,
    simulation_cpus: int | None = None,
    env: dict | None = None,
    app_dir: Path | None = None,
    stream: bool = True,
    timeout: float | None = None,
    superlink: str | None = None,
) -> Path:
    """Run the app with these run-config overrides; returns the run directory (results.json).

    `superlink`: the name of a SuperLink connection in $FLWR_HOME/config.toml (a deployed
    federation, whose SuperNodes are already connected); None = the local simulation engine with
    `num_supernodes` simulated sites (default: the run config's `sites`, else the scenario's).
    Simulation workers: `simulation_cpus` (default: all of the machine's) // `cpus_per_client`;
    e.g. simulation_cpus=1 runs every site on one worker, one message after another."""
    overrides = dict(overrides or {})
    cfg = make_config(overrides)  # errors before anything starts
    app_dir = app_dir or project_root()
    command = [str(BIN / "flwr"), "run", str(app_dir)]
    if superlink:
        command += [superlink]
    else:
        if num_supernodes is None:
            num_supernodes = cfg.sites or len(load_scenario(cfg.scenario).sites)  # `sites`: the first N
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
        if simulation_cpus is not None:  # the CPUs the backend (Ray) may use: fewer workers
            federation += f" init-args-num-cpus={simulation_cpus}"
        command += ["--federation-config", federation]
    if stream:
        command += ["--stream"]
    if overrides:
        command += ["--run-config", run_config_arg(overrides)]
    env = flower_env(env)
    run_dir = cfg.run_dir()
    before = file_stamp(run_dir / "results.json")  # a resumed or repeated run may find an old one
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=app_dir
    )
    output = []
    for line in proc.stdout:  # show progress as it comes
        output.append(line)
        if stream:
            sys.stdout.write(line)
            sys.stdout.flush()
    proc.wait(timeout=timeout)
    text = "".join(output)
    found = re.search(r"Successfully started run (\d+)", text)
    if proc.returncode != 0 or not found:
        raise FlowerRunError(f"flwr run failed (exit {proc.returncode}):\n{text[-3000:]}")
    results = (run_dir / "results.json", before)
    status = wait_for_run(found.group(1), env, timeout, superlink, results=None if stream else results)
    if status.get("status") != "finished:completed":
        raise FlowerRunError(
            f"run {found.group(1)} ended as {status.get('status')!r}: "
            f"{status.get('status-details', '')}\n{text[-3000:]}"
        )
    return run_dir


def file_stamp(path: Path) -> tuple | None:
    """(mtime, size) of a file, None if absent: tells a newly written file from an old one."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def wait_for_run(
    run_id: str,
    env: dict,
    timeout: float | None = None,
    superlink: str | None = None,
    results: tuple[Path, tuple | None] | None = None,
) -> dict:
    """Wait until the SuperLink reports the run finished (`flwr run` without --stream returns at once).

    Each `flwr ls` costs about a second of CPU, which a 2-core machine's training would miss: the
    SuperLink is asked at intervals growing from 2 to 30 s, and every second once the run's
    `results` file, (path, file_stamp before the run), has been written anew (the ServerApp writes
    it last; on a remote SuperLink it never appears here and the intervals alone apply)."""
    deadline = time.monotonic() + (timeout or 24 * 3600)
    unknown, interval = 0, 2.0

    def written() -> bool:
        return results is not None and file_stamp(results[0]) not in (None, results[1])

    while True:
        status = run_status(run_id, env, superlink)
        if str(status.get("status", "")).startswith("finished") or time.monotonic() > deadline:
            return status
        unknown = 0 if status else unknown + 1
        if unknown >= 3:  # a SuperLink that restarted has lost its runs: this one would never finish
            raise FlowerRunError(f"run {run_id} is unknown to the SuperLink (did it restart?)")
        if written():  # the ServerApp is about to exit
            time.sleep(1.0)
            continue
        waited = 0.0
        while waited < interval and not written():
            time.sleep(0.25)
            waited += 0.25
        interval = min(interval * 1.5, 30.0)


def run_status(run_id: str, env: dict, superlink: str | None = None) -> dict:
    """The run's entry in `flwr ls` (status, status details); `superlink`: a connection name, else
    the default."""
    done = subprocess.run(
        [
            str(BIN / "flwr"),
            "ls",
            *([superlink] if superlink else []),
            "--run-id",
            run_id,
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:  # with its output, so that a retry can tell a SuperLink gone from a bug
        raise FlowerRunError(
            f"flwr ls failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
        )
    runs = json.loads(done.stdout).get("runs", [])
    return runs[0] if runs else {}
