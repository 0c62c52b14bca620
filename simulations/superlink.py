"""A private local SuperLink (simulation engine) on free ports, for sweeps, benchmarks and tests.

`flwr run` otherwise submits to the machine-wide local SuperLink on port 39091, which keeps the
environment it was first started with (CL_FED_CACHE, FLWR_HOME, ...). Everything run inside
`private_superlink(...)` gets its own SuperLink with the given environment, stopped on exit;
`SharedSuperLink` keeps one for many runs and replaces it if it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from cl_fed.io import atomic_write_text
from simulations.flower import BIN, flower_env

logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per health poll under hydra's logging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_superlink(
    work_dir: str | Path, env: dict | None = None, start_timeout: float = 60.0
) -> tuple[subprocess.Popen, dict]:
    """Start `flower-superlink --simulation` on free ports with FLWR_HOME and its log under
    `work_dir`, and wait until it answers; returns the process and the environment that makes
    `flwr run` (simulations.flower.flwr_run(env=...)) submit to it. Stop it with stop(process)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    port, control = free_port(), free_port()
    env = flower_env(
        {
            "FLWR_HOME": str(work / "flwr-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control),
            **(env or {}),
        }
    )
    process = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{control}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-file",
            str(work / "superlink.log"),
        ],
        env=env,
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until_healthy(health_url(env), process, start_timeout, work / "superlink.log")
    except BaseException:
        stop(process)
        raise
    write_cli_config(Path(env["FLWR_HOME"]), port)
    return process, env


def write_cli_config(flwr_home: Path, port: int) -> None:
    """Name this SuperLink's address in the CLI's config.toml. With the default `:local:` address,
    `flwr run`/`flwr ls` find a dead SuperLink gone and silently start a detached one of their own
    on its ports, with none of its runs: a run being waited for then never finishes, and nothing
    stops that SuperLink. An explicit address makes them fail instead, which a retry can handle."""
    lines = ["[superlink]", 'default = "local"', "", "[superlink.local]", f'address = "127.0.0.1:{port}"']
    atomic_write_text(flwr_home / "config.toml", "\n".join([*lines, "insecure = true", ""]))


def health_url(env: dict) -> str:
    return f"http://127.0.0.1:{env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}/health"


@contextmanager
def private_superlink(work_dir: str | Path, env: dict | None = None, start_timeout: float = 60.0):
    """A SuperLink for the `with` block (start_superlink); yields the environment for `flwr run`."""
    process, env = start_superlink(work_dir, env, start_timeout)
    try:
        yield env
    finally:
        stop(process, env)


class SharedSuperLink:
    """One private SuperLink for many runs (a sweep, the quality benchmark): started on first use,
    started again when it has died or stopped answering, stopped by close(). Starting one costs
    seconds that a run per SuperLink paid every time."""

    def __init__(self, work_dir: str | Path, env: dict | None = None, start_timeout: float = 60.0):
        self.work_dir, self.extra, self.start_timeout = Path(work_dir), env, start_timeout
        self.process: subprocess.Popen | None = None
        self._env: dict = {}
        self.starts = 0

    def env(self) -> dict:
        """The environment for `flwr run`; (re)starts the SuperLink first unless it is healthy."""
        if not self.healthy():
            self.close()
            self.process, self._env = start_superlink(self.work_dir, self.extra, self.start_timeout)
            self.starts += 1
        return self._env

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        if not self.alive():
            return False
        try:
            return httpx.get(health_url(self._env), timeout=5.0).is_success
        except httpx.HTTPError:
            return False

    @property
    def log_path(self) -> Path:
        return self.work_dir / "superlink.log"

    def close(self) -> None:
        if self.process is not None:
            stop(self.process, self._env)
            self.process = None

    def __enter__(self) -> SharedSuperLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_until_healthy(
    url: str, process: subprocess.Popen, timeout: float, log_path: Path, verify: ssl.SSLContext | bool = True
) -> None:
    """Poll GET `url` (a SuperLink's /health) until it answers; an error naming `log_path` if the
    process exits or `timeout` seconds pass first. `verify`: the TLS context (a private CA) for https."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, verify=verify, timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the SuperLink did not come up at {url}; see {log_path}")
        time.sleep(0.3)


def stop(process: subprocess.Popen, env: dict | None = None, timeout: float = 30.0) -> None:
    """SIGTERM the SuperLink's process group, then SIGKILL what is left; and the simulations it
    started (`env`: its start_superlink environment). Each simulation runs in a session of its own
    and outlives a SuperLink that died: it must not write a run's folder beside that run's retry."""
    stop_group(process.pid, process, timeout)
    port = (env or {}).get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT")
    for pgid in simulation_groups(port) if port else []:
        stop_group(pgid, None, timeout)


def stop_group(pgid: int, leader: subprocess.Popen | None, timeout: float) -> None:
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while ((leader and leader.poll() is None) or group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if (leader and leader.poll() is None) or group_members(pgid):
        signal_group(pgid, signal.SIGKILL)
    if leader:
        leader.wait()


def simulation_groups(port: str | int) -> list[int]:
    """Process groups of the `flwr-simulation` processes talking to the SuperLink on `port` (its
    runtime API; the port is this SuperLink's alone, so no other simulation matches)."""
    address = f"127.0.0.1:{port}"
    groups = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not any(address in a for a in cmdline):
                continue
            if any(Path(part).name == "flwr-simulation" for part in cmdline[:2]):
                groups.append(os.getpgid(proc.pid))
        except (OSError, psutil.Error):
            continue
    return groups


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # nothing left of the group
        pass


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (zombies, which nobody may reap here, do not count)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members
