"""Whisper's encoder window (`whisper-window`): speed against accuracy, on Whisper tiny.en.

Whisper pads every clip to 30 s; a factory's commands last a few seconds. `whisper-window=S` cuts
the positional embeddings and the padding to S seconds, so the encoder's cost falls with S. The
pretrained model never saw a short window, so it may decode worse until fine-tuned. For each
window this prints, on the en-plant scenario: the pretrained model's WER and decoding time on the
foundation and first-stage test sets, the time of one LoRA epoch on the first stage's training
data of both sites (r=32 q/v, lr 1e-3), and the first stage's WER after it.

    python -m benchmarks.whisper_window [--windows 30,15,8] [--epochs 1]

Needs the `whisper-tiny-en` extra (part of the dev setup). Prints figures only; no pass/fail.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from cl_fed.adapters import attach_lora
from cl_fed.config import make_config
from cl_fed.continual import lora_spec, prepare_data, with_model_options
from cl_fed.evaluate import evaluate
from cl_fed.models.registry import build_model
from cl_fed.train import FeatureCache, TrainConfig, train_local


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="30,15,8", help="seconds, comma-separated (30 = Whisper's own)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    _, stream = prepare_data(make_config({"scenario": "en-plant"}), progress=False)
    first = stream.stages[0]
    foundation = stream.foundation("test")
    test = stream.test(first)
    train = [u for site in stream.sites for u in stream.site(site).enter(0)]
    print(
        f"# {platform.node()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads): "
        "whisper-tiny.en "
        f"on en-plant; {len(foundation)} foundation / {len(test)} {first} test clips, "
        f"{len(train)} {first} training clips ({sum(u.seconds for u in train):.0f} s), "
        f"longest clip {max(u.seconds for u in train + test + foundation):.1f} s",
        flush=True,
    )
    for window in [float(w) for w in args.windows.split(",")]:
        cfg = make_config({"model": "whisper-tiny.en", "whisper-window": 0.0 if window >= 30 else window})
        speech = with_model_options(cfg, build_model("whisper-tiny.en"))
        cache = FeatureCache()
        start = time.perf_counter()
        sets = {"foundation": foundation, first: test}
        before = {name: evaluate(speech, rows, cache=cache)["wer"] for name, rows in sets.items()}
        decode = time.perf_counter() - start
        speech.model = attach_lora(speech.model, lora_spec(cfg, speech), seed=0)
        config = TrainConfig(epochs=args.epochs, batch_size=16, lr=args.lr, warmup=0.1, progress=False)
        start = time.perf_counter()
        result = train_local(speech, train, config, cache=cache)
        seconds = time.perf_counter() - start
        after = evaluate(speech, test, cache=cache)["wer"]
        print(
            f"window {window:4.0f} s: pretrained WER "
            + ", ".join(f"{name} {wer:.1f}" for name, wer in before.items())
            + f" (decoding {decode:.0f} s); LoRA {result.steps} steps in {seconds:.0f} s "
            f"({result.audio_seconds / seconds:.1f}x real time); {first} WER after {after:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
