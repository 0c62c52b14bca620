"""Merge gates and rollback in real runs of the `drill` scenario (3 sites, 3 short stages on the
default scenario's committed base): the single-site runner's history rolls back to every step's
recorded base; a federated run (the real ServerApp loop and ClientApp handlers in process,
tests/loopback.py) with a site whose transcripts are shuffled leaves that site out, says why, and
ends better than the same run without the gate."""

from __future__ import annotations

import json

import pytest
from flwr.app import MessageType
from loopback import one_thread_and_task_identity, run_in_process  # noqa: F401  (autouse fixture)

from cl_fed import protocol as P
from cl_fed.config import make_config
from cl_fed.continual import prepare_data, starting_model, state_checksum
from cl_fed.history import MergeHistory
from cl_fed.io import read_tensors_meta
from cl_fed.models.registry import load_model
from cl_fed.run import run_single_site
from clients.site import state_dir
from simulations import history as history_cli

pytestmark = pytest.mark.slow  # about 4 min of runs on 2 cores (make test runs them; test-fast does not)
FAULTY = "factory-b"


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_every_step_of_a_3_stage_run_rolls_back_to_the_base_the_run_held(tmp_path, capsys):
    cfg = make_config(
        {"scenario": "drill", "rounds-per-stage": 1, "local-epochs": 1, "output-dir": str(tmp_path)}
    )
    run_dir = run_single_site(cfg, progress=False)
    steps = MergeHistory(run_dir).load()["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    assert [s["stage_name"] for s in steps[1:]] == ["welding-hum", "logistics-hall", "codeswitch"]
    assert all(s["contributions"][0]["sites"] == ["all"] for s in steps[1:])
    assert all(s["evaluation"]["wer"].keys() >= {"welding-hum", "foundation"} for s in steps)
    # the ends are known independently: the starting base, and the run's final base
    scenario, _ = prepare_data(cfg, progress=False)
    start = state_checksum(dict(starting_model(cfg, scenario, progress=False).model.state_dict()))
    assert steps[0]["checksum_after"] == start
    assert steps[-1]["checksum_after"] == results(run_dir)["base_checksum"]
    for step in steps:
        out = tmp_path / f"base-{step['step']}"
        assert history_cli.main([str(run_dir), "rollback", "--to", str(step["step"]), "--out", str(out)]) == 0
        reloaded = state_checksum(dict(load_model(out).model.state_dict()))
        assert reloaded == step["checksum_after"]
        assert (step["step"] == 0) == (reloaded == start)
    assert history_cli.main([str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "| 3 | codeswitch | 1 | all | 1 | " + steps[3]["checksum_after"][:12] in table
    assert history_cli.main([str(run_dir), "rollback", "--to", "7", "--out", str(tmp_path / "x")]) == 2
    assert "no step 7; the history has steps 0..3" in capsys.readouterr().err


def test_the_gate_leaves_out_a_faulty_site_and_beats_the_ungated_run(tmp_path):
    common = {
        "scenario": "drill",
        "rounds-per-stage": 1,
        "drill": f"shuffle-transcripts:{FAULTY}",
        "gate-max-regression": 3.0,
    }
    ungated, _ = run_in_process({**common, "output-dir": str(tmp_path / "ungated")}, sites=3)
    gated, _ = run_in_process(
        {**common, "merge-gate": "validate", "gate-sites": "alone", "output-dir": str(tmp_path / "gated")},
        sites=3,
    )
    plain, with_gate = results(ungated), results(gated)
    for entry in with_gate["rounds"]:
        assert FAULTY not in entry["clients_used"]
        (dropped,) = [d for d in entry["clients_dropped"] if d["site"] == FAULTY]
        assert (
            dropped["reason"].startswith("rejected: merge gate: ") and "validation WER" in dropped["reason"]
        )
        assert entry["gate_sites"][FAULTY]["passed"] is False
    assert all(FAULTY in entry["clients_used"] for entry in plain["rounds"])
    # every merge decision is recorded with its numbers, and the history names who contributed
    # (a stage in which no site passed has nothing to merge, and so no merge decision)
    decided = [d["stage_name"] for d in with_gate["gate"]]
    assert decided and set(decided) <= set(with_gate["stages"])
    assert all(d["validation_wer_before"] and d["tries"] for d in with_gate["gate"])
    steps = MergeHistory(gated).load()["steps"][1:]
    assert steps and all(FAULTY not in c["sites"] for s in steps for c in s["contributions"])
    assert with_gate["metrics"]["awer"] < plain["metrics"]["awer"]


def test_a_federated_history_rolls_back_and_bad_input_is_one_line(tmp_path, capsys):
    run_dir, _ = run_in_process(
        {"scenario": "tiny", "rounds-per-stage": 1, "centralize-every": "round", "output-dir": str(tmp_path)},
        sites=2,
    )
    steps = MergeHistory(run_dir).load()["steps"]
    assert len(steps) == 3 and steps[1]["contributions"][0]["sites"] == ["factory-a", "factory-b"]
    out = tmp_path / "back"
    assert history_cli.main([str(run_dir), "rollback", "--to", "1", "--out", str(out)]) == 0
    assert state_checksum(dict(load_model(out).model.state_dict())) == steps[1]["checksum_after"]
    assert history_cli.main([str(run_dir), "rollback", "--to", "1", "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert history_cli.main([str(tmp_path / "nothing")]) == 2
    assert "no merge history" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["gate-sites"])
def test_the_single_site_runner_refuses_what_needs_a_federation(key, tmp_path):
    cfg = make_config(
        {"scenario": "tiny", "merge-gate": "validate", key: "alone", "output-dir": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="scores each site's update alone"):
        run_single_site(cfg, progress=False)


def test_a_resumed_run_rolls_back_and_the_sites_get_only_the_undo(tmp_path):
    config = {
        "scenario": "tiny",
        "rounds-per-stage": 1,
        "run-name": "rollback-drill",
        "output-dir": str(tmp_path),
    }
    run_dir, _ = run_in_process(config, sites=2)
    steps = MergeHistory(run_dir).load()["steps"]
    assert len(steps) == 3 and steps[1]["checksum_after"] != steps[2]["checksum_after"]
    # the sites were last sent the base after step 1 (the last merge's base went to no round)
    _, grid = run_in_process({**config, "resume": True, "rollback-to": 0}, sites=2)
    after = results(run_dir)
    (rollback,) = after["rollbacks"]
    assert rollback["to"] == 0 and rollback["checksum"] == steps[0]["checksum_after"]
    assert after["base_checksum"] == steps[0]["checksum_after"]
    history = MergeHistory(run_dir).load()["steps"]
    assert history[3]["kind"] == "rollback" and history[3]["checksum_after"] == steps[0]["checksum_after"]
    # the broadcast: the undo of the first merge as update operations, not every weight
    (message, *_) = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert message.content[P.CONFIG][P.SYNC] == P.SYNC_CHANGED
    sent = message.content[P.WEIGHTS].to_torch_state_dict()
    assert 0 < len(sent) < len(load_model(run_dir / "model").model.state_dict())
    for site in ("factory-a", "factory-b"):  # every site holds the rolled-back base, bit for bit
        meta = read_tensors_meta(state_dir(run_dir, site) / "state.safetensors")
        assert meta["checksum"] == steps[0]["checksum_after"]


def test_with_federated_evaluation_the_sites_score_the_gate_on_their_own_rows(tmp_path):
    run_dir, grid = run_in_process(
        {
            "scenario": "tiny",
            "rounds-per-stage": 1,
            "merge-gate": "validate",
            "evaluation": "federated",
            "output-dir": str(tmp_path),
        },
        sites=2,
    )
    asked = [
        list(m.content[P.CONFIG][P.TEST_SETS])
        for m in grid.sent
        if m.metadata.message_type == MessageType.EVALUATE
    ]
    assert ["val/en-welding"] in asked and ["val/de-codeswitch", "val/en-welding"] in asked
    decisions = results(run_dir)["gate"]
    assert [d["stage_name"] for d in decisions] == ["en-welding", "de-codeswitch"]
    assert all(v == v for d in decisions for v in d["validation_wer_before"].values())  # scored (not NaN)
