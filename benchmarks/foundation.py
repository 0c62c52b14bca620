"""Train a scenario's foundation base from scratch and compare it with the committed one.

    python -m benchmarks.foundation [--scenario default]

Uses a private, empty cache (so nothing is reused: synthesis and training both run), prints the
foundation test WER/CER and the wall time, and how far the new weights are from the base shipped in
cl_fed/models/bases/ (bit-identical on the machine that made it; within float noise elsewhere).
Target (issue 11): <= 15% WER on the foundation test set. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from cl_fed.data.scenario import load_scenario
from cl_fed.models.foundation import (
    FOUNDATION_TRAIN,
    INFO_FILE,
    committed_base,
    foundation_base,
    foundation_key,
)


def max_difference(a: Path, b: Path) -> float:
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.foundation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenario", default="default")
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cl-fed-foundation-bench-") as cache:
        path = foundation_base(scenario, cache_dir=cache, committed=False)
        info = json.loads((path / INFO_FILE).read_text())
        print(
            f"[foundation] {args.scenario}: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads"
        )
        print(
            f"[foundation] {info['train_utterances']} train utterances ({info['train_audio_hours']} h), "
            f"{info['steps']} steps: test WER {info['wer']:.1f}%, CER {info['cer']:.1f}% "
            f"(target WER <= 15) in {info['train_seconds']:.0f} s training, "
            f"{time.perf_counter() - start:.0f} s with synthesis"
        )
        shipped = committed_base(foundation_key(scenario, FOUNDATION_TRAIN))
        if shipped is None:
            print("[foundation] no committed base for this recipe")
        else:
            committed = json.loads((shipped / INFO_FILE).read_text())
            print(
                f"[foundation] committed base: WER {committed['wer']:.1f}%, CER {committed['cer']:.1f}%; "
                f"largest weight difference {max_difference(path, shipped):.3g}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
