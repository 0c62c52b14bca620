"""Local training of a SpeechModel on a list of utterances: LoRA and full fine-tuning alike.

`train_local` optimises whatever parameters have requires_grad: the LoRA factors when `cl_fed.adapters`
has wrapped the model, every weight for full fine-tuning. AdamW, linear warmup then inverse-square-root
(default, as in the paper's code) or cosine decay, gradient clipping, SpecAugment, length-bucketed
batches. Same seed + same data + same starting weights -> same final weights (on CPU).

Audio is loaded and turned into features once and kept in a `FeatureCache` (module default
`FEATURE_CACHE`), because clients train on the same data for several rounds and evaluation reuses it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cl_fed.data.audio import load_audio
from cl_fed.data.utterance import Utterance
from cl_fed.models.base import SpeechModel

SCHEDULES = ("inverse_sqrt", "cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "none")


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # when set, exactly this many steps (cycling through epochs); epochs ignored
    batch_size: int = 16
    lr: float = 1e-3  # peak learning rate, reached after warmup
    warmup_steps: int = 0
    schedule: str = "inverse_sqrt"  # after warmup: lr*sqrt(warmup/step); "cosine": to 0 at the last step
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    spec_augment: bool = True
    seed: int = 0
    amp: str = "auto"  # "auto": bf16 (or fp16 without bf16 support) autocast only on CUDA; else none
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.batch_size < 1 or self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise ValueError(f"TrainConfig needs batch_size >= 1, epochs >= 0, max_steps >= 0: {self}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(
                f"TrainConfig needs lr > 0 and warmup_steps, grad_clip, weight_decay >= 0: {self}"
            )


@dataclass
class TrainResult:
    loss: float  # mean training loss over all steps (nan when no step ran)
    num_examples: int  # distinct utterances trained on (the FedAvg weight)
    audio_seconds: float  # seconds of audio processed, summed over all steps and epochs
    wall_seconds: float
    steps: int
    step_losses: list[float] = field(default_factory=list)


class FeatureCache:
    """In-memory LRU of per-utterance features, keyed by (feature pipeline, utterance id, audio path)."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, speech: SpeechModel, utterance: Utterance) -> tuple[torch.Tensor, float]:
        """(features, seconds of audio) for one utterance, computed on first use."""
        key = (speech.feature_key, utterance.id, utterance.audio)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        wave = load_audio(utterance.audio, sample_rate=speech.sample_rate)
        entry = (speech.features(wave), wave.numel() / speech.sample_rate)
        self._entries[key] = entry
        self._bytes += _nbytes(entry[0])
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, (old, _) = self._entries.popitem(last=False)
            self._bytes -= _nbytes(old)
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


FEATURE_CACHE = FeatureCache()


def length_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Indices grouped into batches of similar length (little padding), batch order shuffled.

    Lengths are jittered by up to 10% before sorting so batches differ between epochs.
    """
    jitter = torch.rand(len(lengths), generator=generator)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i] * (1 + 0.1 * float(jitter[i])), i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    permutation = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in permutation]


def lr_factor(step: int, config: TrainConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for 0-based `step`: linear warmup, then the configured decay."""
    n = step + 1
    warmup = config.warmup_steps
    if n <= warmup:
        return n / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / n)
    progress = (n - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _autocast(config: TrainConfig, device: torch.device):
    if device.type != "cuda" or config.amp == "none":
        return contextlib.nullcontext(), None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
    if dtype is None:  # auto
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _check_texts(speech: SpeechModel, utterances: list[Utterance]) -> None:
    vocab = getattr(speech, "vocab", None)
    if vocab is None:
        return
    for u in utterances:
        unknown = vocab.unknown_characters(u.text)
        if unknown:
            raise ValueError(
                f"utterance {u.id!r} ({u.audio}): text {u.text!r} has characters {unknown} "
                "the model vocabulary cannot spell"
            )


def _freeze_frozen_batchnorm(model: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed where its affine weights are frozen (LoRA training),
    so a LoRA round leaves the shared base bit-for-bit unchanged."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()


def train_local(
    speech: SpeechModel,
    utterances: list[Utterance],
    config: TrainConfig,
    cache: FeatureCache | None = None,
) -> TrainResult:
    """Train `speech.model` in place on `utterances`; returns loss and throughput figures."""
    if not utterances:
        raise ValueError("train_local needs at least one utterance")
    params = [p for p in speech.model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    _check_texts(speech, utterances)
    cache = FEATURE_CACHE if cache is None else cache
    start = time.perf_counter()
    entries = [cache.get(speech, u) for u in utterances]
    lengths = [e[0].shape[0] for e in entries]

    batches_per_epoch = math.ceil(len(utterances) / config.batch_size)
    total_steps = config.max_steps if config.max_steps is not None else config.epochs * batches_per_epoch
    device = speech.device
    autocast, scaler = _autocast(config, device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, total_steps))

    generator = torch.Generator().manual_seed(config.seed)  # batching and SpecAugment
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = speech.model.training
    step_losses: list[float] = []
    audio_seconds = 0.0
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)  # dropout
        speech.model.train()
        _freeze_frozen_batchnorm(speech.model)
        bar = tqdm(total=total_steps, desc="train", unit="step", disable=not config.progress, leave=False)
        try:
            batches: list[list[int]] = []
            for step in range(total_steps):
                if not batches:
                    batches = length_batches(lengths, config.batch_size, generator)
                indices = batches.pop(0)
                batch = speech.collate(
                    [entries[i][0] for i in indices],
                    [utterances[i].text for i in indices],
                    augment=config.spec_augment,
                    generator=generator,
                )
                with autocast:
                    loss = speech.loss(batch)
                if not torch.isfinite(loss):
                    ids = [utterances[i].id for i in indices]
                    raise FloatingPointError(
                        f"non-finite training loss {loss.item()} at step {step}, batch {ids}"
                    )
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.unscale_(optimizer)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(loss.item())
                audio_seconds += sum(entries[i][1] for i in indices)
                bar.update(1)
                bar.set_postfix(loss=f"{step_losses[-1]:.3f}")
        finally:
            bar.close()
            speech.model.train(was_training)
    return TrainResult(
        loss=sum(step_losses) / len(step_losses) if step_losses else float("nan"),
        num_examples=len(utterances),
        audio_seconds=audio_seconds,
        wall_seconds=time.perf_counter() - start,
        steps=len(step_losses),
        step_losses=step_losses,
    )
