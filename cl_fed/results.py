"""The results format every runner writes (single-site runner, Flower ServerApp, sweeps).

    <output-dir>/<run-name>/
        results.json            config, strategy, schedule, stages, wer/cer matrices, metrics, rounds, ...
        predictions/after-NN-<label>.jsonl   one row per test utterance of every evaluated test set
        model/                  the final base (save_pretrained; load with cl_fed.models.load_model)
        report.md               a human summary

Row i of a matrix is the evaluation after training through stage i; column j is stage j's test
set (the joint-training upper bound, schedule mode "joint", has a single row). `initial_wer` is the
starting base on every stage's test set (row "before stage 0"), which forward transfer needs
(`metrics.fwt_definition` says which FWT was computed). Optional references, null unless the
runner was given them: `joint_wer`, the joint-training model's WER on every stage's test set, from
which `metrics.intransigence` is computed (the comparison report also pairs runs with joint runs
itself), and `single_task_wer`, models fine-tuned on one stage alone, which FWT then uses
(`fwt_definition` "single-task" instead of "initial"). Everything else in results.json can be
recomputed from the predictions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cl_fed.io import atomic_write_json, atomic_write_text
from cl_fed.metrics import cer, continual_metrics, intransigence, wer

FORMAT = "cl-fed-results/1"


@dataclass
class Evaluation:
    """WER/CER of one model on every test set, with the predictions behind them."""

    label: str  # "initial" or the stage just trained
    wer: dict[str, float]  # test set name -> WER (%)
    cer: dict[str, float]
    predictions: list[dict]  # {"test_set", "id", "reference", "hypothesis"}
    # federated evaluation: each site's WER on its own share of every test set ({site: {set: WER}});
    # `wer` then pools every site's counts (for local and fedsa, each site scores its own model)
    site_wer: dict[str, dict[str, float]] = field(default_factory=dict)


def score_predictions(predictions: list[dict], test_sets: list[str]) -> tuple[dict, dict]:
    """Per-test-set WER and CER from prediction rows (what the checks recompute)."""
    wers, cers = {}, {}
    for name in test_sets:
        rows = [p for p in predictions if p["test_set"] == name]
        if not rows:
            raise ValueError(f"no predictions for test set {name!r}")
        refs = [p["reference"] for p in rows]
        hyps = [p["hypothesis"] for p in rows]
        wers[name], cers[name] = wer(refs, hyps), cer(refs, hyps)
    return wers, cers


@dataclass
class RunRecord:
    """Everything a run accumulates; `write` turns it into the results format."""

    run_name: str
    strategy: str
    schedule: dict
    config: dict
    stages: list[str]
    initial: Evaluation | None = None
    after_stage: list[Evaluation] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    privacy: dict | None = None  # DP runs: cl_fed.privacy.privacy_report after the last round
    base_checksum: str | None = None  # the final committed base (cl_fed.continual.state_checksum)
    # references, each a WER (%) per stage's test set, in `stages` order or keyed by stage name:
    # joint training on all data (intransigence; e.g. a joint run's results.json "wer_matrix"[0]) and
    # single-task fine-tuning (FWT against single-task models instead of the initial base)
    joint_wer: Sequence[float] | Mapping[str, float] | None = None
    single_task_wer: Sequence[float] | Mapping[str, float] | None = None
    gate: list[dict] = field(default_factory=list)  # merge-gate decisions (cl_fed.gate), in order
    rollbacks: list[dict] = field(default_factory=list)  # rollback-to on resume (server/server_app.py)

    def matrix(self, kind: str) -> list[list[float]]:
        return [[getattr(e, kind)[s] for s in self.stages] for e in self.after_stage]

    def reference(self, name: str) -> list[float] | None:
        """Reference `name` ("joint_wer", "single_task_wer") as a list in `stages` order; a reference
        of the wrong shape is an error."""
        given = getattr(self, name)
        if given is None:
            return None
        if isinstance(given, Mapping):
            missing = [s for s in self.stages if s not in given]
            if missing:
                raise ValueError(f"{name} has no WER for stage(s) {missing}")
            return [float(given[s]) for s in self.stages]
        values = [float(v) for v in given]
        if len(values) != len(self.stages):
            raise ValueError(f"{name} has {len(values)} entries for {len(self.stages)} stages")
        return values

    def to_json(self) -> dict:
        wer_matrix, cer_matrix = self.matrix("wer"), self.matrix("cer")
        initial_wer = [self.initial.wer[s] for s in self.stages] if self.initial else None
        joint = self.schedule.get("mode") == "joint"  # one model trained on everything: one row
        complete = len(self.after_stage) == (1 if joint else len(self.stages))
        joint_wer, single_task_wer = self.reference("joint_wer"), self.reference("single_task_wer")
        # an unscorable (NaN) reference leaves what needs it undefined (FWT falls back to the initial
        # base, and says so in fwt_definition), never the other metrics
        single_task = (
            single_task_wer if single_task_wer and all(map(math.isfinite, single_task_wer)) else None
        )
        try:  # a test set nobody could score (NaN) leaves the metrics undefined, not the run lost
            metrics = (
                continual_metrics(wer_matrix, initial=initial_wer, single_task=single_task)
                if complete and not joint
                else None
            )
            if complete and joint:
                metrics = {
                    "awer": continual_metrics([wer_matrix[0]] * len(self.stages))["awer"],
                    "new_stage_wer": None,
                    "bwt": None,
                    "forgetting": None,
                    "fwt": None,
                    "fwt_definition": None,
                    "intransigence": None,
                }
        except ValueError:
            metrics = None
        if metrics is not None and not joint and joint_wer is not None and all(map(math.isfinite, joint_wer)):
            metrics["intransigence"] = intransigence(wer_matrix, joint_wer)
        extra = sorted({k for e in self.after_stage for k in e.wer} - set(self.stages))
        return {
            "format": FORMAT,
            "run_name": self.run_name,
            "strategy": self.strategy,
            "schedule": self.schedule,
            "config": self.config,
            "stages": self.stages,
            "complete": complete,
            "wer_matrix": wer_matrix,
            "cer_matrix": cer_matrix,
            "initial_wer": initial_wer,
            "initial_cer": [self.initial.cer[s] for s in self.stages] if self.initial else None,
            "joint_wer": joint_wer,
            "single_task_wer": single_task_wer,
            # other test sets (e.g. the foundation domain): WER before the first stage and after each
            "other_test_sets": {
                k: {
                    "initial_wer": self.initial.wer.get(k) if self.initial else None,
                    "initial_cer": self.initial.cer.get(k) if self.initial else None,
                    "wer": [e.wer.get(k) for e in self.after_stage],
                    "cer": [e.cer.get(k) for e in self.after_stage],
                }
                for k in extra
            },
            "metrics": metrics,
            "rounds": self.rounds,
            "bytes_up": sum(r.get("bytes_up", 0) for r in self.rounds),
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.rounds),
            "wall_seconds": round(self.wall_seconds, 3),
            "base_checksum": self.base_checksum,
            **({"sites": self.site_results()} if self.initial and self.initial.site_wer else {}),
            **({"privacy": self.privacy} if self.privacy else {}),
            **({"gate": self.gate} if self.gate else {}),
            **({"rollbacks": self.rollbacks} if self.rollbacks else {}),
        }

    def site_results(self) -> dict[str, dict]:
        """Per site (federated evaluation): its WER on its own share of every stage's test set, before
        the first stage and after each, and the continual metrics of that matrix (None until complete
        or where a share is empty); `site_mean` averages those metrics over the sites."""
        out = {}
        joint = self.schedule.get("mode") == "joint"
        for site in self.initial.site_wer:
            initial = [self.initial.site_wer[site].get(s, math.nan) for s in self.stages]
            matrix = [
                [e.site_wer.get(site, {}).get(s, math.nan) for s in self.stages] for e in self.after_stage
            ]
            metrics = None
            if not joint and len(matrix) == len(self.stages):
                try:
                    metrics = continual_metrics(matrix, initial=initial)
                except ValueError:  # a share this site has no rows of (NaN)
                    metrics = None
            out[site] = {"initial_wer": initial, "wer_matrix": matrix, "metrics": metrics}
        scored = [v["metrics"] for v in out.values() if v["metrics"]]
        keys = ("awer", "bwt", "forgetting", "new_stage_wer")
        mean = {k: sum(m[k] for m in scored) / len(scored) for k in keys} if scored else None
        return {"site_mean": mean, "by_site": out}

    def write(self, run_dir: str | Path) -> Path:
        run_dir = Path(run_dir)
        evaluations = ([self.initial] if self.initial else []) + self.after_stage
        for index, evaluation in enumerate(evaluations):
            name = f"after-{index:02d}-{evaluation.label}.jsonl"
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in evaluation.predictions)
            atomic_write_text(run_dir / "predictions" / name, lines)
        data = self.to_json()
        atomic_write_json(run_dir / "results.json", data)
        atomic_write_text(run_dir / "report.md", render_report(data))
        return run_dir / "results.json"


def load_predictions(run_dir: str | Path) -> list[tuple[str, list[dict]]]:
    """(label, rows) for every evaluation written, in order (initial first when present)."""
    files = sorted((Path(run_dir) / "predictions").glob("after-*.jsonl"))
    out = []
    for path in files:
        label = path.stem.split("-", 2)[2]
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        out.append((label, rows))
    return out


def recompute_matrices(run_dir: str | Path) -> tuple[list[list[float]], list[list[float]]]:
    """WER and CER matrices recomputed from the saved predictions alone."""
    results = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    stages = results["stages"]
    evaluations = load_predictions(run_dir)
    if results.get("initial_wer") is not None:
        evaluations = evaluations[1:]
    wer_rows, cer_rows = [], []
    for _, rows in evaluations:
        w, c = score_predictions(rows, stages)
        wer_rows.append([w[s] for s in stages])
        cer_rows.append([c[s] for s in stages])
    return wer_rows, cer_rows


def _fmt(value, digits=1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_report(data: dict) -> str:
    stages = data["stages"]
    lines = [
        f"# Run `{data['run_name']}`",
        "",
        f"Strategy **{data['strategy']}**, schedule `{json.dumps(data['schedule'])}`, "
        f"wall time {data['wall_seconds']:.0f} s.",
        "",
        "## WER (%) matrix",
        "",
        "Row: after training through that stage. Column: that stage's test set.",
        "",
        "| after \\ test | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    if data.get("initial_wer"):
        lines.append("| (initial base) | " + " | ".join(_fmt(v) for v in data["initial_wer"]) + " |")
    labels = ["all stages at once (joint)"] if data["schedule"].get("mode") == "joint" else stages
    for stage, row in zip(labels, data["wer_matrix"]):
        lines.append(f"| {stage} | " + " | ".join(_fmt(v) for v in row) + " |")
    m = data.get("metrics") or {}
    lines += [
        "",
        "## Continual metrics",
        "",
        f"- AWER (mean WER after the last stage): {_fmt(m.get('awer'))}",
        f"- BWT (negative = forgetting): {_fmt(m.get('bwt'))}",
        f"- Forgetting (>= 0): {_fmt(m.get('forgetting'))}",
        f"- FWT (positive = earlier stages helped unseen ones): {_fmt(m.get('fwt'))}"
        + (f" (definition: {m['fwt_definition']})" if m.get("fwt_definition") else ""),
        f"- New-stage WER (mean of the diagonal): {_fmt(m.get('new_stage_wer'))}",
        f"- Intransigence (new-stage WER minus joint training's): {_fmt(m.get('intransigence'))}",
    ]
    for name, series in data.get("other_test_sets", {}).items():
        lines.append(f"- {name} test set WER after each stage: " + ", ".join(_fmt(v) for v in series["wer"]))
    sites = data.get("sites")
    if sites:
        lines += ["", "## Per site (each site's share of the test sets)", ""]
        for site, part in sites["by_site"].items():
            sm = part["metrics"] or {}
            lines.append(f"- {site}: AWER {_fmt(sm.get('awer'))}, BWT {_fmt(sm.get('bwt'))}")
        mean = sites.get("site_mean") or {}
        lines.append(f"- mean over sites: AWER {_fmt(mean.get('awer'))}, BWT {_fmt(mean.get('bwt'))}")
    dropped = sum(len(r.get("clients_dropped", [])) for r in data["rounds"])
    lines += [
        "",
        "## Communication",
        "",
        f"- rounds: {len(data['rounds'])}, client updates dropped: {dropped}",
        f"- bytes up: {data['bytes_up']:,}  bytes down: {data['bytes_down']:,}",
        "",
    ]
    privacy = data.get("privacy")
    if privacy:
        lines += [
            "## Differential privacy",
            "",
            f"- ({privacy['epsilon']:.3g}, {privacy['delta']:g})-DP per {privacy['unit']}, "
            f"after {privacy['rounds']} noised aggregations",
            f"- noise multiplier {privacy['noise_multiplier']:g}, "
            f"clipping norm {privacy['clipping_norm']:g}, sampling: {privacy['sampling']}",
            f"- accountant: {privacy['accountant']}",
            "",
        ]
    return "\n".join(lines)


def wer_line(label: str, wers: dict[str, float]) -> str:
    """`[cl-fed] after welding-hum: WER welding-hum 36.2, ...`: one progress line per evaluation."""
    return f"[cl-fed] {label}: WER " + ", ".join(f"{k} {v:.1f}" for k, v in wers.items())
