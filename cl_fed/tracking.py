"""Experiment tracking: a run's config, rounds and evaluations to TensorBoard or MLflow (`tracking`).

    tracking=none          nothing (the default)
    tracking=tensorboard   <run-dir>/tensorboard/  event files (torch.utils.tensorboard; package tensorboard)
    tracking=mlflow        <run-dir>/mlruns/       an MLflow file store, offline (package mlflow-skinny)

Everything is read off the run's RunRecord (cl_fed.results), so every runner logs the same things with
the values results.json holds. The step is the server round (results.json `rounds[].server_round`,
1-based); step 0 is before any training.

    round/<key>           each round: loss, seconds, bytes_up, bytes_down, sites_used, sites_dropped,
                          num_examples, merged (0/1), lr_mean, audio_seconds, epsilon (DP), gate_seconds
    wer/<set>, cer/<set>  each evaluation: the starting base at step 0, then after each stage at the
                          server round of its last round (row i of wer_matrix; other test sets too)
    continual/<metric>    after each stage: AWER, BWT, forgetting, FWT, new-stage WER (and intransigence
                          with a joint reference) of the stages trained so far; after the last stage
                          these are results.json `metrics`
    run/<key>             at the end: wall_seconds, bytes_up, bytes_down (totals)
    config                TensorBoard: a text table at step 0; MLflow: the run's params

A runner opens a Tracker once, calls `sync(record)` whenever the record is settled (at every Checkpoint
step of the plan: after each round and after each stage's evaluation), and `finish(record, run_dir)`
after results.json is written. A fresh run replaces the run directory's logs, as it replaces
results.json. A resumed run (resume=true) logs its restored record again and goes on, so that every
step appears once: its TensorBoard logs are written anew from the record (which holds everything an
earlier attempt logged up to its checkpoint), and its MLflow run is continued, each (metric, step)
already in it skipped. A run that crashes leaves its MLflow run RUNNING until it is resumed.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

from cl_fed.config import TRACKING_BACKENDS

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_EXPERIMENT = "cl-fed"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}  # what `pip install` needs
ROUND_KEYS = (
    "loss",
    "seconds",
    "bytes_up",
    "bytes_down",
    "lr_mean",
    "audio_seconds",
    "epsilon",
    "gate_seconds",
)
METRIC_KEYS = ("awer", "bwt", "forgetting", "fwt", "new_stage_wer", "intransigence")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def round_metrics(entry: dict) -> dict[str, float]:
    """The scalars of one results.json `rounds` entry."""
    out = {f"round/{k}": v for k in ROUND_KEYS if (v := _number(entry.get(k))) is not None}
    for key, name in (("clients_used", "sites_used"), ("clients_dropped", "sites_dropped")):
        if isinstance(entry.get(key), list):
            out[f"round/{name}"] = float(len(entry[key]))
    examples = entry.get("num_examples")  # a count (in process) or one per site used (Flower)
    examples = sum(examples) if isinstance(examples, list) else examples
    if _number(examples) is not None:
        out["round/num_examples"] = float(examples)
    out["round/merged"] = float(bool(entry.get("merged")))
    return out


def _tag(name: str) -> str:
    """A test set's name as a metric name both back-ends take (MLflow: letters, digits, _-. /)."""
    return re.sub(r"[^\w.\- /]", "_", name)[:200]


def evaluation_metrics(evaluation) -> dict[str, float]:
    """An Evaluation's WER and CER per test set (a matrix row, plus the other test sets)."""
    return {
        **{f"wer/{_tag(name)}": float(value) for name, value in evaluation.wer.items()},
        **{f"cer/{_tag(name)}": float(value) for name, value in evaluation.cer.items()},
    }


def metrics_after(record, count: int) -> dict | None:
    """results.json `metrics` of the run as if it had stopped after its first `count` stages: the
    continual metrics of the stages trained so far (all of them: the run's own `metrics`)."""
    if record.schedule.get("mode") == "joint" or count >= len(record.stages):
        return record.to_json()["metrics"]
    cut = {}
    for name in ("joint_wer", "single_task_wer"):
        try:
            reference = record.reference(name)
        except ValueError:
            reference = None  # to_json would refuse it as well: no metrics from it
        cut[name] = reference[:count] if reference is not None else None
    partial = replace(record, stages=record.stages[:count], after_stage=record.after_stage[:count], **cut)
    return partial.to_json()["metrics"]


def evaluation_step(record, index: int) -> int:
    """The step of after_stage[index]: the server round of the last round of the stages it follows
    (joint training: of every round)."""
    rounds = [r for r in record.rounds if r.get("stage") is None or r["stage"] <= index]
    return max((int(r["server_round"]) for r in rounds), default=0)


