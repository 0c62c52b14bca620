"""Local training throughput of the embedded tiny model: LoRA vs full fine-tuning.

Trains on the tiny scenario's foundation train split (generated on first use) and prints seconds of
audio trained per wall second ("x real time") and peak memory. Features are cached before timing, as
in federated rounds after the first. Each mode runs in its own process, so each peak is its own
(ru_maxrss is a process-wide maximum: a mode run after another would report the larger of the two);
the resident memory before training (model, cached features, libraries) is printed next to it.
On CUDA the peak is torch.cuda.max_memory_allocated. Prints figures only; no pass/fail.

    python -m benchmarks.train_speed [--epochs 6] [--batch-size 16] [--threads N] [--device cuda]
        [--mode both|lora|full]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch

from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.data.manifest import load_manifest
from cl_fed.data.synth import generate
from cl_fed.models.tiny import build_tiny
from cl_fed.train import FeatureCache, TrainConfig, train_local

TARGET = "target: LoRA >= 100x real time for the tiny model on 2 cores"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as statm:  # pages: total, resident, ...
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(mode: str, utterances, cache: FeatureCache, args) -> None:
    speech = build_tiny(seed=0).to(args.device)
    if mode == "lora":
        spec = LoraSpec(speech.lora_rank, speech.lora_alpha, speech.lora_dropout, speech.lora_targets)
        speech.model = attach_lora(speech.model, spec, seed=0)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup=0.1, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    resident_before = current_rss_mib()
    train_local(
        speech, utterances[: args.batch_size], TrainConfig(max_steps=2, progress=False), cache=cache
    )  # warm-up
    start = time.perf_counter()
    result = train_local(speech, utterances, config, cache=cache)
    wall = time.perf_counter() - start
    memory = (
        f"cuda peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if args.device.startswith("cuda")
        else f"process peak RSS {peak_rss_mib():.0f} MiB ({resident_before:.0f} MiB before training)"
    )
    speed = result.audio_seconds / wall
    print(
        f"{mode:>4}: {speech.num_parameters(trainable_only=True):>9,} trainable params, "
        f"{result.steps} steps, "
        f"{result.audio_seconds:.0f} s audio in {wall:.1f} s = {speed:.0f}x real time, "
        f"{memory}, final loss {result.step_losses[-1]:.3f}",
        flush=True,
    )
    if mode == "lora":
        print(
            f"      {TARGET} (measured {speed:.0f}x with {torch.get_num_threads()} torch threads)", flush=True
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--mode",
        choices=("both", "lora", "full"),
        default="both",
        help="both: lora, then full, each in a fresh process (default)",
    )
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)  # set for the children
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = generate("tiny", progress=False)
    utterances, _ = load_manifest(dataset / "manifest.jsonl")
    utterances = [u for u in utterances if u.stage == "foundation" and u.split == "train"]
    if not args.no_header:
        print(
            f"tiny-fastconformer-ctc on {len(utterances)} utterances "
            f"({sum(u.seconds for u in utterances):.0f} s audio), device {args.device}, "
            f"{torch.get_num_threads()} torch threads, batch {args.batch_size}, {args.epochs} epochs",
            flush=True,
        )
    if args.mode == "both":
        flags = [f"--epochs={args.epochs}", f"--batch-size={args.batch_size}", f"--device={args.device}"]
        flags += [f"--threads={args.threads}"] if args.threads else []
        for mode in ("lora", "full"):
            command = [
                sys.executable,
                "-m",
                "benchmarks.train_speed",
                *flags,
                f"--mode={mode}",
                "--no-header",
            ]
            subprocess.run(command, check=True)
        return
    cache = FeatureCache()
    speech = build_tiny(seed=0)
    for u in utterances:
        cache.get(speech, u)
    run(args.mode, utterances, cache, args)


if __name__ == "__main__":
    main()
