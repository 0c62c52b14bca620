"""A private local SuperLink (simulation engine) on free ports, for sweeps, benchmarks and tests.

`flwr run` otherwise submits to the machine-wide local SuperLink on port 39091, which keeps the
environment it was first started with (CL_FED_CACHE, FLWR_HOME, ...). Everything run inside
`private_superlink(...)` gets its own SuperLink with the given environment, stopped on exit.
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

from simulations.flower import BIN, flower_env

logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per health poll under hydra's logging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_superlink(work_dir: str | Path, env: dict | None = None, start_timeout: float = 60.0):
    """Start `flower-superlink --simulation` with FLWR_HOME and logs under `work_dir`; yields the
    environment that makes `flwr run` (simulations.flower.flwr_run(env=...)) submit to it."""
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
        wait_until_healthy(f"http://127.0.0.1:{port}/health", process, start_timeout, work / "superlink.log")
        yield env
    finally:
        stop(process)


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


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the process group (the SuperLink and the simulation it spawned), then SIGKILL."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