class Tracker:
    """One run's logger; `Tracker.open("none", ...)` logs nothing."""

    def __init__(self, backend=None) -> None:
        self.backend = backend
        self.config_logged = False
        self.initial_logged = False
        self.rounds = 0  # record.rounds logged so far
        self.evaluations = 0  # record.after_stage logged so far

    @classmethod
    def open(cls, kind: str, run_dir: str | Path, *, resume: bool = False) -> Tracker:
        """The tracker of `tracking=kind` for the run in `run_dir`; `resume`: continue its logs."""
        if kind not in TRACKING_BACKENDS:
            raise ValueError(f"tracking={kind!r}; choose one of {', '.join(TRACKING_BACKENDS)}")
        if kind == "none":
            return cls()
        run_dir = Path(run_dir)
        folder = run_dir / (TENSORBOARD_DIR if kind == "tensorboard" else MLFLOW_DIR)
        backend_class = _TensorBoard if kind == "tensorboard" else _MLflow
        backend_class.check()  # before anything is removed
        if folder.exists() and (not resume or kind == "tensorboard"):
            # a fresh run replaces an earlier run's logs under the same name; a resumed one rewrites
            # its event files from the restored record (readers would show an earlier attempt's points
            # beside the new ones: event_accumulator purges no tensor summaries)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(backend_class(folder, run_dir.name, resume))

    def sync(self, record) -> None:
        """Log what the record holds that this tracker has not logged yet: the config, the starting
        base's evaluation, each round, each stage's evaluation and continual metrics."""
        if self.backend is None:
            return
        if not self.config_logged:
            self.backend.config(record.config)
            self.config_logged = True
        if record.initial is not None and not self.initial_logged:
            self.backend.metrics(evaluation_metrics(record.initial), 0)
            self.initial_logged = True
        for entry in record.rounds[self.rounds :]:
            self.backend.metrics(round_metrics(entry), int(entry["server_round"]))
        self.rounds = len(record.rounds)
        for index in range(self.evaluations, len(record.after_stage)):
            values = evaluation_metrics(record.after_stage[index])
            metrics = metrics_after(record, index + 1) or {}
            for key in METRIC_KEYS:
                if _number(metrics.get(key)) is not None:
                    values[f"continual/{key}"] = float(metrics[key])
            self.backend.metrics(values, evaluation_step(record, index))
        self.evaluations = len(record.after_stage)
        self.backend.flush()

    def finish(self, record, run_dir: str | Path) -> None:
        """The end of a run (after record.write): the last of the record, the totals, and (MLflow)
        results.json and report.md as artifacts; then the logs are closed."""
        if self.backend is None:
            return
        self.sync(record)
        data = record.to_json()
        step = max((int(r["server_round"]) for r in record.rounds), default=0)
        totals = {f"run/{k}": float(data[k]) for k in ("wall_seconds", "bytes_up", "bytes_down")}
        self.backend.metrics(totals, step)
        self.backend.finish(Path(run_dir), data)
        self.backend = None


def _require(module: str, backend: str, what: str) -> None:
    """A missing optional package is a one-line error naming the install command."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise ValueError(f"tracking={backend!r} needs {what}: pip install {PACKAGES[backend]}") from None


class _TensorBoard:
    @staticmethod
    def check() -> None:
        _require("torch.utils.tensorboard", "tensorboard", "the tensorboard package")

    def __init__(self, folder: Path, run_name: str, resume: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def config(self, config: dict) -> None:
        cells = {key: json.dumps(value).replace("|", "\\|") for key, value in config.items()}
        rows = "".join(f"| {key} | `{cell}` |\n" for key, cell in cells.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            # a double-precision tensor summary: the value read back equals results.json's
            self.writer.add_scalar(key, value, global_step=step, new_style=True, double_precision=True)

    def flush(self) -> None:
        self.writer.flush()

    def finish(self, run_dir: Path, data: dict) -> None:
        self.writer.close()


class _MLflow:
    @staticmethod
    def check() -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: nothing is sent anywhere
        # MLflow 3.x keeps the file store in maintenance mode and refuses it unless opted in; a file
        # store is a plain folder inside the run directory (no database, no server), which is the point
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _require("mlflow.tracking", "mlflow", "the MLflow client")

    def __init__(self, folder: Path, run_name: str, resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=folder.resolve().as_uri())
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(MLFLOW_EXPERIMENT)
        )
        runs = (
            self.client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
            if resume
            else []
        )
        self.resumed = bool(runs)
        if runs:
            self.run_id = runs[0].info.run_id
            self.params = set(runs[0].data.params)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            self.params = set()
        self.seen: dict[str, set[int]] = {}  # resumed: the steps of each metric already in the run

    def _logged(self, key: str, step: int) -> bool:
        if not self.resumed:
            return False
        if key not in self.seen:
            self.seen[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return step in self.seen[key]

    def config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in config.items()]
        params = [p for p in params if p.key not in self.params]  # params are immutable: a resume adds none
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.params |= {p.key for p in params}

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items() if not self._logged(k, step)]
        for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def flush(self) -> None:
        pass  # each log_batch is written at once

    def finish(self, run_dir: Path, data: dict) -> None:
        for name in ("results.json", "report.md"):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_tag(self.run_id, "complete", str(data["complete"]).lower())
        if data.get("base_checksum"):
            self.client.set_tag(self.run_id, "base_checksum", data["base_checksum"])
        self.client.set_terminated(self.run_id, "FINISHED")
