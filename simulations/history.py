"""A run's merge history: list the centralization steps, roll the base back to any of them.

    python -m simulations.history runs/<run-name>                                # the steps
    python -m simulations.history runs/<run-name> rollback --to 1 --out base-1   # the base after step 1

The listing has one row per step (0 = the starting base): stage and round, the sites that
contributed, the merge weight (a gate's shrunk retry: 0.5), the base checksum after it and the WER
on every test set at the first evaluation after it; merges a gate refused follow the table.
`rollback` writes the base as it was after that step, bit-identical (its checksum is checked
against the one the run recorded at every step undone), as a model directory that loads with
`cl_fed.models.load_model` (and, for Whisper, transformers' `from_pretrained`). The base undone
is the run's `model/` when it is the base after the last step, else the one in its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cl_fed.continual import state_checksum
from cl_fed.history import MergeHistory
from cl_fed.io import load_tensors


def steps_table(history: dict) -> str:
    steps = history["steps"]
    sets = []
    for step in steps:
        for name in (step.get("evaluation") or {}).get("wer", {}):
            if name not in sets:
                sets.append(name)
    head = ["step", "stage", "round", "sites", "weight", "checksum", *[f"WER {s}" for s in sets]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for step in steps:
        sites = sorted({s for c in step.get("contributions", []) for s in c["sites"]})
        wer = (step.get("evaluation") or {}).get("wer", {})
        cells = [
            str(step["step"]),
            f"(rollback to {step['to']})"
            if step.get("kind") == "rollback"
            else step.get("stage_name") or "(start)",
            "" if step["round"] is None else str(step["round"] + 1),
            ", ".join(sites),
            "" if step["step"] == 0 or step.get("kind") == "rollback" else f"{step.get('weight', 1.0):g}",
            step["checksum_after"][:12],
            *[f"{wer[s]:.1f}" if s in wer else "" for s in sets],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for skipped in history.get("skipped", []):
        lines.append(
            f"skipped: after {skipped['stage_name']} round {skipped['round'] + 1} "
            f"(server round {skipped['server_round']}): {skipped['reason']}"
        )
    return "\n".join(lines)


def final_base(run_dir: Path, last_checksum: str) -> tuple[dict, str, str]:
    """(weights, checksum, where from) of the base after the run's last step."""
    from cl_fed.models.registry import load_model

    tried = []
    if (run_dir / "model").is_dir():
        weights = dict(load_model(run_dir / "model").model.state_dict())
        checksum = state_checksum(weights)
        if checksum == last_checksum:
            return weights, checksum, str(run_dir / "model")
        tried.append(f"model/ is {checksum[:12]} (it holds what the last evaluation scored)")
    checkpoint = run_dir / "checkpoint.safetensors"
    if checkpoint.is_file():
        tensors, _ = load_tensors(checkpoint)
        weights = {k[len("base/") :]: v for k, v in tensors.items() if k.startswith("base/")}
        checksum = state_checksum(weights)
        if checksum == last_checksum:
            return weights, checksum, str(checkpoint)
        tried.append(f"the checkpoint's base is {checksum[:12]}")
    raise ValueError(
        f"{run_dir}: no base matches the history's last step ({last_checksum[:12]}): "
        + ("; ".join(tried) or "no model/ and no checkpoint")
    )


def rollback(run_dir: Path, step: int, out: Path) -> str:
    """Write the base after `step` to `out`; returns its checksum."""
    from cl_fed.models.registry import load_model

    history = MergeHistory(run_dir)
    steps = history.load()["steps"]
    final, checksum, _ = final_base(run_dir, steps[-1]["checksum_after"])
    weights = history.base_at(step, final, checksum, state_checksum)
    got = state_checksum(weights)
    if got != steps[step]["checksum_after"]:
        raise ValueError(
            f"step {step}: rebuilt base {got[:12]}, recorded {steps[step]['checksum_after'][:12]}"
        )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; name a new directory")
    speech = load_model(run_dir / "model")
    speech.model.load_state_dict(weights)
    speech.save(out)
    saved = state_checksum(dict(load_model(out).model.state_dict()))
    if saved != got:
        raise ValueError(f"{out}: the saved model reloads as {saved[:12]}, not {got[:12]}")
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.history", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (holds history/)")
    sub = parser.add_subparsers(dest="command")
    back = sub.add_parser("rollback", help="write the base as it was after a step")
    back.add_argument("--to", type=int, required=True, help="the step (0 = the starting base)")
    back.add_argument("--out", type=Path, required=True, help="a new directory for the model")
    parser.add_argument("--traceback", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    try:
        if args.command == "rollback":
            checksum = rollback(args.run_dir, args.to, args.out)
            print(f"[history] wrote {args.out}: the base after step {args.to}, {checksum[:12]}, as recorded")
        else:
            print(steps_table(MergeHistory(args.run_dir).load()))
    except (ValueError, FileNotFoundError, OSError) as error:
        if args.traceback:
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
