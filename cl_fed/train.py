"""Local training of a SpeechModel on a list of utterances: LoRA and full fine-tuning alike.

`train_local` optimises whatever parameters have requires_grad: the LoRA factors when `cl_fed.adapters`
has wrapped the model, every weight for full fine-tuning. AdamW, gradient clipping, SpecAugment,
length-bucketed batches. Same seed + same data + same starting weights -> same final weights (on CPU).

The learning rate follows one of transformers' schedules (`TrainConfig.schedule`), all with linear warm-up
over a fraction of the schedule's span. The span may be longer than one call: a federated round trains
steps [span_offset, span_offset + steps) of a schedule that spans a whole stage of several rounds, so
splitting a span into calls gives exactly the LR sequence of one call over the whole span.

Audio is loaded and turned into features once and kept in a `FeatureCache` (module default
`FEATURE_CACHE`), because clients train on the same data for several rounds and evaluation reuses it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers

from cl_fed.data.audio import load_audio
from cl_fed.data.utterance import Utterance
from cl_fed.models.base import SpeechModel
from cl_fed.progress import Progress

SCHEDULES = ("inverse_sqrt", "cosine", "linear", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "none")


@dataclass
class TrainConfig:
    """Local training settings (defaults in brackets).

    epochs [1]: passes over the data; ignored when max_steps is set.
    accumulate [1]: micro-batches of batch_size per optimizer step, their losses averaged (the
        gradient of a batch of up to accumulate x batch_size utterances, in batch_size's memory).
    max_steps [None]: when set, exactly this many optimizer steps (cycling through epochs).
    batch_size [16]; lr [1e-3]: the peak learning rate, reached at the end of warm-up.
    schedule ["inverse_sqrt"]: the LR schedule, one of transformers' schedule functions, each with linear
        warm-up from 0 (a fresh span's first step runs at LR 0, the peak is reached at step W):
        "inverse_sqrt" (`get_inverse_sqrt_schedule`, timescale W: lr * sqrt(W / k) from step W on; with
        warmup 0, transformers' timescale 10_000), "cosine" (`get_cosine_schedule_with_warmup`, to 0 at
        the end of the span), "linear" (`get_linear_schedule_with_warmup`, to 0 at the end of the span),
        "constant" (`get_constant_schedule_with_warmup`).
    warmup [0.1]: warm-up as a fraction of the span, in [0, 1]: W = round(warmup * span_steps) steps,
        at least 1 when warmup > 0.
    span_steps [None]: the length of the LR schedule in optimizer steps; None = the steps of this call.
    span_offset [0]: steps of the span that earlier calls already made; local step k runs at the
        schedule's step span_offset + k, so span_offset + steps <= span_steps.
    weight_decay [0.01] (AdamW); grad_clip [1.0]: max global gradient norm, 0 disables;
    spec_augment [True]; seed [0]: batching, SpecAugment and dropout;
    proximal_mu [0.0]: FedProx (Li et al., 2020): the loss gains (mu/2) ||w - w_start||^2 over the
        trainable parameters, w_start = their values when the call starts (the weights or adapter
        the round was sent); 0 = off. The reported losses are the data loss alone;
    amp ["auto"]: "auto" = bf16 (fp16 without bf16 support) autocast only on CUDA, else "bf16", "fp16",
        "none"; progress [True]: a bar in a terminal, else one line per epoch (cl_fed.progress); a
        string turns it on and starts each line (e.g. "[factory-a] stage 1 round 1"), False turns it off.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    accumulate: int = 1
    lr: float = 1e-3
    schedule: str = "inverse_sqrt"
    warmup: float = 0.1
    span_steps: int | None = None
    span_offset: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    spec_augment: bool = True
    seed: int = 0
    amp: str = "auto"
    progress: bool | str = True
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.batch_size < 1 or self.epochs < 0 or (self.max_steps is not None and self.max_steps < 0):
            raise ValueError(f"TrainConfig needs batch_size >= 1, epochs >= 0, max_steps >= 0: {self}")
        if self.accumulate < 1:
            raise ValueError(f"TrainConfig.accumulate must be >= 1, got {self.accumulate}")
        if self.lr <= 0 or self.grad_clip < 0 or self.weight_decay < 0 or not self.proximal_mu >= 0:
            raise ValueError(
                f"TrainConfig needs lr > 0 and grad_clip, weight_decay, proximal_mu >= 0: {self}"
            )
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(
                "TrainConfig.warmup is a fraction of the span in [0, 1] (not a step count), "
                f"got {self.warmup}"
            )
        if self.span_steps is not None and self.span_steps < 0:
            raise ValueError(f"TrainConfig.span_steps must be >= 0 (or None), got {self.span_steps}")
        if self.span_offset < 0:
            raise ValueError(f"TrainConfig.span_offset must be >= 0, got {self.span_offset}")
        if self.span_offset > 0 and self.span_steps is None:
            raise ValueError(
                f"TrainConfig.span_offset ({self.span_offset}) needs span_steps: with span_steps None "
                "the span is this call's steps, which start at offset 0"
            )
        if self.max_steps is not None:
            check_span(self, self.max_steps)


def check_span(config: TrainConfig, steps: int) -> None:
    """Raise ValueError unless a call of `steps` steps fits the span: span_offset + steps <= span_steps."""
    if config.span_steps is not None and config.span_offset + steps > config.span_steps:
        raise ValueError(
            f"TrainConfig.span_offset + steps ({config.span_offset} + {steps}) exceeds "
            f"TrainConfig.span_steps ({config.span_steps}): the call would run past the end of its schedule"
        )


def steps_per_call(num_utterances: int, epochs: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimizer steps of a train_local call without max_steps: epochs x the steps of an epoch,
    ceil(ceil(num_utterances / batch_size) / accumulate) (an epoch's last step may take fewer
    micro-batches)."""
    if num_utterances < 0 or epochs < 0 or batch_size < 1 or accumulate < 1:
        raise ValueError(
            f"steps_per_call needs num_utterances >= 0, epochs >= 0, batch_size >= 1, accumulate >= 1, "
            f"got {num_utterances}, {epochs}, {batch_size}, {accumulate}"
        )
    return epochs * math.ceil(math.ceil(num_utterances / batch_size) / accumulate)


def num_warmup_steps(warmup: float, span_steps: int) -> int:
    """Warm-up steps for a warm-up fraction: round(warmup * span_steps), at least 1 when warmup > 0."""
    return max(1, round(warmup * span_steps)) if warmup > 0 else 0


def _schedule_lambda(config: TrainConfig, span_steps: int) -> Callable[[int], float]:
    """transformers' LR multiplier as a function of the span step (0 = the span's first optimizer step).

    transformers counts the first step as 0, whose warm-up LR is 0, and ends cosine and linear decay at
    0 on step `span_steps`: so the span's step k runs at transformers' step k + 1 of a schedule one step
    longer, and neither the first step (a one-step round would learn nothing) nor the last is wasted."""
    warmup = num_warmup_steps(config.warmup, span_steps)
    span_steps += 1
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only to build the scheduler
    if config.schedule == "inverse_sqrt":
        scheduler = transformers.get_inverse_sqrt_schedule(dummy, num_warmup_steps=warmup)
    elif config.schedule == "cosine":
        scheduler = transformers.get_cosine_schedule_with_warmup(dummy, warmup, span_steps)
    elif config.schedule == "linear":
        scheduler = transformers.get_linear_schedule_with_warmup(dummy, warmup, span_steps)
    else:
        scheduler = transformers.get_constant_schedule_with_warmup(dummy, warmup)
    schedule = scheduler.lr_lambdas[0]
    return lambda k: schedule(k + 1)


def lr_at(config: TrainConfig, step: int, span_steps: int) -> float:
    """Multiplier of the peak lr at 0-based `step` of a span of `span_steps` steps (config's schedule and
    warm-up fraction; config.span_steps and span_offset are not used)."""
    if not 0 <= step < span_steps:
        raise ValueError(f"lr_at needs 0 <= step < span_steps, got step {step}, span_steps {span_steps}")
    return float(_schedule_lambda(config, span_steps)(step))


def proximal_term(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's proximal term (mu/2) * sum_p ||p - anchor_p||^2, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for p, a in zip(params, anchors, strict=True):
        total = total + (p.detach().double() - a.detach().double()).pow(2).sum().cpu()
    return (mu / 2) * total


def add_proximal_grad_(params: list[torch.Tensor], anchors: list[torch.Tensor], mu: float) -> None:
    """Add the gradient of `proximal_term`, mu * (p - anchor), to every p.grad in place: the term's
    autograd would keep a graph over every trainable weight (full fine-tuning) for the same numbers."""
    with torch.no_grad():
        for p, a in zip(params, anchors, strict=True):
            if p.grad is None:
                p.grad = mu * (p - a)
            else:
                p.grad.add_(p - a, alpha=mu)


@dataclass
class TrainResult:
    loss: float  # mean training loss over all steps (nan when no step ran)
    num_examples: int  # distinct utterances trained on (the FedAvg weight)
    audio_seconds: float  # seconds of audio processed, summed over all steps and epochs
    wall_seconds: float
    steps: int
    lr_mean: float  # mean multiplier of the peak lr over this call's steps (nan when no step ran)
    step_losses: list[float] = field(default_factory=list)
    step_lrs: list[float] = field(default_factory=list)  # multiplier of the peak lr at each step


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


def epoch_line(progress: bool | str, epoch: tuple[int, int], losses: list[float], since: float) -> str:
    """`<label>: epoch 1/2, 63 steps, loss 1.234, 12.3 s`: one epoch of `train_local` in a log."""
    label = progress if isinstance(progress, str) else "[cl-fed] train"
    seconds = time.perf_counter() - since
    return (
        f"{label}: epoch {epoch[0]}/{epoch[1]}, {len(losses)} steps, "
        f"loss {sum(losses) / len(losses):.3f}, {seconds:.1f} s"
    )


def train_local(
    speech: SpeechModel,
    utterances: list[Utterance],
    config: TrainConfig,
    cache: FeatureCache | None = None,
    extra_loss: Callable[[dict, object], torch.Tensor] | None = None,
) -> TrainResult:
    """Train `speech.model` in place on `utterances`; returns loss and throughput figures.

    `extra_loss(batch, outputs)` (a continual-learning method's term, cl_fed/clmethods) is added to
    each micro-batch's data loss; the reported losses stay the data loss alone."""
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

    total_steps = (
        config.max_steps
        if config.max_steps is not None
        else steps_per_call(len(utterances), config.epochs, config.batch_size, config.accumulate)
    )
    check_span(config, total_steps)
    span_steps = total_steps if config.span_steps is None else config.span_steps
    device = speech.device
    autocast, scaler = _autocast(config, device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # FedProx: the parameters as the round sent them (the adapter it starts from, or all weights)
    anchors = [p.detach().clone() for p in params] if config.proximal_mu else []
    # LambdaLR calls its lambda with the number of scheduler.step() calls so far (0 before the first
    # optimizer step), the same count transformers' lambdas take, so local step k runs at span step
    # span_offset + k.
    span_lambda, offset = _schedule_lambda(config, span_steps), config.span_offset
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: span_lambda(k + offset))

    generator = torch.Generator().manual_seed(config.seed)  # batching and SpecAugment
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = speech.model.training
    step_losses: list[float] = []
    step_lrs: list[float] = []
    audio_seconds = 0.0
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(config.seed)  # dropout
        speech.model.train()
        _freeze_frozen_batchnorm(speech.model)
        bar = Progress(total_steps, "train", "step", enabled=bool(config.progress), leave=False)
        per_epoch = steps_per_call(len(utterances), 1, config.batch_size, config.accumulate)
        epoch_start, epoch_tick = 0, time.perf_counter()
        try:
            batches: list[list[int]] = []
            for step in range(total_steps):
                if not batches:
                    batches = length_batches(lengths, config.batch_size, generator)
                # this step's micro-batches: up to `accumulate`, never across an epoch's end
                micro = [batches.pop(0) for _ in range(min(config.accumulate, len(batches)))]
                step_loss = 0.0
                for indices in micro:
                    batch = speech.collate(
                        [entries[i][0] for i in indices],
                        [utterances[i].text for i in indices],
                        augment=config.spec_augment,
                        generator=generator,
                        languages=[utterances[i].language for i in indices],
                    )
                    with autocast:
                        if extra_loss is None:
                            loss = data_loss = speech.loss(batch)
                        else:
                            outputs = speech.outputs(batch)
                            data_loss = outputs.loss
                            loss = data_loss + extra_loss(batch, outputs)
                    if not torch.isfinite(loss):
                        ids = [utterances[i].id for i in indices]
                        raise FloatingPointError(
                            f"non-finite training loss {loss.item()} at step {step}, batch {ids}"
                        )
                    loss = loss / len(micro) if len(micro) > 1 else loss  # k = 1: as without accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                    if extra_loss is None:
                        step_loss += loss.item()
                    else:
                        step_loss += data_loss.item() / len(micro)
                    audio_seconds += sum(entries[i][1] for i in indices)
                if scaler:
                    scaler.unscale_(optimizer)
                if anchors:  # once per optimizer step, after unscaling: the term is not loss-scaled
                    add_proximal_grad_(params, anchors, config.proximal_mu)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                step_lrs.append(optimizer.param_groups[0]["lr"] / config.lr)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(step_loss)
                bar.update(loss=f"{step_losses[-1]:.3f}")
                if (step + 1) % per_epoch == 0 or step + 1 == total_steps:  # an epoch (or max_steps) ends
                    epoch = (step // per_epoch + 1, math.ceil(total_steps / per_epoch))
                    bar.line(epoch_line(config.progress, epoch, step_losses[epoch_start:], epoch_tick))
                    epoch_start, epoch_tick = step + 1, time.perf_counter()
        finally:
            bar.close()
            speech.model.train(was_training)
    return TrainResult(
        loss=sum(step_losses) / len(step_losses) if step_losses else float("nan"),
        num_examples=len(utterances),
        audio_seconds=audio_seconds,
        wall_seconds=time.perf_counter() - start,
        steps=len(step_losses),
        lr_mean=sum(step_lrs) / len(step_lrs) if step_lrs else float("nan"),
        step_losses=step_losses,
        step_lrs=step_lrs,
    )
