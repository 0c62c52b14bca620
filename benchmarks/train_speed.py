"""Local training throughput of the embedded tiny model: LoRA vs full fine-tuning.

Trains on the tiny scenario's foundation train split (generated on first use) and prints seconds of
audio trained per wall second ("x real time") and peak memory. Features are cached before timing, as
in federated rounds after the first. Prints figures only; no pass/fail.

    python -m benchmarks.train_speed [--epochs 6] [--batch-size 16] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.data.manifest import load_manifest
from cl_fed.data.synth import generate
from cl_fed.models.tiny import build_tiny
from cl_fed.train import FeatureCache, TrainConfig, train_local


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(mode: str, utterances, cache: FeatureCache, args) -> None:
    speech = build_tiny(seed=0).to(args.device)
    if mode == "lora":
        spec = LoraSpec(speech.lora_rank, speech.lora_alpha, speech.lora_dropout, speech.lora_targets)
        speech.model = attach_lora(speech.model, spec, seed=0)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, warmup_steps=10, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    train_local(speech, utterances[: args.batch_size], TrainConfig(max_steps=2, progress=False), cache=cache)  # warm-up
    start = time.perf_counter()
    result = train_local(speech, utterances, config, cache=cache)
    wall = time.perf_counter() - start
    memory = (
        f"cuda peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        if args.device.startswith("cuda")
        else f"process peak RSS {peak_rss_mib():.0f} MiB"
    )
    print(
        f"{mode:>4}: {speech.num_parameters(trainable_only=True):>9,} trainable params, {result.steps} steps, "
        f"{result.audio_seconds:.0f} s audio in {wall:.1f} s = {result.audio_seconds / wall:.0f}x real time, "
        f"{memory}, final loss {result.step_losses[-1]:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = generate("tiny", progress=False)
    utterances, _ = load_manifest(dataset / "manifest.jsonl")
    utterances = [u for u in utterances if u.stage == "foundation" and u.split == "train"]
    cache = FeatureCache()
    speech = build_tiny(seed=0)
    for u in utterances:
        cache.get(speech, u)
    print(
        f"tiny-fastconformer-ctc on {len(utterances)} utterances "
        f"({sum(u.seconds for u in utterances):.0f} s audio), device {args.device}, "
        f"{torch.get_num_threads()} torch threads, batch {args.batch_size}, {args.epochs} epochs"
    )
    for mode in ("lora", "full"):
        run(mode, utterances, cache, args)


if __name__ == "__main__":
    main()
