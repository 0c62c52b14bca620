"""Compare the runs of a sweep: a table (markdown and CSV) and plots, from the runs' results.json only.

    python -m simulations.report runs/sweeps/default [--out DIR]

Runs that differ only in their seed form one row (mean and sample standard deviation over seeds).
Intransigence pairs every continual run with the joint-training run (strategy "joint") of the same
scenario and seed found anywhere under the folder; n/a where there is none.
Writes into the sweep folder (or --out):
    comparison.md, comparison.csv   AWER, BWT, forgetting, FWT (and its definition), new-stage WER,
                                    intransigence, bytes, wall time
    heatmaps.png                    the mean WER matrix of every row (after stage i, test set j)
    forgetting_curves.png           WER on each stage's test set after every stage, per row
    wer_vs_bytes.png                AWER against bytes communicated (federated rows)
Metric definitions: README "Results and metrics"; cl_fed/metrics.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cl_fed.clmethods import NOT_REHEARSAL_FREE
from cl_fed.config import DEFAULTS, make_config
from cl_fed.io import atomic_write_bytes, atomic_write_text
from cl_fed.metrics import FWT_INITIAL, intransigence

# (key, column title, source): source is a metrics key, "derived" (computed here from results.json),
# "paired" (computed against the run's joint-training reference) or a results.json top-level key
COLUMNS = [
    ("awer", "AWER", "metrics"),
    ("bwt", "BWT", "metrics"),
    ("forgetting", "Forgetting", "metrics"),
    ("fwt", "FWT", "metrics"),
    ("new_stage_wer", "New-stage WER", "metrics"),
    ("intransigence", "Intransigence", "paired"),
    ("acer", "ACER", "derived"),
    ("foundation", "Base-domain WER", "derived"),
    ("epsilon", "DP ε", "derived"),
    ("bytes_up", "MB up", "results"),
    ("bytes_down", "MB down", "results"),
    ("wall_seconds", "Wall time (s)", "results"),
]
NOT_COMPARED = ("seed", "output-dir", "run-name", "resume", "allow-download", "round-timeout")
MIXED = "mixed"  # a row whose seeds computed FWT under different definitions: not averaged


@dataclass
class Row:
    """One configuration: its runs (one per seed) and their aggregates."""

    label: str
    runs: list[dict] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(r["config"].get("seed", 0) for r in self.runs)

    @property
    def joint(self) -> bool:
        return self.runs[0]["schedule"].get("mode") == "joint"

    @property
    def stages(self) -> list[str]:
        return self.runs[0]["stages"]

    def values(self, key: str, source: str) -> list[float]:
        out = []
        for r in self.runs:
            if source == "metrics":
                value = (r.get("metrics") or {}).get(key)
            elif source == "paired":
                value = r.get(f"_{key}")
            elif source == "derived":
                value = derived(r, key)
            else:
                value = r.get(key)
            if value is not None:
                out.append(float(value) / 1e6 if key.startswith("bytes") else float(value))
        return out

    def fwt_definition(self) -> str | None:
        """The FWT definition every seed with an FWT used; MIXED where they differ; None if no FWT."""
        definitions = {fwt_definition(r) for r in self.runs} - {None}
        if not definitions:
            return None
        return definitions.pop() if len(definitions) == 1 else MIXED

    def stat(self, key: str, source: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation over seeds (None where undefined; FWT is never averaged
        across different definitions)."""
        if key == "fwt" and self.fwt_definition() == MIXED:
            return None, None
        values = self.values(key, source)
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def mean_matrix(self, kind: str = "wer") -> list[list[float]]:
        matrices = [r[f"{kind}_matrix"] for r in self.runs]
        return [
            [statistics.fmean(m[i][j] for m in matrices) for j in range(len(matrices[0][0]))]
            for i in range(len(matrices[0]))
        ]

    def curve(self, stage: int) -> list[float]:
        """Mean WER on stage `stage`'s test set: initial base, then after every stage."""
        initial = [r["initial_wer"][stage] for r in self.runs if r.get("initial_wer")]
        matrix = self.mean_matrix()
        start = [statistics.fmean(initial)] if len(initial) == len(self.runs) else [math.nan]
        return start + [row[stage] for row in matrix]


