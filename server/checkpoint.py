"""The server's state after every round: one safetensors file (tensors, no pickle: loading a
checkpoint runs no code) with the run record and position as JSON metadata, written atomically."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from cl_fed.config import NOT_IN_NAME
from cl_fed.io import atomic_save_tensors, load_tensors
from cl_fed.results import Evaluation, RunRecord
from cl_fed.state import ContinualState

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(
    path: Path,
    state: ContinualState,
    record: RunRecord,
    next_step: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """`next_step` = the index of the plan step to run next; `extra` = more tensors (optimiser)."""
    tensors = {**state.to_tensors(), **{f"extra/{k}": v for k, v in (extra or {}).items()}}
    meta = {"next_step": next_step, "has_adapter": state.adapter is not None, "record": asdict(record)}
    atomic_save_tensors(path, tensors, meta)


def load_checkpoint(
    path: Path, fresh: ContinualState, config: dict
) -> tuple[ContinualState, RunRecord, int, dict]:
    """(state, record, next step, extra tensors); refuses a checkpoint of another model or config."""
    tensors, meta = load_tensors(path)
    extra = {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}
    state = ContinualState.from_tensors(
        {k: v for k, v in tensors.items() if not k.startswith("extra/")},
        has_adapter=bool(meta["has_adapter"]),
    )
    if set(state.base) != set(fresh.base):
        raise ValueError(
            f"{path}: the checkpoint's model does not match this run's model; "
            "use another run-name or delete the checkpoint"
        )
    rec = dict(meta["record"])
    saved = {k: v for k, v in rec["config"].items() if k not in NOT_IN_NAME}
    now = {k: v for k, v in config.items() if k not in NOT_IN_NAME}
    if saved != now:
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(
            f"{path}: made with another run config (differs in {', '.join(differ)}); resume with "
            "the same config, or use another run-name"
        )
    rec["initial"] = Evaluation(**rec["initial"]) if rec["initial"] else None
    rec["after_stage"] = [Evaluation(**e) for e in rec["after_stage"]]
    return state, RunRecord(**rec), int(meta["next_step"]), extra
