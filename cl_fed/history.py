"""Reversible merge history: every centralization a run commits, recorded as one step.

    <run-dir>/history/
        history.json            the steps: stage, round, sites and weights, checksums, evaluation
        step-NNN.safetensors    what step NNN changed: delta/<key> = after - before (float64)

Step 0 is the starting base (its checksum only). A delta is the float64 difference of the weights
after and before the merge; undoing it (`after - delta`, rounded to the weight's dtype) gives the
weights before bit for bit, which `record` checks on writing; a weight for which float64 cannot
hold the difference exactly is stored whole instead (before/<key> and after/<key>). So the base
after any step is the final base with the later steps undone (`base_at`), checked against the
checksum the run recorded. Plain tensors and JSON, written atomically; no pickle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cl_fed.io import atomic_save_tensors, atomic_write_json, load_tensors

FORMAT = "cl-fed-history/1"
FOLDER = "history"
INDEX = "history.json"


def step_file(step: int) -> str:
    return f"step-{step:03d}.safetensors"


def change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors that take `before` to `after` exactly: delta/<key> where float64 holds the
    difference exactly (both ways), else before/<key> and after/<key>; unchanged keys are left out."""
    if set(before) != set(after):
        raise ValueError(
            f"history: the merge changed which weights exist: {sorted(set(before) ^ set(after))[:5]}"
        )
    out = {}
    for key in sorted(before):
        old, new = before[key], after[key]
        if old is new or torch.equal(old, new):
            continue
        if old.is_floating_point():
            delta = new.to(torch.float64) - old.to(torch.float64)
            if torch.equal(undo_delta(new, delta), old) and torch.equal(redo_delta(old, delta), new):
                out[f"delta/{key}"] = delta
                continue
        out[f"before/{key}"], out[f"after/{key}"] = old.clone(), new.clone()
    return out


def undo_delta(after: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (after.to(torch.float64) - delta).to(after.dtype)


def redo_delta(before: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (before.to(torch.float64) + delta).to(before.dtype)


def undo(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights before a step, from the weights after it and the step's tensors."""
    out = dict(weights)
    for name, tensor in tensors.items():
        kind, _, key = name.partition("/")
        if key not in out:
            raise ValueError(f"history: step changes {key!r}, which the weights do not have")
        if kind == "delta":
            out[key] = undo_delta(out[key], tensor)
        elif kind == "before":
            out[key] = tensor
    return out


class MergeHistory:
    """The history of one run directory, as the runner writes it."""

    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / FOLDER
        self.index = self.folder / INDEX

    def load(self) -> dict:
        if not self.index.is_file():
            raise FileNotFoundError(f"{self.index}: no merge history (a run of cl-fed before merge history?)")
        data = json.loads(self.index.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"{self.index}: format {data.get('format')!r}, expected {FORMAT!r}")
        return data

    def start(self, checksum: str, resume: bool = False) -> None:
        """Step 0, the starting base; a resumed run keeps the history it has (same starting base),
        a new one replaces an earlier run's under the same name."""
        if not resume and self.folder.exists():
            shutil.rmtree(self.folder)
        if self.index.is_file():
            data = self.load()
            if data["steps"][0]["checksum_after"] != checksum:
                raise ValueError(f"{self.index}: the history starts from another base; use another run-name")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        step0 = {"step": 0, "kind": "start", "stage": None, "round": None, "server_round": 0}
        atomic_write_json(self.index, {"format": FORMAT, "steps": [{**step0, "checksum_after": checksum}]})

    def record(self, before: dict, after: dict, checksums: tuple[str, str], meta: dict) -> int:
        """Append a committed merge (`meta`: stage, round, server_round, contributions, gate...);
        returns its step number. Steps of an interrupted attempt at or after this server round go."""
        data = self.load()
        steps = data["steps"]
        if meta.get("kind", "merge") == "merge":
            steps = [s for s in steps if s["step"] == 0 or s["server_round"] < meta["server_round"]]
        if steps[-1]["checksum_after"] != checksums[0]:
            raise ValueError(
                f"{self.index}: the merge starts from base {checksums[0][:12]}, the history ends at "
                f"{steps[-1]['checksum_after'][:12]}"
            )
        number = len(steps)
        tensors = change(before, after)
        atomic_save_tensors(self.folder / step_file(number), tensors, {"step": number})
        changed = sorted({name.partition("/")[2] for name in tensors})
        steps.append(
            {
                "step": number,
                "kind": "merge",
                **meta,
                "checksum_before": checksums[0],
                "checksum_after": checksums[1],
                "changed": changed,
                "file": step_file(number),
                "evaluation": None,
            }
        )
        atomic_write_json(self.index, {**data, "steps": steps})
        return number

    def boundary(self) -> int:
        """The server round of the last merge decision (a step, or a merge the gate skipped)."""
        data = self.load()
        return max(
            [s["server_round"] for s in data["steps"]] + [s["server_round"] for s in data.get("skipped", [])]
        )

    def skipped(self, decision: dict) -> None:
        """A merge the gate refused: listed beside the steps, nothing applied."""
        data = self.load()
        kept = [s for s in data.get("skipped", []) if s["server_round"] < decision["server_round"]]
        atomic_write_json(self.index, {**data, "skipped": [*kept, decision]})

    def evaluated(self, label: str, wer: dict[str, float]) -> None:
        """The evaluation after the steps that have none yet (the next one the run makes)."""
        data = self.load()
        for step in data["steps"]:
            if step.get("evaluation") is None:
                step["evaluation"] = {"label": label, "wer": wer}
        atomic_write_json(self.index, data)

    def base_at(self, step: int, final: dict[str, torch.Tensor], final_checksum: str, checksum) -> dict:
        """The base after `step`: `final` (the base after the last step) with the later steps undone;
        every intermediate base is checked against the checksum the run recorded."""
        steps = self.load()["steps"]
        if not 0 <= step < len(steps):
            raise ValueError(f"{self.index}: no step {step}; the history has steps 0..{len(steps) - 1}")
        if final_checksum != steps[-1]["checksum_after"]:
            raise ValueError(
                f"{self.index}: the base given is {final_checksum[:12]}, the last step "
                f"{steps[-1]['step']} left {steps[-1]['checksum_after'][:12]}"
            )
        weights = dict(final)
        for later in reversed(steps[step + 1 :]):
            tensors, _ = load_tensors(self.folder / later["file"])
            weights = undo(weights, tensors)
            got = checksum(weights)
            if got != later["checksum_before"]:
                raise ValueError(
                    f"{self.folder / later['file']}: undoing step {later['step']} gives base {got[:12]}, "
                    f"the run recorded {later['checksum_before'][:12]} (a damaged history?)"
                )
        return weights


def contributions(rounds: list[dict], since: int) -> list[dict]:
    """What each round after server round `since` contributed to a merge: its sites and weights."""
    out = []
    for r in rounds:
        if r["server_round"] > since:
            sites = list(r.get("clients_used", []))
            weights = r.get("weights") or [1.0 / max(len(sites), 1)] * len(sites)
            out.append({"server_round": r["server_round"], "sites": sites, "weights": list(weights)})
    return out
