"""`make demo`: the default federated continual-learning run, offline, then where its results are.

Four simulated factories, three stages, the embedded tiny FastConformer, `centralization`
merging every stage. The first run synthesises the scenario's speech and pre-trains the base
(cached in .cache/); later runs start at once.
"""

from __future__ import annotations

import json
import sys
import time

from cl_fed.config import make_config
from cl_fed.data.scenario import load_scenario
from simulations.flower import configure_local_federation, flwr_run


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    cfg = make_config()
    sites = len(load_scenario(cfg.scenario).sites)
    print(
        f"[cl-fed demo] scenario {cfg.scenario!r}: {sites} sites; strategy {cfg.strategy}, "
        f"centralize every {cfg.centralize_every}; running `flwr run .` on the local simulation engine",
        flush=True,
    )
    configure_local_federation(sites)  # afterwards plain `flwr run .` simulates the same federation
    run_dir = flwr_run(num_supernodes=sites).resolve()
    results = json.loads((run_dir / "results.json").read_text())
    print((run_dir / "report.md").read_text())
    m = results["metrics"]
    print(
        f"[cl-fed demo] done in {time.perf_counter() - start:.0f} s: AWER {m['awer']:.1f}%, "
        f"BWT {m['bwt']:+.1f}, forgetting {m['forgetting']:.1f}"
    )
    print(f"[cl-fed demo] results: {run_dir / 'results.json'}")
    print(f"[cl-fed demo] report:  {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
