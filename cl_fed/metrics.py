"""Scoring (WER/CER via jiwer) and continual-learning metrics over a results matrix (pure).

Scoring: both sides go through cl_fed.textnorm.normalize_text first; rates are corpus-level
(total errors / total reference units) in percent. An empty hypothesis is allowed (all deletions);
a reference that is empty after normalisation is an error.

Results matrix (T stages, 0-based): R[i][j] = WER on stage j's test set after training through
stage i, for every j (also stages not trained yet). initial[j] = WER of the starting base on stage j.
All WERs are "lower is better"; the signs below are chosen so the usual reading holds.

Each metric, with its sign convention (WER in percent points):

- awer = mean_j R[T-1][j]
    average WER over all stages after the last stage.
- new_stage_wer = mean_j R[j][j]
    WER on each stage right after learning it.
- bwt = mean_{j<T-1} (R[j][j] - R[T-1][j])
    backward transfer; negative = forgetting, positive = later stages helped. None if T == 1.
- forgetting = mean_{j<T-1} (R[T-1][j] - min_{l in [j, T-2]} R[l][j])
    distance from each stage's best WER so far; positive = forgotten. None if T == 1.
- fwt = mean_j (single_task[j] - R[j][j])            when single_task is given
      = mean_{j>=1} (initial[j] - R[j-1][j])        else when initial is given (None if T == 1)
    forward transfer; positive = earlier learning helped. single_task[j] is the WER of a model
    fine-tuned on stage j alone; initial[j] the starting base's WER on stage j. Else None.
    The two are different quantities, so the result says which one it is:
    fwt_definition = "single-task" | "initial" | None (None exactly when fwt is None).
- intransigence = mean_j (R[j][j] - joint[j])       when joint is given, else None
    positive = stages are learnt worse than by joint training on all data; joint[j] is the joint
    model's WER on stage j's test set (the single row of a joint run's WER matrix).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

from cl_fed.textnorm import normalize_text

FWT_SINGLE_TASK = "single-task"  # metrics["fwt_definition"]: which forward transfer "fwt" holds
FWT_INITIAL = "initial"
FWT_DEFINITIONS = (FWT_SINGLE_TASK, FWT_INITIAL)


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts behind a WER/CER, so results can be summed over shards and recomputed."""

    substitutions: int
    deletions: int
    insertions: int
    reference_length: int  # words for unit="word", characters for unit="char"
    unit: str = "word"

    @property
    def rate(self) -> float:
        """Error rate in percent."""
        return 100.0 * (self.substitutions + self.deletions + self.insertions) / self.reference_length

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if other.unit != self.unit:
            raise ValueError(f"cannot add {self.unit} counts to {other.unit} counts")
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_length + other.reference_length,
            self.unit,
        )


def _normalised_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no references to score")
    refs, hyps = [], []
    for index, (ref, hyp) in enumerate(zip(references, hypotheses)):
        if not isinstance(ref, str) or not isinstance(hyp, str):
            raise TypeError(
                f"pair {index}: reference and hypothesis must be str, got "
                f"{type(ref).__name__} and {type(hyp).__name__}"
            )
        ref_norm = normalize_text(ref)
        if not ref_norm:
            raise ValueError(f"reference {index} is empty after normalisation: {ref!r}")
        refs.append(ref_norm)
        hyps.append(normalize_text(hyp))
    return refs, hyps


def error_counts(references: Sequence[str], hypotheses: Sequence[str], unit: str = "word") -> ErrorCounts:
    """Substitutions, deletions, insertions and reference length after normalisation (unit word|char)."""
    refs, hyps = _normalised_pairs(references, hypotheses)
    if unit == "word":
        out = jiwer.process_words(refs, hyps)
    elif unit == "char":
        out = jiwer.process_characters(refs, hyps)
    else:
        raise ValueError(f"unknown unit {unit!r}; choose 'word' or 'char'")
    reference_length = out.substitutions + out.deletions + out.hits
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, reference_length, unit)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate in percent."""
    return error_counts(references, hypotheses, "word").rate


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus character error rate in percent (spaces between words count as characters)."""
    return error_counts(references, hypotheses, "char").rate


def _finite_vector(values: Sequence[float], length: int, name: str) -> list[float]:
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name} = {values!r} is not a sequence of numbers") from None
    if len(values) != length:
        raise ValueError(
            f"{name} has {len(values)} entries, expected {length} (one per stage; R must be square)"
        )
    numbers = []
    for j, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{j}] = {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{name}[{j}] = {value!r} is not a finite number")
        numbers.append(number)
    return numbers


def _results_matrix(R: Sequence[Sequence[float]]) -> list[list[float]]:
    rows = list(R)
    size = len(rows)
    if size == 0:
        raise ValueError("results matrix R is empty")
    return [_finite_vector(row, size, f"R[{i}]") for i, row in enumerate(rows)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def intransigence(R: Sequence[Sequence[float]], joint: Sequence[float]) -> float:
    """mean_j (R[j][j] - joint[j]): how much worse each stage is learnt than by joint training."""
    R = _results_matrix(R)
    joint = _finite_vector(joint, len(R), "joint")
    return _mean([R[j][j] - joint[j] for j in range(len(R))])


def continual_metrics(
    R: Sequence[Sequence[float]],
    initial: Sequence[float] | None = None,
    joint: Sequence[float] | None = None,
    single_task: Sequence[float] | None = None,
) -> dict[str, float | str | None]:
    """AWER, BWT, forgetting, FWT (and which definition), intransigence and new-stage WER (formulas in
    the module docstring)."""
    R = _results_matrix(R)
    T = len(R)
    last = T - 1
    diagonal = [R[j][j] for j in range(T)]
    metrics: dict[str, float | str | None] = {
        "awer": _mean(R[last]),
        "new_stage_wer": _mean(diagonal),
        "bwt": None,
        "forgetting": None,
        "fwt": None,
        "fwt_definition": None,
        "intransigence": None,
    }
    if T > 1:
        metrics["bwt"] = _mean([R[j][j] - R[last][j] for j in range(last)])
        metrics["forgetting"] = _mean(
            [R[last][j] - min(R[i][j] for i in range(j, last)) for j in range(last)]
        )
    if single_task is not None:
        single_task = _finite_vector(single_task, T, "single_task")
        metrics["fwt"] = _mean([single_task[j] - diagonal[j] for j in range(T)])
        metrics["fwt_definition"] = FWT_SINGLE_TASK
    elif initial is not None:
        initial = _finite_vector(initial, T, "initial")
        if T > 1:
            metrics["fwt"] = _mean([initial[j] - R[j - 1][j] for j in range(1, T)])
            metrics["fwt_definition"] = FWT_INITIAL
    if joint is not None:
        metrics["intransigence"] = intransigence(R, joint)
    return metrics
