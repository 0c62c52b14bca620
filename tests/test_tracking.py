"""Experiment tracking (cl_fed/tracking.py): what TensorBoard and MLflow hold is results.json.

Real tiny runs (single-site runner, and the ServerApp loop in process with a crash and a resume); the
event files and the MLflow file store are read back with their own readers.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import pytest
from loopback import (
    one_thread_and_task_identity,  # noqa: F401  (autouse fixture)
    run_in_process,
)

from cl_fed.config import make_config
from cl_fed.faults import InjectedCrash
from cl_fed.run import run_joint, run_single_site
from cl_fed.tracking import MLFLOW_EXPERIMENT, Tracker

TINY = {"scenario": "tiny", "rounds-per-stage": 1}


# ---- reading the logs back ---------------------------------------------------------------------
def read_tensorboard(run_dir) -> tuple[dict[str, dict[int, float]], str]:
    """{tag: {step: value}} of every scalar, and the config text; a step logged twice is an error."""
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={TENSORS: 0})
    accumulator.Reload()
    series, config = {}, ""
    for tag in accumulator.Tags()["tensors"]:
        events = accumulator.Tensors(tag)
        if tag == "config/text_summary":
            config = make_ndarray(events[-1].tensor_proto).item().decode()
            continue
        series[tag] = {e.step: make_ndarray(e.tensor_proto).item() for e in events}
        assert len(series[tag]) == len(events), f"{tag}: a step logged twice"
    return series, config


def read_mlflow(run_dir):
    """{metric: {step: value}} of the run's one MLflow run, and the run; a step logged twice is an error."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # a resumed run continues its MLflow run
    run = runs[0]
    series = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        series[key] = {m.step: m.value for m in history}
        assert len(series[key]) == len(history), f"{key}: a step logged twice"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    return series, run, artifacts


