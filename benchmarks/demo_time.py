"""Time the default run (`make demo`) from an empty cache and again with everything cached.

    python -m benchmarks.demo_time [--scenario default]

Targets (issue 11): <= 15 minutes from a fresh clone including `make install` (about 1.5 min;
speech synthesis included, the default base is committed), <= 6 minutes when cached.
Uses a private cache and FLWR_HOME so it measures a cold start whatever the machine has cached;
prints the figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import tempfile
import time
from pathlib import Path

from cl_fed.data.scenario import load_scenario
from simulations.flower import flwr_run
from simulations.superlink import private_superlink


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", default="default")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cl-fed-demo-time-"))
    os.environ["CL_FED_CACHE"] = str(work / "cache")  # empty: the first run starts cold
    sites = len(load_scenario(args.scenario).sites)
    figures = []
    # its own SuperLink: one that is already running keeps the environment (and cache) it started with
    with private_superlink(work, {"CL_FED_CACHE": str(work / "cache")}) as env:
        for label in ("cold (empty cache)", "cached"):
            start = time.perf_counter()
            log = work / f"{label.split()[0]}.log"
            # streamed, as `make demo` runs it (the log goes to a file)
            with open(log, "w") as out, contextlib.redirect_stdout(out):
                run_dir = flwr_run(
                    {"scenario": args.scenario, "output-dir": str(work / "runs")},
                    num_supernodes=sites,
                    env=env,
                )
            figures.append((label, time.perf_counter() - start, run_dir))
    assert (work / "cache" / "speech").is_dir(), "the run did not use the benchmark's private cache"
    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    for label, seconds, run_dir in figures:
        print(f"{label:>20}: {seconds / 60:5.1f} min  ({run_dir})")


if __name__ == "__main__":
    main()
