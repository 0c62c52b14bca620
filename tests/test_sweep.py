"""Hydra sweeps through real `flwr run` simulations: every combination once, resumable, reportable."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from torch import nn

from cl_fed.config import DEFAULTS, make_config
from cl_fed.models.tiny import LORA_TARGETS, build_tiny
from cl_fed.results import recompute_matrices
from simulations.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_config_is_the_run_config():
    import simulations.sweep  # noqa: F401  registers the `run` defaults from DEFAULTS

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "simulations" / "conf")):
        conf = compose(config_name="sweep", overrides=["seed=3", "centralize-every=2", "lora-rank=16"])
    values = {k: conf[k] for k in DEFAULTS}
    assert values == {**DEFAULTS, "seed": 3, "centralize-every": 2, "lora-rank": 16}
    assert conf.mode == "federated" and conf.sweep == "default"


def test_unknown_mode_is_a_clear_error(tmp_path):
    from simulations.sweep import run_one

    with pytest.raises(ValueError, match="mode='paper'"):
        run_one({"scenario": "tiny"}, "paper", tmp_path)


def test_interrupted_federated_run_is_resumed_from_its_checkpoint(tmp_path, monkeypatch):
    """A run directory holding the server's checkpoint (server.checkpoint.CHECKPOINT) but no complete
    results.json is run again with resume=true; without a checkpoint it starts afresh."""
    from contextlib import contextmanager

    import simulations.flower
    import simulations.superlink
    from server.checkpoint import CHECKPOINT
    from simulations.sweep import run_dir, run_one

    calls = []

    def fake_flwr_run(overrides, env=None, **kwargs):
        calls.append(dict(overrides))
        directory = run_dir(make_config(overrides), "federated")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "results.json").write_text(json.dumps({"complete": True}))
        return directory

    @contextmanager
    def fake_superlink(work_dir, env=None):
        yield {}

    monkeypatch.setattr(simulations.flower, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(simulations.superlink, "private_superlink", fake_superlink)
    interrupted = run_dir(make_config({"scenario": "tiny", "output-dir": str(tmp_path)}), "federated")
    interrupted.mkdir(parents=True)
    (interrupted / CHECKPOINT).write_bytes(b"")
    assert run_one({"scenario": "tiny"}, "federated", tmp_path) == (interrupted, True)
    assert run_one({"scenario": "tiny", "seed": 1}, "federated", tmp_path)[1]
    assert [c.get("resume") for c in calls] == [True, None]
    assert run_one({"scenario": "tiny"}, "federated", tmp_path) == (interrupted, False) and len(calls) == 2


@pytest.mark.slow
def test_sweep_runs_each_distinct_run_once_and_resumes(tmp_path):
    command = [
        sys.executable,
        "-m",
        "simulations.sweep",
        "-m",
        "scenario=tiny",
        "strategy=fedavg-lora",
        "centralize-every=round,stage",
        "rounds-per-stage=1",
        "sites=1",
        f"output-dir={tmp_path}",
    ]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # fedavg-lora uses no schedule: 2 combinations, 1 distinct run (each run costs a minute here)
    names = sorted(p.parent.name for p in tmp_path.glob("*/results.json"))
    assert names == ["tiny-fedavg-lora-sites1-rounds-per-stage1-seed0"]
    assert "[sweep 2/2]" in first.stdout and first.stdout.count("already complete, not run again") == 1
    # rerunning the same command runs nothing again
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already complete, not run again") == 2
    # the report's numbers are the run's numbers, which recompute from their predictions
    write_report(tmp_path)
    table = {row["run"]: row for row in csv.DictReader((tmp_path / "comparison.csv").open())}
    (name,) = names
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["config"]["rounds-per-stage"] == 1 and results["complete"]
    assert [r["clients_used"] for r in results["rounds"]] == [["factory-a"]] * 2  # sites=1: one SuperNode
    assert recompute_matrices(tmp_path / name)[0] == results["wer_matrix"]
    row = table[name.removeprefix("tiny-").removesuffix("-seed0")]
    assert float(row["awer_mean"]) == pytest.approx(results["metrics"]["awer"], abs=1e-4)
    # what a LoRA site uploads, counted independently: r x (in + out) fp32 numbers per adapted
    # Linear, once a round (2 rounds)
    speech = build_tiny(seed=0)
    adapted = [
        m
        for path, m in speech.model.named_modules()
        if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in LORA_TARGETS
    ]
    factors = sum(4 * speech.lora_rank * (m.in_features + m.out_features) for m in adapted)
    assert results["bytes_up"] == 2 * factors
    assert float(row["bytes_up_mean"]) == pytest.approx(2 * factors / 1e6, rel=1e-4)