def expected(results: dict) -> tuple[dict[str, dict[int, float]], dict[str, float], int]:
    """What the logs must hold, from results.json alone: {key: {step: value}} of the rounds and the
    WER/CER rows, the continual metrics at the last step, and that step."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    rounds, stages = results["rounds"], results["stages"]
    for r in rounds:
        step = r["server_round"]
        for key in ("loss", "seconds", "bytes_up", "bytes_down", "lr_mean", "audio_seconds"):
            if r.get(key) is not None:
                out[f"round/{key}"][step] = r[key]
        examples = r["num_examples"]  # a count (in process), one per site used (Flower)
        out["round/num_examples"][step] = sum(examples) if isinstance(examples, list) else examples
        out["round/sites_used"][step] = len(r["clients_used"])
        out["round/sites_dropped"][step] = len(r["clients_dropped"])
        out["round/merged"][step] = float(r["merged"])
    other = results["other_test_sets"]
    for kind in ("wer", "cer"):
        for j, stage in enumerate(stages):
            out[f"{kind}/{stage}"][0] = results[f"initial_{kind}"][j]
        for name, values in other.items():
            out[f"{kind}/{name}"][0] = values[f"initial_{kind}"]
        for i, row in enumerate(results[f"{kind}_matrix"]):
            step = max(r["server_round"] for r in rounds if r["stage"] is None or r["stage"] <= i)
            for j, stage in enumerate(stages):
                out[f"{kind}/{stage}"][step] = row[j]
            for name, values in other.items():
                out[f"{kind}/{name}"][step] = values[kind][i]
    last = max(r["server_round"] for r in rounds)
    for key in ("bytes_up", "bytes_down", "wall_seconds"):
        out[f"run/{key}"][last] = results[key]
    metrics = {f"continual/{k}": v for k, v in results["metrics"].items() if isinstance(v, float)}
    return dict(out), metrics, last


def assert_logged_equals_results(series: dict, results: dict) -> None:
    want, metrics, last = expected(results)
    for key, values in want.items():
        assert series[key] == values, key  # exact: the same floats, each step once
    assert {"continual/awer", "continual/bwt"} <= metrics.keys()
    for key, value in metrics.items():
        assert series[key][last] == value, key
    # after the first stage: the continual metrics of one stage (AWER = its own WER)
    first = max(r["server_round"] for r in results["rounds"] if r["stage"] in (0, None))
    assert series["continual/awer"][first] == results["wer_matrix"][0][0]
    assert set(series) == set(want) | set(metrics)  # nothing else


# ---- single-site runner ------------------------------------------------------------------------
def test_single_site_run_logs_results_json_to_tensorboard(tmp_path):
    cfg = make_config({**TINY, "tracking": "tensorboard", "output-dir": str(tmp_path)})
    run_dir = run_single_site(cfg, progress=False)
    results = json.loads((run_dir / "results.json").read_text())
    series, config = read_tensorboard(run_dir)
    assert_logged_equals_results(series, results)
    assert '| tracking | `"tensorboard"` |' in config and "| seed | `0` |" in config
    assert not (run_dir / "mlruns").exists()


def test_single_site_run_logs_results_json_to_mlflow(tmp_path):
    # two rounds a stage: a stage's evaluation is logged at its last round's step
    cfg = make_config({**TINY, "rounds-per-stage": 2, "tracking": "mlflow", "output-dir": str(tmp_path)})
    run_dir = run_single_site(cfg, progress=False)
    results = json.loads((run_dir / "results.json").read_text())
    series, run, artifacts = read_mlflow(run_dir)
    assert_logged_equals_results(series, results)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["tracking"] == "mlflow" and run.data.params["rounds-per-stage"] == "2"
    assert run.data.tags["base_checksum"] == results["base_checksum"]
    assert {"results.json", "report.md"} <= artifacts
    assert not (run_dir / "tensorboard").exists()


def test_joint_run_logs_its_one_evaluation(tmp_path):
    cfg = make_config({**TINY, "rounds-per-stage": 2, "tracking": "tensorboard", "output-dir": str(tmp_path)})
    run_dir = run_joint(cfg, progress=False)
    results = json.loads((run_dir / "results.json").read_text())
    series, _ = read_tensorboard(run_dir)
    assert series["wer/en-welding"] == {0: results["initial_wer"][0], 2: results["wer_matrix"][0][0]}
    assert series["continual/awer"] == {2: results["metrics"]["awer"]}
    assert series["round/loss"] == {r["server_round"]: r["loss"] for r in results["rounds"]}


# ---- the ServerApp: a crash and a resume log every step once -----------------------------------
@pytest.mark.parametrize("tracking", ["tensorboard", "mlflow"])
def test_resumed_federated_run_logs_every_step_once(tmp_path, monkeypatch, tracking):
    config = {**TINY, "tracking": tracking, "run-name": "tracked", "output-dir": str(tmp_path)}
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"stop-after-round": 1}))
    monkeypatch.setenv("CL_FED_FAULTS_FILE", str(faults))
    with pytest.raises(InjectedCrash, match="after round 1"):
        run_in_process(config, sites=2)  # logged: the starting base, round 1, the first stage
    monkeypatch.delenv("CL_FED_FAULTS_FILE")
    run_dir, _ = run_in_process({**config, "resume": True}, sites=2)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and all(len(r["clients_used"]) == 2 for r in results["rounds"])
    if tracking == "tensorboard":
        assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # written anew
        series, _ = read_tensorboard(run_dir)
    else:
        series, run, artifacts = read_mlflow(run_dir)
        assert run.info.status == "FINISHED" and "results.json" in artifacts
    assert_logged_equals_results(series, results)
    assert series["round/sites_used"] == {1: 2.0, 2: 2.0}
    assert series["round/bytes_up"][1] > 0 and series["round/bytes_down"][2] > 0


# ---- the key ---------------------------------------------------------------------------------
def test_tracking_key_and_a_missing_package_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"tracking='wandb'; choose one of none, tensorboard, mlflow"):
        make_config({"tracking": "wandb"})
    assert make_config({"tracking": "mlflow"}).default_run_name() == make_config({}).default_run_name()
    Tracker.open("none", tmp_path / "run").sync(None)  # none: no backend, nothing read or written
    assert not (tmp_path / "run").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(ValueError, match=r"^tracking='tensorboard' needs .*: pip install tensorboard$"):
        Tracker.open("tensorboard", tmp_path / "run")
    with pytest.raises(ValueError, match=r"^tracking='mlflow' needs .*: pip install mlflow-skinny$"):
        Tracker.open("mlflow", tmp_path / "run")
    assert not (tmp_path / "run").exists()
