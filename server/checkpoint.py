"""The server's state after every round, written atomically, so `resume` loses nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from cl_fed.io import atomic_torch_save
from cl_fed.results import Evaluation, RunRecord
from server.strategies import MergeInstruction, ServerState


def save_checkpoint(path: Path, state: ServerState, record: RunRecord, position: tuple[int, int]) -> None:
    """`position` = (stage, round) to run next."""
    atomic_torch_save(
        path,
        {
            "position": list(position),
            "base": state.base,
            "checksum": state.checksum,
            "adapter": state.adapter,
            "pool": state.pool,
            "instruction": vars(state.instruction) if state.instruction else None,
            "record": {
                **vars(record),
                "initial": vars(record.initial) if record.initial else None,
                "after_stage": [vars(e) for e in record.after_stage],
            },
        },
    )


def load_checkpoint(path: Path, fresh: ServerState) -> tuple[ServerState, RunRecord, tuple[int, int]]:
    data = torch.load(path, weights_only=False)
    if set(data["base"]) != set(fresh.base):
        raise ValueError(
            f"{path}: the checkpoint's model does not match this run's model; "
            "use another run-name or delete the checkpoint"
        )
    state = ServerState(
        base=data["base"],
        checksum=data["checksum"],
        adapter=data["adapter"],
        pool=data["pool"],
        instruction=MergeInstruction(**data["instruction"]) if data["instruction"] else None,
    )
    rec = dict(data["record"])
    rec["initial"] = Evaluation(**rec["initial"]) if rec["initial"] else None
    rec["after_stage"] = [Evaluation(**e) for e in rec["after_stage"]]
    return state, RunRecord(**rec), tuple(data["position"])
