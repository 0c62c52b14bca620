"""Walking a continual plan: one loop for the single-site runner, the ServerApp and `local` sites.

The caller says how a Train step becomes an aggregate (in process: train and aggregate directly;
the ServerApp: a Flower round through its strategy) and how to evaluate and checkpoint; the walk
applies Aggregate and Merge steps to the ContinualState the same way for everyone.
"""

from __future__ import annotations

from collections.abc import Callable

from cl_fed.plan import Aggregate, Checkpoint, Evaluate, Merge, Step, Train
from cl_fed.state import ContinualState


def apply_step(state: ContinualState, step: Step, aggregated: dict | None, scale: float, mode: str) -> bool:
    """Apply an Aggregate or Merge step; returns whether it changed the state. A round without a
    usable update leaves the state as it was; a Merge with nothing aggregated since the last one
    has nothing to pool."""
    if isinstance(step, Aggregate):
        if aggregated is None:
            return False
        state.apply(step.rule, aggregated)
        return True
    if isinstance(step, Merge):
        if state.adapter is None:
            return False
        state.merge(scale, mode, step.commit, residual_to_base=step.residual_to_base)
        return True
    raise TypeError(f"apply_step: {type(step).__name__} is not an Aggregate or Merge step")


def walk(
    plan: list[Step],
    state: ContinualState,
    *,
    scale: float,
    mode: str,
    train: Callable[[Train], dict | None],
    evaluate: Callable[[Evaluate], None],
    checkpoint: Callable[[Checkpoint, int], None] = lambda step, next_index: None,
    merged: Callable[[Merge, dict], None] = lambda step, before: None,
    gate: Callable[[Merge, ContinualState], float] | None = None,
    start: int = 0,
) -> None:
    """Run plan[start:]. `train` returns the round's aggregate (None: no usable update);
    `checkpoint` gets the index to resume at; `merged` is told of every Merge applied, with the base
    before it; `gate` (a merge gate, cl_fed/gate.py) says at which weight a committing Merge is made
    (0: it is skipped, what it would have merged dropped)."""
    aggregated = None
    for index in range(start, len(plan)):
        step = plan[index]
        if isinstance(step, Train):
            aggregated = train(step)
        elif isinstance(step, Merge) and step.commit and gate is not None and state.adapter is not None:
            before, weight = state.base, gate(step, state)
            if weight > 0:
                state.merge(scale, mode, commit=True, weight=weight, residual_to_base=step.residual_to_base)
                merged(step, before)
            else:
                state.discard()
        elif isinstance(step, (Aggregate, Merge)):
            before = state.base
            if apply_step(state, step, aggregated, scale, mode) and isinstance(step, Merge):
                merged(step, before)
        elif isinstance(step, Evaluate):
            evaluate(step)
        elif isinstance(step, Checkpoint):
            checkpoint(step, index + 1)
