"""LoRA training throughput and peak memory for Whisper shapes, and merge time, on whatever device
is present: the figures a user needs to size a GPU run (issue 13).

    python -m benchmarks.gpu                                   # CPU: whisper-tiny shapes, fp32
    python -m benchmarks.gpu --models whisper-tiny,whisper-small,whisper-large-v3-turbo  # a GPU:
                                                               #   fp32 and bf16, +- checkpointing

Each model has its published shapes with random weights (benchmarks/models.py; nothing downloads)
and the project's Whisper LoRA (r=32, alpha=64, q_proj/v_proj, through cl_fed.adapters). Training
is the real `cl_fed.train.train_local` on synthetic noise clips of --clip-seconds, padded to the
encoder window (--window, Whisper's 30 s unless shortened, see `whisper-window`), with the
`precision` and `gradient-checkpointing` keys resolved as a run resolves them (cl_fed.devices).
Each setting runs in its own process, so each peak memory is its own: CUDA max_memory_allocated,
or on the CPU the process's peak RSS. "x real time" counts the clips' seconds, not the padding.
Merge: `cl_fed.centralize.centralize` (float64 on the CPU, what the server runs) against the same
exact product mean on the device in float32, for --sites sites' adapters.
Labels use Whisper tiny.en's tokenizer (the `whisper-tiny-en` extra, part of the dev setup).
Prints figures only; no pass/fail.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from benchmarks.models import WHISPER_SIZES, build, name_list
from cl_fed.adapters import adapter_state, attach_lora, base_state
from cl_fed.centralize import base_key, centralize, example_weights, lora_pairs
from cl_fed.data.utterance import Utterance
from cl_fed.devices import amp_mode, enable_gradient_checkpointing, resolve_device
from cl_fed.train import FeatureCache, TrainConfig, train_local

SAMPLE_RATE = 16000
WORDS = "stop the press check the welding seam move pallet four to bay nine".split()


def whisper_speech(name: str, window: float):
    """A WhisperSpeech of `name`'s shapes (random weights, LoRA attached) and its LoRA spec."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    from cl_fed.models.hf import WhisperSpeech
    from cl_fed.models.registry import whisper_tiny_en

    _, model, spec = build(name)
    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    processor = WhisperProcessor(extractor, WhisperTokenizer.from_pretrained(whisper_tiny_en()))
    model.generation_config.is_multilingual = False  # English prompts: <|startoftranscript|><|notimestamps|>
    speech = WhisperSpeech(model, processor, name=name)
    if window < 30:
        speech.set_window(window)
    speech.model = attach_lora(speech.model, spec, seed=0)
    return speech, spec


