"""`make demo`: the default federated continual-learning run, offline, then what it achieved.

Four simulated factories, three stages, the embedded tiny FastConformer, `centralization`
merging every stage. The first run synthesises the scenario's speech and pre-trains the base
(cached in .cache/); later runs start at once. It ends with one table (`result_table`): every
stage's WER before training, after its own stage and at the end, and the base domain's.
"""

from __future__ import annotations

import json
import math
import sys
import time

from cl_fed.config import make_config
from cl_fed.data.scenario import load_scenario
from simulations.flower import configure_local_federation, flwr_run


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    cfg = make_config()
    sites = len(load_scenario(cfg.scenario).sites)
    print(
        f"[cl-fed demo] scenario {cfg.scenario!r}: {sites} sites; strategy {cfg.strategy}, "
        f"centralize every {cfg.centralize_every}; running `flwr run .` on the local simulation engine",
        flush=True,
    )
    configure_local_federation(sites)  # afterwards plain `flwr run .` simulates the same federation
    run_dir = flwr_run(num_supernodes=sites).resolve()
    results = json.loads((run_dir / "results.json").read_text())
    print(f"\n[cl-fed demo] done in {time.perf_counter() - start:.0f} s\n")
    print(result_table(results))
    print(f"\n[cl-fed demo] results: {run_dir / 'results.json'}")
    print(f"[cl-fed demo] report:  {run_dir / 'report.md'}")
    return 0


def result_table(results: dict) -> str:
    """A short aligned table over results.json: per stage's test set the starting base's WER, the WER
    after training on that stage (R[j][j]) and after the last stage, each with its change relative
    to the starting base; per other test set (the foundation domain) the WER at start and at the
    end; then AWER and BWT."""
    stages, matrix = results["stages"], results["wer_matrix"]
    initial = results.get("initial_wer") or [None] * len(stages)
    joint = results.get("schedule", {}).get("mode") == "joint"  # one row, no per-stage diagonal
    last = matrix[-1] if matrix else [None] * len(stages)
    rows = [["test set", "initial base", "after its stage", "", "at the end", ""]]
    for j, stage in enumerate(stages):
        own = matrix[j][j] if not joint and j < len(matrix) else None
        rows.append([stage, _wer(initial[j]), *_cells(own, initial[j]), *_cells(last[j], initial[j])])
    for name, series in (results.get("other_test_sets") or {}).items():
        begin, end = series.get("initial_wer"), (series.get("wer") or [None])[-1]
        rows.append([f"{name} (base domain)", _wer(begin), "-", "", *_cells(end, begin)])
    m = results.get("metrics") or {}
    return "\n".join(
        ["WER (%); in brackets the change relative to the initial base"]
        + _align(rows)
        + [f"AWER {_wer(m.get('awer'))}, BWT {_signed(m.get('bwt'))} (negative = forgetting)"]
    )


def _cells(value, before) -> list[str]:
    """A WER and its change relative to `before`: two cells of the table."""
    return [_wer(value), _change(value, before)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _wer(value) -> str:
    return f"{value:.1f}" if _finite(value) else "n/a"


def _signed(value) -> str:
    return f"{value:+.1f}" if _finite(value) else "n/a"


def _change(value, before) -> str:
    """`(-52%)`: the relative change from `before` to `value`; "" unless both are known (and before > 0)."""
    if not (_finite(value) and _finite(before)) or before <= 0:
        return ""
    change = round(100 * (value - before) / before)
    return f"({change:+d}%)" if change else "(0%)"


def _align(rows: list[list[str]]) -> list[str]:
    """Names left-aligned, WERs right-aligned, each change (a column headed "") left-aligned after
    its WER; a column of no changes at all is left out."""
    columns = [i for i in range(len(rows[0])) if any(row[i] for row in rows)]
    widths = {i: max(len(row[i]) for row in rows) for i in columns}
    left = {i for i in columns if i == 0 or not rows[0][i]}
    return [
        "  ".join(row[i].ljust(widths[i]) if i in left else row[i].rjust(widths[i]) for i in columns).rstrip()
        for row in rows
    ]


if __name__ == "__main__":
    sys.exit(main())
