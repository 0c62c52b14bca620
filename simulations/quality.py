"""Quality benchmark: centralization schedules vs FedAvg baselines vs local, the single-site paper
mode and a joint-training upper bound, on one scenario, over seeds; then paired comparisons.

    python -m simulations.quality                                  # default scenario, seeds 0,1,2
    python -m simulations.quality --scenario new-languages --main  # the main rows on another scenario
    python -m simulations.quality --with-dp                        # also the two DP rows
    python -m simulations.quality --with-variants                  # also the issue-15 variant rows
    python -m simulations.quality --with-cl-methods                # also the issue-16 CL-baseline rows
    python -m simulations.quality --rows fedavg,joint --seeds 0    # a subset, by configuration name
    python -m simulations.quality --scenario tiny --main --seeds 0,1 --set rounds-per-stage=1  # quick
    python -m simulations.quality --list                           # the configurations and their numbers
    python -m simulations.quality --plan                           # what is done, what would run
    python -m simulations.quality --table benchmarks/results/quality-default.csv   # README's table

Every federated row runs through `flwr run` (Flower's simulation engine) on one private SuperLink
shared by all runs. Rerunning skips the runs already done, complete in the runs folder or as a
committed CSV row made with the same recipe (run config, scenario data, base and LoRA defaults: see
`recipe`), so a fresh clone continues from the committed results; a run that fails for infrastructure
reasons (Ray start-up, the SuperLink gone) is retried twice from its checkpoint. After every
finished run it rewrites benchmarks/results/quality-<scenario>.csv (one row per configuration and
seed), quality-<scenario>-paired.csv (centralization - fedavg, paired by seed) and
quality-<scenario>.md (the comparison table, the machine, the command, the paired comparisons);
at the end it also writes the full report (simulations.report) into the runs folder.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cl_fed.clmethods import NOT_REHEARSAL_FREE as CL_NOT_REHEARSAL_FREE
from cl_fed.config import DEFAULTS, NOT_IN_NAME, make_config
from cl_fed.io import atomic_write_text
from cl_fed.paths import project_root, runs_root
from simulations.report import (
    COLUMNS,
    HOW_TO_READ,
    MIXED,
    Row,
    _cell,
    fwt_definition,
    load_runs,
    write_report,
)
from simulations.sweep import is_complete, run_dir, run_with_retries

# (mode, run-config overrides): the configurations of the quality table, in the table's order
ROWS = [
    ("federated", {"strategy": "centralization", "centralize-every": "round"}),
    ("federated", {"strategy": "centralization", "centralize-every": "stage"}),
    ("federated", {"strategy": "centralization", "centralize-every": "stage", "merge": "factors"}),
    ("federated", {"strategy": "centralization", "centralize-every": "3"}),
    ("federated", {"strategy": "fedavg"}),
    ("federated", {"strategy": "fedavg-lora"}),
    ("federated", {"strategy": "local"}),
    ("single-site", {"strategy": "centralization", "centralize-every": "stage"}),
    ("single-site", {"strategy": "fedavg"}),
    ("joint", {}),
]
# differential privacy (site-level DP-FedAvg) at two noise levels; the no-DP reference is row 3
DP = {"strategy": "centralization", "centralize-every": "stage", "merge": "factors", "weighting": "uniform"}
DP_ROWS = [("federated", {**DP, "dp-noise": 0.3}), ("federated", {**DP, "dp-noise": 1.0})]
# merge gates (cl_fed/gate.py): the gate (with its site gate) on clean data and with one faulty site
# (shuffled transcripts, cl_fed/faults.py); the reference without a gate is row 2 and the GATE_ROWS' second
GATE = {"strategy": "centralization", "centralize-every": "stage"}
FAULTY = {"drill": "shuffle-transcripts:factory-b"}
GATED = {"merge-gate": "validate", "gate-sites": "alone"}
GATE_ROWS = [
    ("federated", {**GATE, **GATED}),
    ("federated", {**GATE, **FAULTY}),
    ("federated", {**GATE, **FAULTY, **GATED}),
]
# issue 15's federated-LoRA rules and Flower's server optimisers and FedProx, each against the row it
# varies (paired by seed: the same configuration without the variant's keys, VARIANT_PARTS).
# fedit at every stage is the committed merge=factors row (a pool of one: s B_bar A_bar either way);
# fedex differs from exact only when the pool averages several stages, so it runs every 3 stages.
# fedsa's WER pools each site's own model on its own share of the test sets (personalised).
# proximal-mu 0.01: one of the FedProx paper's grid values, chosen before any run, not tuned here.
STAGE = {"strategy": "centralization", "centralize-every": "stage"}
VARIANT_ROWS = [
    ("federated", {**STAGE, "lora-aggregation": "ffa"}),
    ("federated", {**STAGE, "lora-aggregation": "fedsa"}),
    ("federated", {"strategy": "centralization", "centralize-every": "3", "lora-aggregation": "fedex"}),
    *[("federated", {**STAGE, "server-optimizer": name}) for name in ("adam", "yogi", "adagrad", "avgm")],
    ("federated", {**STAGE, "proximal-mu": 0.01}),
    ("federated", {"strategy": "fedavg", "proximal-mu": 0.01}),
]
# issue 16's continual-learning baselines (cl_fed/clmethods): FedAvg with each method that applies to
# full fine-tuning, centralization with EWC, LwF and O-LoRA; each compared, by seed, with centralization
# alone (CL_PARTS). Their keys are at their defaults, set before any run and not tuned on test sets:
# ewc-lambda 5000 (its scale from training data, benchmarks/ewc_scale.py), lwf-alpha 1 at T 2,
# olora-lambda 0.5 (as in O-LoRA), 50 replayed utterances per stage.
CL_ROWS = [
    *[("federated", {"strategy": "fedavg", "cl-method": m}) for m in ("ewc", "lwf", "replay")],
    *[("federated", {**STAGE, "cl-method": m}) for m in ("ewc", "lwf", "olora")],
]
ALL_ROWS = ROWS + DP_ROWS + GATE_ROWS + VARIANT_ROWS + CL_ROWS
# the rows that answer the paper's question, for a second scenario's generalisation check
MAIN = ("centralization-every-stage-product", "fedavg", "fedavg-lora", "joint")

# the per-run CSV's metric columns: report.COLUMNS (the same values), some renamed for the CSV
RENAME = {"foundation": "base_domain_wer", "bytes_up": "mb_up", "bytes_down": "mb_down"}
METRICS = [(RENAME.get(key, key), key, source, title) for key, title, source in COLUMNS]
CSV_COLUMNS = [
    "config",
    "seed",
    *[m[0] for m in METRICS],
    "fwt_definition",
    "run",
    "joint_reference",
    "recipe",
]
PAIRED_METRICS = [
    ("awer", "AWER", "lower"),
    ("bwt", "BWT", "higher"),
    ("new_stage_wer", "new-stage WER", "lower"),
]
PAIRED_COLUMNS = "config reference metric n seeds differences mean sd ci_low ci_high verdict".split()

# t_{0.975, df} for df = 1..30 (two-sided 95%); scipy is not a dependency of this project
T975 = [
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
]  # fmt: skip
Z975 = 1.959963985


# ---- names ----------------------------------------------------------------------------------------


def config_name(run_name: str, scenario: str) -> str:
    """A run directory's name without the scenario prefix and the seed: `default-fedavg-seed0` ->
    `fedavg`, `default-fedavg-seed0-single-all` -> `fedavg-single-all` (the report's row label)."""
    stem = Path(str(scenario)).stem
    name = run_name[len(stem) + 1 :] if run_name.startswith(f"{stem}-") else run_name
    return re.sub(r"-seed\d+", "", name)


def row_config(mode: str, overrides: dict, scenario: str) -> str:
    """The configuration name a row's runs get, from the directory run_one would write them to."""
    cfg = make_config({**overrides, "scenario": scenario, "output-dir": "."}, source="quality")
    return config_name(run_dir(cfg, mode).name, scenario)


def select_rows(
    scenario: str,
    only=None,
    names=None,
    main=False,
    with_dp=False,
    with_gates=False,
    with_variants=False,
    with_cl_methods=False,
) -> list[tuple[str, dict]]:
    """The rows to run: by 1-based number in ALL_ROWS (`only`), by configuration name (`names`,
    or MAIN with `main`), else ROWS (and DP_ROWS, GATE_ROWS, VARIANT_ROWS, CL_ROWS as asked)."""
    if only:
        wrong = [i for i in only if not 1 <= i <= len(ALL_ROWS)]
        if wrong:
            raise ValueError(f"row number(s) {wrong} out of 1..{len(ALL_ROWS)} (see --list)")
        return [ALL_ROWS[i - 1] for i in only]
    if main:
        names = MAIN
    if not names:
        return (
            ROWS
            + (DP_ROWS if with_dp else [])
            + (GATE_ROWS if with_gates else [])
            + (VARIANT_ROWS if with_variants else [])
            + (CL_ROWS if with_cl_methods else [])
        )
    by_name = {row_config(mode, overrides, scenario): (mode, overrides) for mode, overrides in ALL_ROWS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


# ---- recipes: what decides a run's results --------------------------------------------------------


@functools.cache
def _scenario_keys(scenario: str) -> tuple[str, str | None]:
    """(fingerprint of the scenario's content, key of its embedded base); a manifest has neither."""
    from cl_fed.data.scenario import load_scenario
    from cl_fed.models.foundation import base_key

    try:
        loaded = load_scenario(scenario)
    except (FileNotFoundError, ValueError):  # a manifest or an unknown name: the name stands for it
        return str(scenario), None
    has_base = loaded.foundation.train_utterances and loaded.foundation.test_utterances
    return loaded.fingerprint(), base_key(loaded) if has_base else None


# Keys added after results were committed, left out of a recipe at the value that computes what the
# code computed before they existed (issue 12's limits on one site: no site of the benchmark's
# scenarios holds more than half the examples, and no honest update is 10x the round's median).
LATER_KEYS = {
    "max-site-weight": 0.5,
    "update-norm-ratio": 10.0,
    "aggregation": "mean",
    "lora-aggregation": "exact",  # the rule every committed LoRA row ran with
    "trim-fraction": 0.2,
    "grad-accumulation": 1,
    "precision": "auto",  # fp32 on the CPUs the committed rows ran on
    "language": "auto",  # Whisper keys: the tiny CTC model ignores them
    "task": "transcribe",
    "whisper-window": 0.0,
    "merge-gate": "none",  # issue 14's gates and drills: off, today's behaviour
    "gate-sites": "none",
    "gate-min-gain": 0.0,
    "gate-max-regression": 5.0,
    "gate-fallback": "skip",
    "validation-share": 0.1,
    "drill": "",
    "server-momentum": 0.9,  # issue 15: FedAvgM and FedProx, off by default
    "proximal-mu": 0.0,
    "cl-method": "none",  # issue 16: continual-learning baselines, off by default
    "ewc-lambda": 5000.0,
    "ewc-samples": 64,
    "ewc-decay": 1.0,
    "lwf-alpha": 1.0,
    "lwf-temperature": 2.0,
    "olora-lambda": 0.5,
    "replay-per-stage": 50,
}
# Keys whose default changed spelling, not what it computes: (new spelling, the recipe's old one).
# server-lr 0 = the server optimiser's default, which was server-lr's default 1e-3 before issue 15.
RESPELLED = {"server-lr": (0.0, 0.001)}


def recipe(mode: str, overrides: dict) -> str:
    """A short hash of everything that decides a run's results: the mode, the run config as its
    strategy uses it (ignored knobs at their defaults, names and paths left out), the scenario's
    content rather than its name, the embedded base and, where LoRA is trained, the model family's
    LoRA defaults. A committed CSV row whose recipe still matches counts as done, so a fresh clone
    continues from the committed results; a changed default makes the row stale. (Code changes
    that alter results without changing a default are not seen: rerun then.)"""
    from cl_fed.models.tiny import NAME as TINY_NAME
    from cl_fed.models.tiny import TinyFastConformer

    cfg = make_config({**overrides, "output-dir": "."}, source="quality")
    if mode == "joint":  # trains like full fine-tuning whatever the strategy (cl_fed.run.run_joint)
        cfg = make_config({**cfg.to_dict(), "strategy": "fedavg", "proximal-mu": 0.0}, source="quality")
    values = {
        k: RESPELLED[k][1] if k in RESPELLED and v == RESPELLED[k][0] else v
        for k, v in cfg.effective().to_dict().items()
        if k not in NOT_IN_NAME and not (k in LATER_KEYS and v == LATER_KEYS[k])
    }
    fingerprint, base = _scenario_keys(cfg.scenario)
    payload = {"mode": mode, "config": {**values, "scenario": fingerprint}, "base": base}
    if cfg.model == TINY_NAME and values["strategy"] != "fedavg":
        family = TinyFastConformer
        payload["lora"] = [
            family.lora_rank,
            family.lora_alpha,
            family.lora_dropout,
            list(family.lora_targets),
        ]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def run_mode(config: str) -> str:
    """The mode a configuration name was run in (the names carry it)."""
    if config == "joint" or config.startswith("joint-"):
        return "joint"
    return "single-site" if config.endswith("-single-all") else "federated"


# ---- statistics -----------------------------------------------------------------------------------


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table up to 30, beyond it the Cornish-Fisher expansion around the normal
    quantile (Abramowitz & Stegun 26.7.5; within 1e-5 of the exact value from df 30 on)."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    g = [
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    ]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def paired_stats(diffs: list[float]) -> dict:
    """n, mean, sample sd and the 95% t confidence interval of paired differences (sd and CI None
    below 2 pairs)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else None
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci_low": None, "ci_high": None}
    sd = statistics.stdev(diffs)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def verdict(title: str, better: str, stats: dict, who: str = "centralization") -> str:
    """Plain words for one metric's paired difference (`better`: "lower" or "higher" is better)."""
    n = stats["n"]
    if stats["ci_low"] is None:
        return f"n/a: {n} paired seed{'s' if n != 1 else ''}, a CI needs 2"
    if stats["ci_low"] <= 0 <= stats["ci_high"]:
        return f"not distinguishable at n={n}"
    direction = "lower" if stats["mean"] < 0 else "higher"
    good = "better" if direction == better else "worse"
    return f"real: CI excludes 0, {who} {direction} {title} by {abs(stats['mean']):.1f} ({good})"


def paired_differences(records: list[dict], config: str, reference: str, metric: str) -> list[tuple]:
    """(seed, config - reference) for every seed where both configurations have the metric."""
    values = {name: {} for name in (config, reference)}
    for r in records:
        if r["config"] in values and r.get(metric) is not None:
            values[r["config"]][int(r["seed"])] = r[metric]
    seeds = sorted(set(values[config]) & set(values[reference]))
    return [(seed, values[config][seed] - values[reference][seed]) for seed in seeds]


CENTRALIZATION = re.compile(
    r"^centralization-every-[^-]+-(?:product|factors)(?P<extras>.*?)(?P<single>-single-all)?$"
)
FEDAVG = re.compile(r"^fedavg(?P<extras>(?!-lora).*?)(?P<single>-single-all)?$")
LEARNING_RATES = re.compile(r"-(?:full-)?lr\d[0-9.]*(?:e[+-]?\d+)?(?=-|$)")


# the keys of issue 15's variants: a run with them is compared with the same run without them
VARIANT_PARTS = re.compile(r"-(lora-aggregation|server-optimizer|server-lr|server-momentum|proximal-mu)[^-]+")
# the keys of issue 16's continual-learning methods: a run with them is compared with centralization
CL_PARTS = re.compile(
    r"-(cl-method|ewc-lambda|ewc-samples|ewc-decay|lwf-alpha|lwf-temperature|olora-lambda|replay-per-stage)"
    r"[^-]+"
)
NOT_REHEARSAL_FREE = re.compile(r"-cl-method(?:" + "|".join(CL_NOT_REHEARSAL_FREE) + r")(?=-|$)")
GATE_PARTS = re.compile(
    r"-(merge-gate|gate-sites|gate-min-gain|gate-max-regression|gate-fallback|validation-share)[^-]+"
)


def comparison_pairs(configs: list[str]) -> list[tuple[str, str]]:
    """Each centralization configuration against FedAvg of the same mode and extra settings
    (`centralization-every-3-product-rounds-per-stage1` against `fedavg-rounds-per-stage1`,
    single-site against `fedavg-single-all`); DP rows answer another question and are left out."""

    # each strategy's own learning rate (lr: LoRA, full-lr: FedAvg) is part of its recipe, not an
    # extra setting: `...-lr0.001` pairs with `fedavg-full-lr0.0001` under otherwise equal settings
    def settings(extras: str) -> str:
        return LEARNING_RATES.sub("", extras)

    fedavg = {}
    for config in configs:
        found = FEDAVG.match(config)
        if found:
            fedavg.setdefault((settings(found["extras"]), found["single"]), config)
    pairs = []
    for config in configs:
        if CL_PARTS.search(config):  # a method against centralization (every stage) alone
            plain = CL_PARTS.sub("", config)
            found = FEDAVG.match(plain)
            reference = f"centralization-every-stage-product{found['extras']}" if found else plain
            if reference in configs and not (found and found["single"]):
                pairs.append((config, reference))
            if found and plain in configs:  # and a method on FedAvg against FedAvg: what it adds
                pairs.append((config, plain))
            continue
        if VARIANT_PARTS.search(config):  # a variant against the same run without it
            plain = VARIANT_PARTS.sub("", config)
            if plain in configs:
                pairs.append((config, plain))
            continue
        found = CENTRALIZATION.match(config)
        if not found or "dp-noise" in config:
            continue
        if GATE_PARTS.search(config):  # a gated run against the same run without its gate
            ungated = GATE_PARTS.sub("", config)
            if ungated in configs:
                pairs.append((config, ungated))
            continue
        reference = fedavg.get((settings(found["extras"]), found["single"]))
        if reference is not None:
            pairs.append((config, reference))
    return pairs


def compared(config: str) -> str:
    """Who the verdict of a pair speaks of: the variant, the gate or centralization."""
    if CL_PARTS.search(config):
        return CL_PARTS.sub("", config) + " + " + CL_PARTS.search(config).group(0)[len("-cl-method") :]
    variant = VARIANT_PARTS.search(config)
    if variant:
        return variant.group(0)[1:]
    return "the gate" if GATE_PARTS.search(config) else "centralization"


def paired_comparisons(records: list[dict]) -> list[dict]:
    """One row per (centralization configuration, metric): differences, statistics, verdict."""
    configs = list(dict.fromkeys(r["config"] for r in records))
    out = []
    for config, reference in comparison_pairs(configs):
        for metric, title, better in PAIRED_METRICS:
            diffs = paired_differences(records, config, reference, metric)
            stats = paired_stats([d for _, d in diffs])
            out.append(
                {
                    "config": config,
                    "reference": reference,
                    "metric": metric,
                    "seeds": [s for s, _ in diffs],
                    "differences": [d for _, d in diffs],
                    **stats,
                    "verdict": verdict(title, better, stats, compared(config)),
                }
            )
    return out


# ---- per-run records and the tables ---------------------------------------------------------------


def run_record(run: dict) -> dict:
    """One CSV row from a loaded results.json (simulations.report.load_runs: paired with its joint
    run), every value computed by the report's own code (Row.values), None for n/a."""
    one = Row("", [run])
    record = {"config": config_name(Path(run["_dir"]).name, run["config"].get("scenario", ""))}
    record["seed"] = run["config"].get("seed", 0)
    for column, key, source, _ in METRICS:
        values = one.values(key, source)
        record[column] = values[0] if values else None
    record["fwt_definition"] = fwt_definition(run)
    record["run"] = Path(run["_dir"]).name
    record["joint_reference"] = run.get("_joint_reference")
    known = {k: v for k, v in run["config"].items() if k.replace("_", "-") in DEFAULTS}  # not "site", "mode"
    try:
        record["recipe"] = recipe(run_mode(record["config"]), known)
    except ValueError:  # a config from an older version of cl-fed: nothing to compare it with
        record["recipe"] = None
    return record


def order_records(records: list[dict], order: list[str]) -> list[dict]:
    """The table's configuration order first (others after, by name), seeds ascending."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(records, key=lambda r: (rank.get(r["config"], len(rank)), r["config"], int(r["seed"])))


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, list):
        return " ".join(_format(v) for v in value)
    return str(value)


def to_csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format(row.get(c)) for c in columns])
    return out.getvalue()


def read_records(path: str | Path) -> list[dict]:
    """A per-run CSV back into records: numbers as floats, empty cells as None."""
    text_columns = {"config", "fwt_definition", "run", "joint_reference", "recipe"}
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            records.append(
                {k: (v or None) if k in text_columns else (float(v) if v else None) for k, v in row.items()}
            )
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Per configuration (in the records' order): the seeds and mean/sample std of every metric
    (std None for one seed; FWT None where seeds used different definitions, as the report does)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["config"], []).append(r)
    summary = []
    for config, runs in groups.items():
        row = {"config": config, "seeds": sorted(int(r["seed"]) for r in runs)}
        definitions = {r["fwt_definition"] for r in runs} - {None}
        row["fwt_definition"] = (
            definitions.pop() if len(definitions) == 1 else (MIXED if definitions else None)
        )
        for column, *_ in METRICS:
            values = [r[column] for r in runs if r.get(column) is not None]
            if column == "fwt" and row["fwt_definition"] == MIXED:
                values = []
            row[column] = (
                statistics.fmean(values) if values else None,
                statistics.stdev(values) if len(values) > 1 else None,
                len(values),
            )
        summary.append(row)
    return summary


def summary_markdown(summary: list[dict]) -> str:
    """The quality table: mean ± sample std over seeds, n seeds per configuration."""
    titles = [title for *_, title in METRICS]
    fwt = titles.index("FWT") + 1
    titles[fwt:fwt] = ["FWT def."]
    lines = [
        "| Configuration | n | Seeds | " + " | ".join(titles) + " |",
        "|---|---|---|" + "---|" * len(titles),
    ]
    for row in summary:
        cells = []
        for column, *_ in METRICS:
            mean, std, count = row[column]
            cell = _cell(mean, std, digits=2 if column.startswith("mb_") else 1)
            if 0 < count < len(row["seeds"]):  # e.g. intransigence where some seeds have no joint run
                cell += f" ({count} of {len(row['seeds'])} seeds)"
            cells.append(cell)
            if column == "fwt":
                cells.append(row["fwt_definition"] or "n/a")
        seeds = ",".join(map(str, row["seeds"]))
        name = row["config"] + (" (not rehearsal-free)" if NOT_REHEARSAL_FREE.search(row["config"]) else "")
        lines.append(f"| {name} | {len(row['seeds'])} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_markdown(rows: list[dict]) -> str:
    lines = [
        "| Configuration | vs | Metric | n | Per-seed differences | Mean | SD | 95% CI | Verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diffs = ", ".join(f"{d:+.1f} (seed {s:g})" for s, d in zip(r["seeds"], r["differences"]))
        mean = "n/a" if r["mean"] is None else f"{r['mean']:+.1f}"
        sd = "n/a" if r["sd"] is None else f"{r['sd']:.1f}"
        ci = "n/a" if r["ci_low"] is None else f"[{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
        metric = next((title for key, title, _ in PAIRED_METRICS if key == r["metric"]), r["metric"])
        cells = [r["config"], r["reference"], metric, f"{r['n']:g}", diffs or "none", mean, sd, ci]
        lines.append("| " + " | ".join(cells + [r["verdict"]]) + " |")
    return "\n".join(lines) + "\n"


def read_paired(path: str | Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for key in ("n", "mean", "sd", "ci_low", "ci_high"):
                row[key] = float(row[key]) if row[key] else None
            for key in ("seeds", "differences"):
                row[key] = [float(v) for v in row[key].split()]
            rows.append(row)
    return rows


def render_table(path: str | Path) -> str:
    """The markdown table of a committed CSV: the quality table from quality-<scenario>.csv, the
    paired comparisons from quality-<scenario>-paired.csv (README is regenerated from these)."""
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    if "reference" in header:
        return paired_markdown(read_paired(path))
    return summary_markdown(summarize(read_records(path)))


# ---- writing the results --------------------------------------------------------------------------


def machine() -> str:
    """CPU model and core count (from /proc/cpuinfo and os.cpu_count()), and the load right now."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average {:.1f} / {:.1f} / {:.1f} (1/5/15 min) when written".format(*os.getloadavg())
    return f"{model}, {os.cpu_count()} CPU cores (os.cpu_count()){load}"


def collect(runs_folder: Path, scenario: str, order: list[str]) -> list[dict]:
    """Records of every complete run of `scenario` in the runs folder (whichever invocation made
    it), in the table's order; [] when there is none yet."""
    try:
        runs, _ = load_runs(runs_folder)
    except (FileNotFoundError, ValueError):
        return []
    stem = Path(str(scenario)).stem
    mine = [r for r in runs if Path(str(r["config"].get("scenario", ""))).stem == stem]
    return order_records([run_record(r) for r in mine], order)


def results_markdown(
    scenario: str, records: list[dict], paired: list[dict], command: str, source: str
) -> str:
    stem = Path(str(scenario)).stem
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"# Quality benchmark: scenario `{stem}`",
            "",
            f"- Machine: {machine()}",
            f"- Date: {date} (rewritten after every finished run)",
            f"- Command: `{command}`",
            f"- Runs: {len(records)} of this scenario (from any invocation), from {source}",
            "",
            "## Mean ± sample standard deviation over seeds",
            "",
            summary_markdown(summarize(records)),
            HOW_TO_READ,
            "## Paired comparisons: centralization − FedAvg, by seed",
            "",
            "Differences centralization − FedAvg on the same seed (only seeds both have), their mean, "
            "sample SD and 95% confidence interval mean ± t(0.975, n−1) · SD / √n. Negative AWER and "
            "new-stage WER differences favour centralization; positive BWT differences mean it forgets "
            "less. Single-site rows are compared with single-site FedAvg.",
            "",
            paired_markdown(paired) if paired else "(no pairs yet: needs fedavg and a centralization row)\n",
        ]
    )


