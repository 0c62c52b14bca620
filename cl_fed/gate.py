"""Merge gates: merge only what helps, judged on validation data, never on test sets.

With `merge-gate=validate`, before a scheduled merge is committed the runner scores the candidate
base (what the merge would make) and the current base on validation rows (cl_fed.data.stream:
a `validation-share` of each site's rows of every stage, held out of training), and

    judge(before, after, current, earlier, min_gain, max_regression) -> Verdict

passes it if the current stage's validation WER falls by at least `gate-min-gain` points and no
earlier stage's rises by more than `gate-max-regression`. A failed merge is skipped (the pool and
adapter are dropped, the sites train on the committed base again) or, with `gate-fallback=shrink`,
tried once more at half weight. `gate-sites=alone` also judges each site's update alone before a
round is aggregated (`judge_site`: its model must not be worse than the base on its stage, nor far
worse than the other sites' on any), so that one faulty site does not spoil the merge: the sites
that fail are left out of that round, with the numbers.

Every decision is a plain dict, recorded in results.json (`gate`) and printed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from cl_fed.config import RunConfig

VALIDATION = "val/"  # prefix of a validation set's name: "val/<stage>"

Score = Callable[[dict, list[str]], dict[str, float]]  # (weights, stage names) -> validation WER per stage


def validation_name(stage: str) -> str:
    return VALIDATION + stage


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str
    gain: float  # how far the current stage's validation WER fell (points; negative: it rose)
    worst_regression: float  # the largest rise of an earlier stage's validation WER (0 if none rose)


def judge(
    before: dict[str, float],
    after: dict[str, float],
    current: str,
    earlier: list[str],
    min_gain: float,
    max_regression: float,
) -> Verdict:
    """Does `after` (the candidate's validation WER per stage) improve on `before` enough?"""
    gain = before[current] - after[current]
    rises = {s: after[s] - before[s] for s in earlier}
    worst = max([0.0, *rises.values()])
    if not math.isfinite(gain):
        return Verdict(False, f"{current}: no validation WER to judge by", gain, worst)
    if gain < min_gain:
        return Verdict(
            False,
            f"{current} validation WER {before[current]:.1f} -> {after[current]:.1f}: gain {gain:+.1f} "
            f"< gate-min-gain {min_gain:g}",
            gain,
            worst,
        )
    for stage, rise in rises.items():
        if rise > max_regression:
            return Verdict(
                False,
                f"{stage} validation WER {before[stage]:.1f} -> {after[stage]:.1f}: rises {rise:+.1f} "
                f"> gate-max-regression {max_regression:g}",
                gain,
                worst,
            )
    return Verdict(
        True, f"{current} validation WER {before[current]:.1f} -> {after[current]:.1f}", gain, worst
    )


def gate_merge(cfg: RunConfig, state, step, stages: list[str], scale: float, score: Score) -> dict:
    """Decide the committing Merge `step` (cl_fed.plan) of `state` (cl_fed.state.ContinualState): the
    decision dict, whose `weight` is what to merge at (0: skip)."""
    tick = time.perf_counter()
    current, earlier = stages[step.stage], list(stages[: step.stage])
    names = [current, *earlier]
    before = score(state.base, names)
    tries = []
    weights = (1.0, 0.5) if cfg.gate_fallback == "shrink" else (1.0,)
    for weight in weights:
        after = score(
            state.candidate(scale, cfg.merge, weight, getattr(step, "residual_to_base", False)), names
        )
        verdict = judge(before, after, current, earlier, cfg.gate_min_gain, cfg.gate_max_regression)
        tries.append(
            {"weight": weight, "validation_wer": after, "passed": verdict.passed, "reason": verdict.reason}
        )
        if verdict.passed:
            break
    passed = tries[-1]["passed"]
    return {
        "stage": step.stage,
        "round": step.round,
        "stage_name": current,
        "decision": ("merged" if tries[-1]["weight"] == 1.0 else "merged-shrunk") if passed else "skipped",
        "weight": tries[-1]["weight"] if passed else 0.0,
        "reason": tries[-1]["reason"],
        "validation_wer_before": before,
        "tries": tries,
        "seconds": round(time.perf_counter() - tick, 3),  # what the gate cost: its evaluations
    }


def judge_site(
    before: dict[str, float], after: dict[str, float], peers: dict[str, float], current: str, tolerance: float
) -> Verdict:
    """One site's model (`after`) against the committed base (`before`) and the median of all the
    sites' models (`peers`): it must not be worse than the base on the stage it trained on, nor an
    outlier among its peers on any stage, by more than `tolerance` points. (Every site's model alone
    forgets earlier stages somewhat; the one that is far worse than the others is what is wrong.)"""
    gain = before[current] - after[current]
    rises = {s: after[s] - peers[s] for s in after}
    worst = max([0.0, *rises.values()])
    if not math.isfinite(gain):
        return Verdict(False, f"{current}: no validation WER to judge by", gain, worst)
    if -gain > tolerance:
        return Verdict(
            False,
            f"{current} validation WER {before[current]:.1f} -> {after[current]:.1f} alone: worse than "
            f"the base by {-gain:.1f} > gate-max-regression {tolerance:g}",
            gain,
            worst,
        )
    for stage, rise in rises.items():
        if rise > tolerance:
            return Verdict(
                False,
                f"{stage} validation WER {after[stage]:.1f} alone, the sites' median {peers[stage]:.1f}: "
                f"{rise:+.1f} > gate-max-regression {tolerance:g}",
                gain,
                worst,
            )
    return Verdict(
        True, f"{current} validation WER {before[current]:.1f} -> {after[current]:.1f} alone", gain, worst
    )


def gate_sites(
    cfg: RunConfig, base: dict, candidates: dict[str, dict], stage: int, stages: list[str], score: Score
) -> dict[str, dict]:
    """`gate-sites=alone`: each site's model (`candidates`: site -> its weights) judged by `judge_site`
    against the committed `base` and the other sites' models; site -> {"passed", "reason",
    "validation_wer"}."""
    names = [stages[stage], *stages[:stage]]
    before = score(base, names)
    scores = {site: score(weights, names) for site, weights in candidates.items()}
    peers = {n: statistics.median(s[n] for s in scores.values()) for n in names}
    out = {}
    for site, after in scores.items():
        verdict = judge_site(before, after, peers, stages[stage], cfg.gate_max_regression)
        out[site] = {"passed": verdict.passed, "reason": verdict.reason, "validation_wer": after}
    return out


def gate_line(decision: dict) -> str:
    """One printed line per merge decision."""
    weight = f" at weight {decision['weight']:g}" if decision["decision"] == "merged-shrunk" else ""
    where = f"{decision['stage_name']} round {decision['round'] + 1}"
    return f"[cl-fed] merge gate after {where}: {decision['decision']}{weight} ({decision['reason']})"
