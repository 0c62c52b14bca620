"""Federated runs of the tiny scenario in-process: the real ServerApp loop and the real ClientApp
handlers and mods (tests/loopback.py), no `flwr run`.

A run resumed after an injected server crash ends exactly like an uninterrupted one, a wrong number
of sites is a clear error, and a differentially private run noises what it merges. The one real
`flwr run` simulation is in tests/test_flower_e2e.py; the real-process kill-and-resume is in
tests/test_deployment.py.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from flwr.app import MessageType
from loopback import (
    MODS,
    LoopbackGrid,
    one_thread_and_task_identity,  # noqa: F401  (autouse fixture)
    run_in_process,
    site_contexts,
)

from cl_fed.faults import InjectedCrash
from cl_fed.models.registry import load_model
from clients import client_app
from server import server_app
from server.checkpoint import CHECKPOINT


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_the_loopback_grid_installs_the_real_client_apps_mods():
    assert list(MODS) == client_app.app._mods  # same mods, same order as the real ClientApp


def test_resume_after_a_server_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    # one round per stage: the crash comes after stage 1, the resumed run does stage 2
    common = {"scenario": "tiny", "strategy": "fedavg-lora", "rounds-per-stage": 1}
    whole, whole_grid = run_in_process(
        {**common, "run-name": "inprocess-whole", "output-dir": str(tmp_path / "whole")}, sites=2
    )
    crashed_config = {**common, "run-name": "inprocess-crashed", "output-dir": str(tmp_path / "crashed")}
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"stop-after-round": 1}))
    monkeypatch.setenv("CL_FED_FAULTS_FILE", str(faults))
    with pytest.raises(InjectedCrash, match="after round 1"):
        run_in_process(crashed_config, sites=2)
    crashed_dir = tmp_path / "crashed" / "inprocess-crashed"
    assert (crashed_dir / CHECKPOINT).is_file()
    assert not (crashed_dir / "results.json").exists()
    monkeypatch.delenv("CL_FED_FAULTS_FILE")
    resumed, resumed_grid = run_in_process({**crashed_config, "resume": True}, sites=2)
    assert resumed == crashed_dir
    trains = [
        sum(m.metadata.message_type == MessageType.TRAIN for m in g.sent) for g in (whole_grid, resumed_grid)
    ]
    assert trains == [4, 2]  # the resumed run trained stage 2 only: it continued from the checkpoint
    a, b = results(whole), results(resumed)
    assert a["complete"] and b["complete"] and len(b["rounds"]) == 2
    assert a["wer_matrix"] == b["wer_matrix"] and a["cer_matrix"] == b["cer_matrix"]
    assert [r["loss"] for r in a["rounds"]] == [r["loss"] for r in b["rounds"]]
    assert a["base_checksum"] and a["base_checksum"] == b["base_checksum"]
    # fedavg-lora never merges: the saved model (base + live adapter) is where the runs could differ
    saved = [load_model(d / "model").model.state_dict() for d in (whole, resumed)]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_wrong_number_of_supernodes_is_a_clear_error(tmp_path, monkeypatch):
    run_config = {"scenario": "tiny", "output-dir": str(tmp_path)}  # the tiny scenario has 2 sites
    more = LoopbackGrid(site_contexts(run_config, 3))
    with pytest.raises(ValueError, match="3 SuperNodes are connected but the data has 2 sites"):
        server_app.run_server(more, run_config)
    # fewer: the server waits for the rest (120 s), then gives up; here it gives up at once
    monkeypatch.setattr(server_app, "wait_for_sites", functools.partial(server_app.wait_for_sites, timeout=0))
    fewer = LoopbackGrid(site_contexts(run_config, 1))
    with pytest.raises(ValueError, match="only 1 SuperNodes connected .* the data has 2 sites"):
        server_app.run_server(fewer, run_config)
    assert more.sent == fewer.sent == []  # refused before any message


def test_differential_privacy_run_noises_what_it_merges(tmp_path, monkeypatch):
    """dp-clip 0.2 is above every update of the tiny scenario (0.10..0.14): nothing is clipped, so
    all that separates this run from the one without DP is the noise."""
    from safetensors.torch import load_file

    from cl_fed.models.tiny import LORA_TARGETS
    from cl_fed.privacy import epsilon

    clipped, flowers_mod = [], client_app.fixedclipping_mod  # the ClientApp's mod runs around DP training

    def counting_fixedclipping_mod(msg, context, call_next):
        clipped.append(context.node_id)
        return flowers_mod(msg, context, call_next)

    monkeypatch.setattr(client_app, "fixedclipping_mod", counting_fixedclipping_mod)
    common = {
        "scenario": "tiny",
        "merge": "factors",
        "weighting": "uniform",
        "rounds-per-stage": 1,  # 2 rounds in all
        "output-dir": str(tmp_path),
    }
    noised, _ = run_in_process({**common, "dp-noise": 0.5, "dp-clip": 0.2}, sites=2)
    assert sorted(clipped) == [101, 101, 102, 102]  # 2 sites x 2 rounds
    plain, _ = run_in_process(common, sites=2)
    assert len(clipped) == 4  # DP off: the mod passes the message through
    assert noised != plain
    noised_results = results(noised)
    assert noised_results["complete"] and len(noised_results["rounds"]) == 2
    assert [r["dp_noise_std"] for r in noised_results["rounds"]] == [0.5 * 0.2 / 2] * 2
    privacy = noised_results["privacy"]
    assert privacy["rounds"] == 2 and privacy["noise_multiplier"] == 0.5 and privacy["clipping_norm"] == 0.2
    assert 0 < privacy["epsilon"] == epsilon(0.5, 1.0, 2, 1e-5) < float("inf")
    assert "## Differential privacy" in (noised / "report.md").read_text()
    assert "dp_noise_std" not in results(plain)["rounds"][0]
    # the merged bases differ, in the LoRA-targeted weights only, by far more than float rounding
    a, b = load_file(noised / "model" / "model.safetensors"), load_file(plain / "model" / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in LORA_TARGETS and k.endswith(".weight") for k in changed)
    assert max(float((a[k] - b[k]).abs().max()) for k in changed) > 1e-3
