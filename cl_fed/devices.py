"""Where a site trains and the server evaluates, and in which precision: the run-config keys
`device`, `precision` and `gradient-checkpointing`, resolved and checked before anything trains.

The server's merge math does not move: it stays float64 on the CPU (cl_fed/centralize.py,
cl_fed/state.py), on weights kept on the CPU, so every site ends a merge with the same base bit for
bit whatever hardware it trains on. What travels (adapter factors, weights) is fp32 on the CPU.

In simulation, Ray gives each ClientApp the GPUs of `client-resources-num-gpus` (e.g. 0.25: four
sites share one GPU) by setting CUDA_VISIBLE_DEVICES for it, so `auto` and `cuda` pick that GPU.
"""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_MODE = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}  # -> TrainConfig.amp


def resolve_device(name: str) -> torch.device:
    """`auto` = CUDA if present, else MPS, else CPU; `cpu`, `cuda`, `cuda:N`, `mps` as given, if this
    machine has it (ValueError naming the key and value otherwise)."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device={name!r}; choose auto, cpu, cuda, cuda:N or mps")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but torch sees no CUDA device here; use device=auto or cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) "
                "(in simulation each ClientApp sees only the GPUs Ray assigned to it: use cuda or auto)"
            )
    if name == "mps" and not mps:
        raise ValueError("device='mps', but this machine has no MPS backend; use device=auto or cpu")
    return torch.device(name)


def amp_mode(precision: str, device: torch.device) -> str:
    """TrainConfig.amp for `precision` on `device`: `auto` = bf16 where CUDA supports it, else fp32
    (fp16 with loss scaling on older GPUs is `precision=fp16`). bf16 and fp16 need CUDA: CPU and MPS
    train in fp32 (ValueError naming the key and value)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(
            f"precision={precision!r} needs a CUDA device (device is {device.type}); "
            "use precision=fp32 or auto there"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision='bf16', but this GPU does not support bf16; use precision=fp16 or auto")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return AMP_MODE[precision]


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (less memory, about a third more compute) on a
    transformers model, LoRA-wrapped or not; ValueError naming the model if it cannot."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient-checkpointing=true: {type(inner).__name__} does not support gradient checkpointing"
        )
    # non-reentrant: works with frozen inputs (LoRA) and keeps dropout's random draws in the recompute
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