def derived(results: dict, key: str) -> float | None:
    """ACER: mean CER over every stage's test set after the last stage. Base-domain WER: the WER on
    the starting base's own domain (the scenario's foundation test set) after the last stage."""
    if key == "acer":
        return statistics.fmean(results["cer_matrix"][-1])
    if key == "epsilon":  # differentially private runs only (at results["privacy"]["delta"])
        return (results.get("privacy") or {}).get("epsilon")
    if key == "foundation":
        series = results.get("other_test_sets", {}).get("foundation", {}).get("wer") or [None]
        return series[-1]
    raise KeyError(key)


def fwt_definition(results: dict) -> str | None:
    """Which FWT a run's metrics hold ("single-task", "initial"), None without an FWT. Results written
    before `fwt_definition` existed computed it from the initial base (no runner passed single-task
    references), so that is what a missing key means."""
    metrics = results.get("metrics") or {}
    if metrics.get("fwt") is None:
        return None
    return metrics.get("fwt_definition", FWT_INITIAL) or FWT_INITIAL


def is_joint(results: dict) -> bool:
    return results.get("strategy") == "joint" or (results.get("schedule") or {}).get("mode") == "joint"


def scenario_and_seed(results: dict) -> tuple[str, int]:
    config = results.get("config") or {}
    return Path(str(config.get("scenario"))).stem, config.get("seed", 0)


