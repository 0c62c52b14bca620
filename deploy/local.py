"""A whole Deployment-Engine federation on this machine: up, one run, down.

    python -m deploy.local --scenario tiny [--sites 2] [--work deploy-work]
                           [--run-config "rounds-per-stage=1"]

Makes the certificates (deploy/certs.py), starts a SuperLink with TLS and SuperNode authentication,
registers one key per site, starts one SuperNode per site (node config `site=<site> data=<scenario>`:
each SuperNode points at its data itself), runs the app with `flwr run . <federation>`, checks the
run completed, prints where results.json is, and stops every process it started. Logs stay in the
work directory (see deploy/federation.py for its layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cl_fed.config import make_config
from cl_fed.continual import prepare_data
from deploy.federation import local_federation
from simulations.flower import flwr_run


def parse_run_config(text: str) -> dict:
    """'k1=v1 k2=v2' -> {k1: v1, ...} (values as strings; make_config reads their types)."""
    pairs = [item.split("=", 1) for item in text.split()]
    bad = [item for item in pairs if len(item) != 2]
    if bad:
        raise ValueError(f"--run-config: expected key=value pairs, got {'='.join(bad[0])!r}")
    return {key: value.strip("'\"") for key, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenario", default="tiny", help="packaged scenario name, scenario YAML or manifest"
    )
    parser.add_argument("--sites", type=int, default=0, help="SuperNodes: the data's first N sites (0 = all)")
    parser.add_argument("--work", type=Path, default=Path("deploy-work"), help="certificates, logs, runs")
    parser.add_argument("--run-config", default="", help="more run-config overrides, 'key=value ...'")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the run may take")
    args = parser.parse_args(argv)

    overrides = {
        "scenario": args.scenario,
        "output-dir": str((args.work / "runs").resolve()),
        **parse_run_config(args.run_config),
    }
    if args.sites:
        overrides["sites"] = args.sites
    if Path(args.scenario).suffix or "/" in args.scenario:
        overrides["scenario"] = str(Path(args.scenario).resolve())  # every process resolves it the same way
    _, stream = prepare_data(make_config(overrides))  # errors (and data generation) before anything starts
    start = time.perf_counter()
    print(
        f"[deploy] {len(stream.sites)} SuperNodes ({', '.join(stream.sites)}), "
        f"work dir {args.work.resolve()}",
        flush=True,
    )
    with local_federation(
        args.work, stream.sites, overrides["scenario"], tls=not args.insecure, auth=not args.insecure
    ) as federation:
        print(
            f"[deploy] SuperLink {federation.address} and {len(stream.sites)} SuperNodes up after "
            f"{time.perf_counter() - start:.0f} s; running `flwr run . {federation.name}`",
            flush=True,
        )
        run_dir = flwr_run(overrides, superlink=federation.name, env=federation.cli_env, timeout=args.timeout)
    results = json.loads((run_dir / "results.json").read_text())
    print(
        f"[deploy] done in {time.perf_counter() - start:.0f} s; every process stopped; "
        f"AWER {results['metrics']['awer']:.1f}%"
    )
    print(f"[deploy] results: {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
