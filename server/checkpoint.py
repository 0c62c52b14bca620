"""The server's state after every round: one safetensors file (tensors, no pickle: loading a
checkpoint runs no code) with the run record, position and DP secret as JSON metadata, and a
checksum over both (cl_fed.io), written atomically with file mode 0600.

The DP secret (cl_fed.privacy.new_secret) lives here and nowhere else: not in results.json, not in
any message. A resumed run reads it back and so redraws the very same noise."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from cl_fed import updates
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
    secret: str = "",
    sites_hold: str = "",
) -> None:
    """`next_step` = the index of the plan step to run next; `extra` = more tensors (optimiser);
    `secret` = the server's DP noise secret ("" without DP); `sites_hold` = the checksum of the
    weights the sites were last synced to, from which `state.log` (kept too) brings them to the
    state's weights: a resumed run sends them those operations, not every weight."""
    tensors = {**state.to_tensors(), **{f"extra/{k}": v for k, v in (extra or {}).items()}}
    tensors.update({f"log/{k}": v for k, v in updates.to_tensors(state.log).items()})
    meta = {"next_step": next_step, "has_adapter": state.adapter is not None, "record": asdict(record)}
    if sites_hold:
        meta["sites_hold"] = sites_hold
    if secret:
        meta["dp_secret"] = secret
    atomic_save_tensors(path, tensors, meta)
    if secret and path.stat().st_mode & 0o077:
        raise PermissionError(
            f"{path}: holds the DP noise secret but is readable by other users (mode "
            f"{path.stat().st_mode & 0o777:o}; this filesystem does not keep file modes): put "
            "output-dir on one that does"
        )


class Checkpoint(NamedTuple):
    state: ContinualState
    record: RunRecord
    next_step: int
    extra: dict  # more tensors (a server optimiser's moments)
    secret: str  # the DP noise secret ("" without DP)
    sites_hold: str  # the weights the sites were last synced to ("" unknown); state.log leads from there


def load_checkpoint(path: Path, fresh: ContinualState, config: dict) -> Checkpoint:
    """The checkpoint; refuses a damaged one, or one of another model or config (naming the keys
    that differ; keys that do not change results, cl_fed.config.NOT_IN_NAME, may differ)."""
    tensors, meta = load_tensors(path)
    extra = {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}
    log = updates.from_tensors({k[len("log/") :]: v for k, v in tensors.items() if k.startswith("log/")})
    state = ContinualState.from_tensors(
        {k: v for k, v in tensors.items() if not k.startswith(("extra/", "log/"))},
        has_adapter=bool(meta["has_adapter"]),
    )
    state.log = log
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
    secret = str(meta.get("dp_secret", ""))
    if config.get("dp-noise") and not secret:
        raise ValueError(
            f"{path}: a DP run's checkpoint without the server's noise secret (made by an older "
            "cl-fed?): its noise could not be redrawn; use another run-name"
        )
    sites_hold = str(meta.get("sites_hold", ""))
    return Checkpoint(state, RunRecord(**rec), int(meta["next_step"]), extra, secret, sites_hold)