def committed_records(path: Path, recipes: dict[tuple[str, int], str]) -> tuple[list[dict], list[str]]:
    """The rows of a committed CSV that still count: (kept, stale run names). A row is stale when
    this invocation knows its configuration (`recipes`: (config, seed) -> recipe) and its recipe is
    missing or differs; rows of configurations it does not know are kept as they are."""
    if not path.is_file():
        return [], []
    kept, stale = [], []
    for r in read_records(path):
        expected = recipes.get((r["config"], int(r["seed"])))
        if expected is not None and r.get("recipe") != expected:
            stale.append(r["run"] or f"{r['config']} seed {int(r['seed'])}")
        else:
            kept.append(r)
    return kept, stale


def write_results(
    scenario: str,
    runs_folder: Path,
    results_dir: Path,
    command: str,
    order: list[str],
    recipes: dict[tuple[str, int], str] | None = None,
) -> tuple[int, int]:
    """Rewrite quality-<scenario>.csv, -paired.csv and .md from the runs folder and the rows of the
    committed CSV that still count (see committed_records): a run in the folder replaces its
    committed row, a committed row is never lost to a fresh clone's empty runs folder. Returns
    (runs from the folder, rows kept from the CSV). Atomic writes: a benchmark stopped at any point
    leaves whole files."""
    base = results_dir / f"quality-{Path(str(scenario)).stem}"
    csv_path = base.with_name(base.name + ".csv")
    fresh = collect(runs_folder, scenario, order)
    done = {(r["config"], int(r["seed"])) for r in fresh}
    committed, _ = committed_records(csv_path, recipes or {})
    kept = [r for r in committed if (r["config"], int(r["seed"])) not in done]
    records = order_records(fresh + kept, order)
    if not records:
        return 0, 0
    paired = paired_comparisons(records)
    source = f"`{runs_folder}` ({len(fresh)} runs) and the committed CSV ({len(kept)} rows)"
    atomic_write_text(csv_path, to_csv(records, CSV_COLUMNS))
    atomic_write_text(base.with_name(base.name + "-paired.csv"), to_csv(paired, PAIRED_COLUMNS))
    atomic_write_text(
        base.with_name(base.name + ".md"), results_markdown(scenario, records, paired, command, source)
    )
    return len(fresh), len(kept)


