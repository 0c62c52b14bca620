"""Time the default run (`make demo`) from an empty cache and again with everything cached.

    python -m benchmarks.demo_time [--scenario default]

Targets (issue 4): under 10 minutes from a fresh clone once installed (speech synthesis and base
pre-training included), under 5 minutes when cached. Uses a private cache and FLWR_HOME so it
measures a cold start whatever the machine has cached; prints the figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

from cl_fed.data.scenario import load_scenario
from simulations.flower import flwr_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="default")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cl-fed-demo-time-"))
    # its own local SuperLink on free ports: a SuperLink that is already running keeps the
    # environment (and so the cache) it was started with
    env = {"CL_FED_CACHE": str(work / "cache"), "FLWR_HOME": str(work / "flwr-home"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    os.environ.update(env)  # this process generates nothing itself, but keep it consistent
    sites = len(load_scenario(args.scenario).sites)
    figures = []
    for label in ("cold (empty cache)", "cached"):
        start = time.perf_counter()
        run_dir = flwr_run({"scenario": args.scenario, "output-dir": str(work / "runs")}, num_supernodes=sites,
                           env=env, stream=False)
        figures.append((label, time.perf_counter() - start, run_dir))
    assert (work / "cache" / "speech").is_dir(), "the run did not use the benchmark's private cache"
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    for label, seconds, run_dir in figures:
        print(f"{label:>20}: {seconds / 60:5.1f} min  ({run_dir})")
    os.system("pkill -f 'flower-superlink.*" + str(work) + "' >/dev/null 2>&1")


if __name__ == "__main__":
    main()
