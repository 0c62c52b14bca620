"""Quality benchmark: centralization schedules vs FedAvg baselines vs local, the single-site paper
mode and a joint-training upper bound, on one scenario, over seeds; then the comparison report.

    python -m simulations.quality                       # default scenario, seeds 0 and 1
    python -m simulations.quality --seeds 0,1,2 --out runs/quality-3seeds

Every federated row runs through `flwr run` (Flower's simulation engine), exactly as a sweep does;
rerunning skips the runs already complete. Writes <out>/comparison.md (the README's quality table),
comparison.csv and the plots.
"""

from __future__ import annotations

import argparse
import time

from cl_fed.paths import runs_root
from simulations.report import write_report
from simulations.sweep import run_one

# (mode, run-config overrides): the rows of the quality table
ROWS = [
    ("federated", {"strategy": "centralization", "centralize-every": "round"}),
    ("federated", {"strategy": "centralization", "centralize-every": "stage"}),
    ("federated", {"strategy": "centralization", "centralize-every": "stage", "merge": "factors"}),
    ("federated", {"strategy": "centralization", "centralize-every": "3"}),
    ("federated", {"strategy": "fedavg"}),
    ("federated", {"strategy": "fedavg-lora"}),
    ("federated", {"strategy": "local"}),
    ("single-site", {"strategy": "centralization", "centralize-every": "stage"}),
    ("single-site", {"strategy": "fedavg"}),
    ("joint", {}),
    # differential privacy (site-level DP-FedAvg) at two noise levels; the no-DP reference is row 3
    (
        "federated",
        {
            "strategy": "centralization",
            "centralize-every": "stage",
            "merge": "factors",
            "weighting": "uniform",
            "dp-noise": 0.3,
        },
    ),
    (
        "federated",
        {
            "strategy": "centralization",
            "centralize-every": "stage",
            "merge": "factors",
            "weighting": "uniform",
            "dp-noise": 1.0,
        },
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    parser.add_argument(
        "--out", default=None, help="folder for the runs and the report (default: runs/quality)"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated row numbers (1-based), run in this order"
    )
    args = parser.parse_args(argv)
    out = args.out or str(runs_root() / "quality")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    order = [int(i) for i in args.only.split(",")] if args.only else range(1, len(ROWS) + 1)
    rows = [ROWS[i - 1] for i in order]
    jobs = [
        (mode, {**overrides, "scenario": args.scenario, "seed": seed})
        for seed in seeds
        for mode, overrides in rows
    ]
    start = time.monotonic()
    for index, (mode, overrides) in enumerate(jobs, 1):
        print(
            f"[quality {index}/{len(jobs)}] {mode} {overrides} "
            f"({(time.monotonic() - start) / 60:.1f} min so far)",
            flush=True,
        )
        directory, ran = run_one(overrides, mode, out)
        print(
            f"[quality {index}/{len(jobs)}] {'done' if ran else 'already complete'}: {directory}", flush=True
        )
    write_report(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