# ---- running --------------------------------------------------------------------------------------


def jobs_for(
    rows: list[tuple[str, dict]], scenario: str, seeds: list[int], out: Path, extra: dict | None = None
) -> list[dict]:
    """Every (row, seed) as a job, seed-major (a stopped benchmark has whole seeds to compare),
    with the `extra` run-config overrides; rows that train to the same directory once."""
    jobs, seen = [], set()
    for seed in seeds:
        for mode, overrides in rows:
            overrides = {**overrides, **(extra or {}), "scenario": scenario, "seed": seed}
            directory = run_dir(make_config({**overrides, "output-dir": str(out)}, source="quality"), mode)
            if directory not in seen:
                seen.add(directory)
                jobs.append({"mode": mode, "overrides": overrides, "dir": directory, "seed": seed})
                jobs[-1]["config"] = config_name(directory.name, scenario)
                jobs[-1]["recipe"] = recipe(mode, overrides)
    return jobs


def label(index: int, total: int, job: dict) -> str:
    return f"[quality {index}/{total}] {job['config']} seed {job['seed']}"


def progress(index: int, total: int, job: dict, elapsed: float, durations: list[float]) -> str:
    """The line before a run: time so far and, once a run has finished, the mean run's time left."""
    left = "ETA after the first run"
    if durations:
        left = f"~{statistics.fmean(durations) * (total - index + 1) / 60:.0f} min left"
    return f"{label(index, total, job)} ({elapsed / 60:.1f} min so far, {left})"