def load_runs(folder: str | Path) -> tuple[list[dict], list[str]]:
    """Every complete results.json under `folder` (one level of run folders); and what was left out.
    Each continual run is paired with its joint-training reference (`pair_with_joint`), searched in
    the whole tree under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such sweep folder")
    runs, skipped = [], []
    for path in sorted(folder.glob("*/results.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            skipped.append(f"{path}: unreadable ({err})")
            continue
        if not data.get("complete"):
            skipped.append(f"{path}: incomplete run")
            continue
        data["_dir"] = str(path.parent)
        runs.append(data)
    if not runs:
        raise ValueError(f"{folder}: no complete runs (no */results.json with complete=true)")
    references, unusable = find_joint_runs(folder, runs)
    pair_with_joint(runs, references)
    return runs, skipped + unusable


def find_joint_runs(folder: Path, runs: list[dict]) -> tuple[list[dict], list[str]]:
    """The complete joint-training runs among `runs` and in any results.json deeper under `folder`;
    and the deeper joint results that could not be used."""
    joint = [r for r in runs if is_joint(r)]
    loaded = {Path(r["_dir"]).resolve() for r in runs}
    unusable = []
    for path in sorted(folder.rglob("results.json")):
        if path.parent.resolve() in loaded or path.parent.parent == folder:
            continue  # one level down: already loaded (or already reported as left out)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            unusable.append(f"{path}: unreadable ({err}), not searched for a joint reference")
            continue
        if not isinstance(data, dict) or not is_joint(data):
            continue
        if not data.get("complete"):
            unusable.append(f"{path}: incomplete joint run, not used as a reference")
            continue
        data["_dir"] = str(path.parent)
        joint.append(data)
    return joint, unusable


def pair_with_joint(runs: list[dict], joint_runs: list[dict]) -> None:
    """Sets `_intransigence` (mean_j R[j][j] - joint[j], joint[j] = the joint run's WER on stage j) and
    `_joint_reference` (the joint run's name) on every continual run whose scenario and seed have a
    joint run with the same stages; None where there is none (or it cannot be scored). Where several
    joint runs of that scenario and seed exist, the one whose config agrees on the most settings is
    used; a tie is ambiguous and gives None (said in `_joint_note`)."""
    by_key: dict[tuple[str, int], list[dict]] = {}
    for joint in joint_runs:
        by_key.setdefault(scenario_and_seed(joint), []).append(joint)
    for run in runs:
        run["_intransigence"] = run["_joint_reference"] = run["_joint_note"] = None
        if is_joint(run):
            continue
        scenario, seed = scenario_and_seed(run)
        candidates = [j for j in by_key.get((scenario, seed), []) if j["stages"] == run["stages"]]
        if not candidates:
            run["_joint_note"] = f"no joint run of scenario {scenario}, seed {seed}"
            continue
        if len(candidates) > 1:
            scores = [_agreement(run["config"], j["config"]) for j in candidates]
            best = max(scores)
            candidates = [j for j, score in zip(candidates, scores) if score == best]
            if len(candidates) > 1:
                names = ", ".join(sorted(j["run_name"] for j in candidates))
                run["_joint_note"] = f"ambiguous joint reference ({names})"
                continue
        joint = candidates[0]
        run["_joint_reference"] = joint["run_name"]
        try:
            run["_intransigence"] = intransigence(run["wer_matrix"], joint["wer_matrix"][0])
        except (ValueError, IndexError):  # an unscored (NaN) test set or a malformed matrix
            run["_joint_note"] = f"intransigence against {joint['run_name']} is undefined"


def _agreement(config: dict, joint_config: dict) -> int:
    """How many result-changing settings two configs share (strategy and mode aside)."""
    ignored = {*NOT_COMPARED, "strategy", "mode"}
    a, b = comparable(config), comparable(joint_config)
    return sum(1 for k in set(a) & set(b) if k not in ignored and a[k] == b[k])


def group_runs(runs: list[dict]) -> list[Row]:
    """Runs whose configs differ only in seed (and settings that do not change results) share a row."""
    rows: dict[str, Row] = {}
    for run in runs:
        config = {k: v for k, v in comparable(run["config"]).items() if k not in NOT_COMPARED}
        key = json.dumps([config, run["schedule"].get("mode")], sort_keys=True)
        label = re.sub(r"-seed\d+", "", run["run_name"])
        rows.setdefault(key, Row(label)).runs.append(run)
    labels = [row.label for row in rows.values()]
    prefix = _common_scenario_prefix(labels, {scenario_and_seed(run)[0] for run in runs})
    for row in rows.values():
        row.label = row.label[len(prefix) :] or row.label
    return sorted(rows.values(), key=lambda row: row.label)


def comparable(config: dict) -> dict:
    """A run's config as it trains: keys added since the run was made take their defaults, and knobs
    its strategy ignores are reset (RunConfig.effective), so equal runs group whatever their age."""
    known = {k: v for k, v in config.items() if k in DEFAULTS}
    try:
        effective = make_config(known).effective().to_dict()
    except ValueError:  # a config this version no longer accepts: compare it as written
        effective = known
    return {**effective, **{k: v for k, v in config.items() if k not in DEFAULTS}}


def _common_scenario_prefix(labels: list[str], scenarios: set[str] = frozenset()) -> str:
    """The scenario name every label starts with: the runs' one scenario when they share it (names
    such as `new-languages` hold a hyphen), else the labels' common first word."""
    if len(scenarios) == 1 and all(label.startswith(f"{next(iter(scenarios))}-") for label in labels):
        return f"{next(iter(scenarios))}-"
    first = {label.split("-", 1)[0] for label in labels}
    return next(iter(first)) + "-" if len(first) == 1 and all("-" in label for label in labels) else ""


def _cell(mean, std, digits=1) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def table_markdown(rows: list[Row]) -> str:
    titles = []
    for key, title, _ in COLUMNS:
        titles += [title, "FWT def."] if key == "fwt" else [title]
    lines = ["| Run | Seeds | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(titles)]
    for row in rows:
        cells = []
        for key, _, source in COLUMNS:
            if key == "fwt":
                definition = row.fwt_definition()
                fwt = "mixed defs, not averaged" if definition == MIXED else _cell(*row.stat(key, source))
                cells += [fwt, definition or "n/a"]
            elif source == "paired" and 0 < len(row.values(key, source)) < len(row.runs):
                # not every seed has a joint reference: say over how many the mean is
                cell = _cell(*row.stat(key, source))
                cells += [f"{cell} ({len(row.values(key, source))} of {len(row.runs)} seeds)"]
            else:
                cells += [_cell(*row.stat(key, source), digits=2 if key.startswith("bytes") else 1)]
        label = row.label + (" (not rehearsal-free)" if not_rehearsal_free(row) else "")
        lines.append(f"| {label} | {','.join(map(str, row.seeds))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def not_rehearsal_free(row: Row) -> bool:
    """A row whose sites kept past data on purpose (cl-method=replay): marked in every table."""
    return row.runs[0]["config"].get("cl-method", "none") in NOT_REHEARSAL_FREE


def table_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    head = []
    for key, _, _ in COLUMNS:
        head += [f"{key}_mean", f"{key}_std"] + (["fwt_definition"] if key == "fwt" else [])
    writer.writerow(["run", "seeds", *head])
    for row in rows:
        cells = []
        for key, _, source in COLUMNS:
            cells += ["" if v is None else f"{v:.6g}" for v in row.stat(key, source)]
            if key == "fwt":
                cells.append(row.fwt_definition() or "")
        writer.writerow([row.label, " ".join(map(str, row.seeds)), *cells])
    return out.getvalue()


def table_notes(rows: list[Row]) -> list[str]:
    """Footnotes: the FWT definitions used, and which joint run each intransigence is measured against."""
    notes = [
        "FWT def.: `initial` = mean_{j>=1} (initial[j] - R[j-1][j]), against the starting base (GEM); "
        "`single-task` = mean_j (single_task[j] - R[j][j]), against models fine-tuned on one stage "
        "alone. The two are different quantities: compare FWT only between rows of the same definition; "
        "a row whose seeds used different ones says `mixed` and is not averaged.",
        "",
        "Intransigence = mean_j (R[j][j] - joint[j]), joint[j] = WER on stage j of the joint-training run "
        "(same scenario and seed, anywhere under this folder); mean ± std over the seeds that have one.",
    ]
    for row in rows:
        if row.joint:
            continue
        paired = [f"seed {s}: {r['_joint_reference']}" for s, r in _by_seed(row) if r.get("_joint_reference")]
        missing = [f"seed {s}: {r['_joint_note']}" for s, r in _by_seed(row) if r.get("_joint_note")]
        if paired or missing:
            notes.append(f"- {row.label}: " + "; ".join(paired + missing))
    return notes


def _by_seed(row: Row) -> list[tuple[int, dict]]:
    return sorted(((r["config"].get("seed", 0), r) for r in row.runs), key=lambda pair: pair[0])


def _figure_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_heatmaps(rows: list[Row]):
    """One panel per row: its mean WER matrix, every cell annotated."""
    import matplotlib.pyplot as plt

    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        matrix = row.mean_matrix()
        # green = low WER, red = high; 100% and above (nothing right) saturate the same red
        image = ax.imshow(matrix, cmap="RdYlGn_r", vmin=0, vmax=100)
        for i, values in enumerate(matrix):
            for j, value in enumerate(values):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="black")
        ax.set_title(f"{row.label}\n(mean over seeds {', '.join(map(str, row.seeds))})", fontsize=9)
        ax.set_xticks(range(len(row.stages)), row.stages, rotation=30, ha="right", fontsize=8)
        ylabels = ["joint (all stages)"] if row.joint else [f"after {s}" for s in row.stages]
        ax.set_yticks(range(len(matrix)), ylabels, fontsize=8)
        ax.set_xlabel("test set")
        fig.colorbar(image, ax=ax, label="WER (%)", shrink=0.8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_forgetting_curves(rows: list[Row]):
    """One panel per stage test set: WER after every stage; rising after the stage = forgetting."""
    import matplotlib.pyplot as plt

    stages = rows[0].stages
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.8), squeeze=False, sharey=True)
    x_labels = ["initial", *[f"after {s}" for s in stages]]
    for j, (ax, stage) in enumerate(zip(axes.flat, stages)):
        for row in rows:
            if row.joint:
                ax.axhline(row.mean_matrix()[0][j], linestyle="--", color="gray", label=row.label)
            else:
                ax.plot(range(len(stages) + 1), row.curve(j), marker="o", label=row.label)
        ax.axvspan(j, j + 1, color="orange", alpha=0.12)  # this stage is trained between these two points
        ax.set_title(f"test set: {stage}", fontsize=10)
        ax.set_xticks(range(len(x_labels)), x_labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("WER (%)")
    axes.flat[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_wer_vs_bytes(rows: list[Row]):
    """AWER (mean ± std over seeds) against total bytes up + down per run, for rows that communicate."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for row in rows:
        up, down = row.stat("bytes_up", "results")[0], row.stat("bytes_down", "results")[0]
        awer, std = row.stat("awer", "metrics")
        if not up or awer is None:
            continue  # single-site and joint runs send nothing
        ax.errorbar([up + down], [awer], yerr=[std or 0.0], fmt="o", capsize=3, label=row.label)
    ax.set_xscale("log")
    ax.set_xlabel("MB communicated per run (up + down, all sites)")
    ax.set_ylabel("AWER (%) after the last stage")
    ax.set_title("accuracy vs communication", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))  # labels would overlap on the points
    fig.tight_layout()
    return fig


HOW_TO_READ = """\
How to read this: lower WER is better. AWER is the mean WER over every stage's test set after the
last stage; new-stage WER is the mean WER on each stage right after training on it (how well new
speech is learnt); BWT is the mean of (WER right after learning a stage - WER at the end): negative
means forgetting; forgetting is the mean rise of each earlier stage's WER from its best to the end;
FWT is how much earlier stages lowered the WER of stages not yet trained (FWT def. says against
what: the starting base, or single-task models); intransigence is how much worse each stage is learnt
than by the joint-training upper bound (positive = worse; n/a = no joint run of that scenario and
seed). DP ε is the privacy budget of differentially private runs (at the δ in their results.json;
n/a = no DP). ACER is AWER's character-level twin (it moves where WER is saturated near 100%);
base-domain WER is the foundation test set (what the starting base was trained on) after the last
stage. ± is the sample standard deviation over seeds. Bytes are all sites' uploads and the server's
broadcasts over the whole run; wall time is the server's. Single-site and joint rows send nothing.
"""


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, skipped = load_runs(folder)
    rows = group_runs(runs)
    out = Path(out or folder)
    table = table_markdown(rows)
    atomic_write_text(out / "comparison.csv", table_csv(rows))
    plots = {
        "heatmaps.png": plot_heatmaps,
        "forgetting_curves.png": plot_forgetting_curves,
        "wer_vs_bytes.png": plot_wer_vs_bytes,
    }
    for name, plot in plots.items():
        fig = plot(rows)
        atomic_write_bytes(out / name, _figure_bytes(fig))
        plt.close(fig)
    scenario = sorted({Path(str(r["config"].get("scenario"))).stem for r in runs})
    text = [
        f"# Comparison of {len(runs)} runs in `{Path(folder).name}`",
        "",
        f"Scenario(s): {', '.join(scenario)}; stages: {', '.join(rows[0].stages)}.",
        "",
        table,
        *table_notes(rows),
        "",
        HOW_TO_READ,
        "![WER matrices](heatmaps.png)",
        "",
        "![Forgetting curves](forgetting_curves.png)",
        "",
        "![WER vs bytes](wer_vs_bytes.png)",
        "",
    ]
    if skipped:
        text += ["Left out:", *[f"- {s}" for s in skipped], ""]
    atomic_write_text(out / "comparison.md", "\n".join(text))
    print(table, end="")
    for line in skipped:
        print(f"[report] left out {line}", file=sys.stderr)
    print(f"[report] wrote {out / 'comparison.md'}, comparison.csv and 3 plots")
    return out / "comparison.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folder", help="a sweep folder: one sub-folder per run, each with results.json")
    parser.add_argument(
        "--out", default=None, help="where to write the table and plots (default: the folder)"
    )
    args = parser.parse_args(argv)
    try:
        write_report(args.folder, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