def clips(folder: Path, count: int, seconds: float) -> list[Utterance]:
    """`count` noise clips with short English transcripts (what they say does not matter here)."""
    rng = np.random.default_rng(0)
    utterances = []
    for i in range(count):
        path = folder / f"clip{i}.wav"
        sf.write(
            path, (0.05 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype("float32"), SAMPLE_RATE
        )
        text = " ".join(rng.choice(WORDS, size=8))
        utterances.append(Utterance(id=f"clip{i}", audio=str(path), text=text, seconds=seconds))
    return utterances


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_one(args: argparse.Namespace, name: str, precision: str, checkpointing: bool) -> None:
    device = resolve_device(args.device)
    amp = amp_mode(precision, device)
    speech, _ = whisper_speech(name, args.window)
    if checkpointing:
        enable_gradient_checkpointing(speech.model)
    speech.to(device)
    with tempfile.TemporaryDirectory() as folder:
        utterances = clips(Path(folder), args.batch_size * args.steps, args.clip_seconds)
        cache = FeatureCache()
        config = TrainConfig(
            max_steps=1, batch_size=args.batch_size, lr=1e-3, amp=amp, spec_augment=False, progress=False
        )
        train_local(speech, utterances[: args.batch_size], config, cache=cache)  # warm-up, features cached
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        config = TrainConfig(
            max_steps=args.steps,
            batch_size=args.batch_size,
            lr=1e-3,
            amp=amp,
            spec_augment=False,
            progress=False,
        )
        start = time.perf_counter()
        result = train_local(speech, utterances, config, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    memory = "CUDA peak" if device.type == "cuda" else "peak RSS"
    print(
        f"{name:>24} {precision:>5} ckpt={'on ' if checkpointing else 'off'}: "
        f"{result.audio_seconds / wall:7.1f}x real time ({result.steps} steps of {args.batch_size} x "
        f"{args.clip_seconds:g} s in a {speech.model.base_model.model.config.max_source_positions / 50:g} s "
        f"window, {wall:.1f} s), {memory} {peak_memory_mib(device):,.0f} MiB, "
        f"loss {result.step_losses[-1]:.2f}",
        flush=True,
    )


def device_product_mean(base, adapters, weights, scale, device) -> dict[str, torch.Tensor]:
    """The exact product mean on `device` in float32: W + s * sum_i p_i B_i A_i, for comparison."""
    merged = {}
    for path, (a_key, b_key) in lora_pairs(adapters[0]).items():
        key = base_key(path)
        delta = sum(
            p * (adapter[b_key].to(device) @ adapter[a_key].to(device))
            for p, adapter in zip(weights, adapters)
        )
        merged[key] = base[key].to(device) + scale * delta
    return merged


def merge(args: argparse.Namespace, name: str) -> None:
    device = resolve_device(args.device)
    _, model, spec = build(name)
    peft_model = attach_lora(model, spec, seed=0)
    base = base_state(peft_model)
    generator = torch.Generator().manual_seed(0)
    shapes = {key: tensor.shape for key, tensor in adapter_state(peft_model).items()}
    adapters = [
        {key: 0.01 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
        for _ in range(args.sites)
    ]
    weights = example_weights([100 + 7 * i for i in range(args.sites)])
    start = time.perf_counter()
    centralize(base, adapters, weights, spec.scale, "product")
    cpu = time.perf_counter() - start
    line = f"{name:>24} merge of {args.sites} sites: CPU float64 {cpu:.2f} s (what the server runs)"
    if device.type != "cpu":
        on_device = {
            k: v.to(device) for k, v in base.items() if k in {base_key(p) for p in lora_pairs(shapes)}
        }
        for _ in range(2):  # the first call pays for kernels and transfers
            start = time.perf_counter()
            device_product_mean(on_device, adapters, weights, spec.scale, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        line += f"; {device} float32 {seconds:.3f} s (adapters moved to the device included)"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    whisper = tuple(WHISPER_SIZES)
    parser.add_argument(
        "--models", type=name_list(whisper, "--models"), default=None, help=", ".join(whisper)
    )
    parser.add_argument(
        "--device", default="auto", help="as the run-config key: auto, cpu, cuda, cuda:N, mps"
    )
    parser.add_argument(
        "--precisions", default=None, help="comma-separated (default: fp32, and bf16 on CUDA)"
    )
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to try")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clip-seconds", type=float, default=5.0)
    parser.add_argument(
        "--window", type=float, default=30.0, help="encoder window in seconds (whisper-window)"
    )
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model,precision,ckpt: a child
    args = parser.parse_args(argv)
    if args.one:
        name, precision, checkpointing = args.one.split(",")
        train_one(args, name, precision, checkpointing == "on")
        return
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    models = args.models or (
        ["whisper-tiny", "whisper-small", "whisper-large-v3-turbo"] if cuda else ["whisper-tiny"]
    )
    precisions = args.precisions.split(",") if args.precisions else ["fp32", "bf16"] if cuda else ["fp32"]
    gpu = f", {torch.cuda.get_device_name(device)}" if cuda else ""
    print(
        f"# {platform.node()}: device {device}{gpu}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; "
        f"LoRA r=32 q/v, batch {args.batch_size} x {args.clip_seconds:g} s clips, {args.steps} timed steps",
        flush=True,
    )
    flags = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("device", "batch_size", "steps", "clip_seconds", "window")
    ]
    for name, precision, checkpointing in itertools.product(
        models, precisions, args.checkpointing.split(",")
    ):
        command = [
            sys.executable,
            "-m",
            "benchmarks.gpu",
            *flags,
            f"--one={name},{precision},{checkpointing}",
        ]
        done = subprocess.run(command)
        if done.returncode:
            print(
                f"{name:>24} {precision:>5} ckpt={checkpointing}: failed (exit {done.returncode}, see above)"
            )
    for name in models:
        merge(args, name)


if __name__ == "__main__":
    main()