def short_error(err: Exception) -> str:
    """An error in one line: its first line, and its last where they differ (a traceback's end)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:400]


def plan(jobs: list[dict], committed: list[dict] = ()) -> list[dict]:
    """Each job with its `state`: "in runs folder" (complete there), "committed" (a committed CSV
    row with the same configuration, seed and recipe) or "to run"."""
    in_csv = {(r["config"], int(r["seed"]), r.get("recipe")) for r in committed}
    states = []
    for job in jobs:
        if is_complete(job["dir"]):
            state = "in runs folder"
        elif (job["config"], job["seed"], job["recipe"]) in in_csv:
            state = "committed"
        else:
            state = "to run"
        states.append({**job, "state": state})
    return states


def run_jobs(jobs: list[dict], out: Path, write, committed: list[dict] = ()) -> list[str]:
    """Run the jobs not done yet (see plan), one SuperLink for all; `write()` after every finished
    run. Returns the failures (a failed run is reported and the benchmark goes on)."""
    from simulations.superlink import SharedSuperLink

    states = plan(jobs, committed)
    pending = [job for job in states if job["state"] == "to run"]
    folder, csv_rows = (
        sum(job["state"] == state for job in states) for state in ("in runs folder", "committed")
    )
    print(
        f"[quality] {len(jobs) - len(pending)} of {len(jobs)} runs done ({folder} in {out}, "
        f"{csv_rows} as committed rows with the same recipe); {len(pending)} to run",
        flush=True,
    )
    if not pending:
        return []
    start, durations, failures = time.monotonic(), [], []
    with SharedSuperLink(out / ".flower") as superlink:
        for index, job in enumerate(pending, 1):
            print(progress(index, len(pending), job, time.monotonic() - start, durations), flush=True)
            began = time.monotonic()
            try:
                run_with_retries(job["overrides"], job["mode"], out, superlink, name=job["dir"].name)
            except Exception as err:
                failures.append(f"{job['dir'].name}: {short_error(err)}")
                print(
                    f"{label(index, len(pending), job)} FAILED: {short_error(err)}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            durations.append(time.monotonic() - began)
            print(
                f"{label(index, len(pending), job)}: done in {durations[-1]:.0f} s ({job['dir']})", flush=True
            )
            write()
    return failures


def parse_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings as run-config overrides, typed as the run config types them."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        if key in ("scenario", "seed", "output-dir"):
            raise ValueError(f"--set {key}: use --scenario, --seeds or --out")
        overrides[key] = make_config({key: value}, source="--set").to_dict()[key]
    return overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenario", default="default")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: runs/quality/<scenario>)")
    parser.add_argument("--results", default=None, help="folder for the CSV/MD (default: benchmarks/results)")
    select = parser.add_mutually_exclusive_group()
    select.add_argument("--only", default=None, help="comma-separated row numbers (1-based, see --list)")
    select.add_argument("--rows", default=None, help="comma-separated configuration names (see --list)")
    select.add_argument("--main", action="store_true", help=f"only the main rows: {', '.join(MAIN)}")
    parser.add_argument("--with-dp", action="store_true", help="also the two differential-privacy rows")
    parser.add_argument(
        "--with-gates", action="store_true", help="also the merge-gate rows (clean and with a faulty site)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override for every row, e.g. --set rounds-per-stage=1 (repeatable; the "
        "configuration names then carry it, e.g. fedavg-rounds-per-stage1)",
    )
    parser.add_argument(
        "--with-variants",
        action="store_true",
        help="also issue 15's rows: federated-LoRA rules, server optimisers, FedProx",
    )
    parser.add_argument(
        "--with-cl-methods",
        action="store_true",
        help="also issue 16's rows: EWC, LwF, O-LoRA and replay with fedavg or centralization",
    )
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument(
        "--plan", action="store_true", help="print which runs are done and which would run, and exit"
    )
    parser.add_argument(
        "--table", default=None, metavar="CSV", help="print the markdown table of a results CSV"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.table:
        print(render_table(args.table), end="")
        return 0
    if args.list:
        for number, (mode, overrides) in enumerate(ALL_ROWS, 1):
            extra = " (--with-dp)" if (mode, overrides) in DP_ROWS else ""
            extra = " (--with-gates)" if (mode, overrides) in GATE_ROWS else extra
            extra = " (--with-variants)" if (mode, overrides) in VARIANT_ROWS else extra
            extra = " (--with-cl-methods)" if (mode, overrides) in CL_ROWS else extra
            print(f"{number:2d}  {row_config(mode, overrides, args.scenario)}{extra}")
        return 0
    only = [int(i) for i in args.only.split(",")] if args.only else None
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows else None
    try:
        rows = select_rows(
            args.scenario,
            only,
            names,
            args.main,
            args.with_dp,
            args.with_gates,
            args.with_variants,
            args.with_cl_methods,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stem = Path(args.scenario).stem
    # absolute: the ServerApp writes the runs from Flower's copy of the app, not from here
    out = Path(args.out).resolve() if args.out else runs_root() / "quality" / stem
    results_dir = (
        Path(args.results) if args.results else (project_root() or Path.cwd()) / "benchmarks" / "results"
    )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    try:
        extra = parse_overrides(args.set)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "simulations.quality", *argv])
    order = [row_config(mode, {**overrides, **extra}, args.scenario) for mode, overrides in ALL_ROWS]

    try:
        jobs = jobs_for(rows, args.scenario, seeds, out, extra)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the recipe every configuration of the table has now, for every seed asked (stale rows drop out)
    recipes = {
        (row_config(mode, {**overrides, **extra}, args.scenario), seed): recipe(
            mode, {**overrides, **extra, "scenario": args.scenario, "seed": seed}
        )
        for mode, overrides in ALL_ROWS
        for seed in seeds
    }
    csv_path = results_dir / f"quality-{stem}.csv"
    committed, stale = committed_records(csv_path, recipes)
    if stale:
        print(
            f"[quality] {len(stale)} rows of {csv_path} were made with other defaults or data and will "
            f"be replaced: {', '.join(stale)}",
            flush=True,
        )

    if args.plan:
        for job in plan(jobs, committed):
            print(f"{job['state']:>14}  {job['config']} seed {job['seed']}  (recipe {job['recipe']})")
        return 0

    def write() -> None:
        fresh, kept = write_results(args.scenario, out, results_dir, command, order, recipes)
        print(f"[quality] {fresh} runs and {kept} committed rows in {csv_path} and .md", flush=True)

    write()  # runs finished by an earlier invocation count from the start
    failures = run_jobs(jobs, out, write, committed)
    try:
        write_report(out)  # the full report (plots included) in the runs folder, as simulations.report
    except (FileNotFoundError, ValueError) as err:  # no complete run yet
        print(f"[quality] no report: {err}", file=sys.stderr)
    for failure in failures:
        print(f"[quality] FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
