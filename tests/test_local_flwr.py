"""The `local` strategy through a real `flwr run` simulation: every site runs the centralization plan
alone on its own data, so each site must end exactly where the single-site runner ends on that
site's data (same run config, strategy centralization).

One simulation worker serves both sites (more sites than workers): each message may find the
worker holding the other site, so a site's state must come back from its state file, not from
memory.
"""

import json

import pytest
import torch

from cl_fed.config import make_config
from cl_fed.run import run_single_site
from simulations.flower import flwr_run
from simulations.superlink import private_superlink

pytestmark = pytest.mark.slow
SITES = ["factory-a", "factory-b"]  # the tiny scenario's


def single_site(config: dict, site: str) -> dict:
    """results.json of the single-site runner on `site`, on one torch thread as the ClientApp trains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = run_single_site(make_config(config), site=site, progress=False)
    finally:
        torch.set_num_threads(threads)
    return json.loads((run_dir / "results.json").read_text())


def test_local_sites_end_where_the_single_site_runner_ends(tmp_path):
    common = {"scenario": "tiny", "rounds-per-stage": 2}
    with private_superlink(tmp_path / "flower") as env:
        run_dir = flwr_run(
            {**common, "strategy": "local", "output-dir": str(tmp_path / "runs")},
            num_supernodes=len(SITES),
            simulation_cpus=1,  # one worker for the two sites
            env=env,
            stream=False,
            timeout=1800,
        )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy"] == "local" and results["complete"]
    assert len(results["rounds"]) == 2 * 2  # 2 stages x 2 rounds
    assert all(sorted(r["clients_used"]) == SITES and r["clients_dropped"] == [] for r in results["rounds"])
    assert results["bytes_up"] == 0  # nothing but figures leaves a local site
    held = results["rounds"][-1]["site_checksums"]
    assert sorted(held) == SITES
    single = {
        site: single_site(
            {**common, "strategy": "centralization", "output-dir": str(tmp_path / "single")}, site
        )
        for site in SITES
    }
    for site in SITES:
        assert single[site]["complete"] and single[site]["base_checksum"]
        assert held[site] == single[site]["base_checksum"], site
    # the two sites trained on different data: they end in different places
    assert held[SITES[0]] != held[SITES[1]]
