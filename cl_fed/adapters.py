"""LoRA factorization with `peft`: attach adapters, read and write them under stable names.

Clients train a fresh LoRA adapter on top of a frozen base; the server only ever sees plain tensors.
Names are peft-independent so the server code (cl_fed.centralize) never depends on peft internals:

- adapter tensors: ``"<module path>.lora_A"`` (rank x in) and ``"<module path>.lora_B"``
  (out x rank), fp32 on CPU; module path = path in the ORIGINAL model (``layers.0.q_proj``);
- base tensors: the ORIGINAL model's ``state_dict`` names (``layers.0.q_proj.weight``).

Only LoRA on ``nn.Linear`` layers is supported (weight is out x in, delta = scale * B @ A).
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from cl_fed.centralize import base_key, lora_pairs  # noqa: F401  (naming lives with the pure math)

DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """Shape of one LoRA adapter; model families keep their own defaults."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]

    def __post_init__(self) -> None:
        # Hydra/YAML hand us lists; keep the dataclass hashable and immutable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be a positive int, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraSpec.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        names_ok = all(isinstance(name, str) and name for name in self.target_modules)
        if not self.target_modules or not names_ok:
            raise ValueError(f"LoraSpec.target_modules must be non-empty names, got {self.target_modules!r}")

    @property
    def scale(self) -> float:
        """The factor LoRA multiplies B @ A by: alpha / rank."""
        return self.alpha / self.rank


def _lora_layers(peft_model: peft.PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    """{original module path: LoRA layer} for the layers that carry `adapter_name`, sorted."""
    layers = {}
    for path, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[path] = module
    if not layers:
        raise ValueError(f"model has no LoRA layers for adapter {adapter_name!r}")
    return dict(sorted(layers.items()))


def _check_linear_only(peft_model: peft.PeftModel, adapter_name: str) -> None:
    for path, layer in _lora_layers(peft_model, adapter_name).items():
        if not isinstance(layer.get_base_layer(), nn.Linear):
            kind = type(layer.get_base_layer()).__name__
            raise ValueError(f"LoRA target {path!r} is a {kind}; only nn.Linear is supported")


def fresh_factors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A fresh adapter for `shapes` ({"<path>.lora_A" / ".lora_B": shape}): A ~ peft's kaiming-uniform
    init, B = 0 (so model == base). Pure: the server draws the very adapter a site's
    `reset_adapters(seed)` does. A is drawn on CPU from a generator seeded by (seed, module path):
    the same on every device, and a module's init depends neither on the other targeted modules
    nor on the global RNG."""
    out = {}
    for key, shape in sorted(shapes.items()):
        path, _, factor = key.rpartition(".")
        tensor = torch.zeros(tuple(shape), dtype=torch.float32)
        if factor == "lora_A":
            module_seed = (seed * 1_000_003 + zlib.crc32(path.encode())) % 2**63
            generator = torch.Generator().manual_seed(module_seed)
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)  # peft's law for A
        out[key] = tensor
    return out


def adapter_shapes(peft_model: peft.PeftModel, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in adapter_state(peft_model, adapter_name).items()}


def reset_adapters(peft_model: peft.PeftModel, seed: int, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Fresh adapter (`fresh_factors`) written into the model."""
    load_adapter_state(
        peft_model, fresh_factors(adapter_shapes(peft_model, adapter_name), seed), adapter_name
    )


def attach_lora(model: nn.Module, spec: LoraSpec, seed: int) -> peft.PeftModel:
    """Wrap `model` (modified in place, as peft does) with one trainable LoRA adapter; base frozen.

    The result keeps `model`'s train/eval mode (peft leaves its new dropout layers in train mode).
    """
    was_training = model.training
    config = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
    )
    # peft draws its own init from the global RNG; fork so attaching never shifts the caller's.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps
        # (a FutureWarning no argument of ours avoids)
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        peft_model = peft.get_peft_model(model, config)
    _check_linear_only(peft_model, DEFAULT_ADAPTER)
    reset_adapters(peft_model, seed)
    peft_model.train(was_training)
    return peft_model


def adapter_state(peft_model: peft.PeftModel, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's factors as detached fp32 CPU clones under stable names, keys sorted."""
    state = {}
    for path, layer in _lora_layers(peft_model, adapter_name).items():
        for factor, weight in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
            tensor = weight[adapter_name].weight.detach()
            state[f"{path}.{factor}"] = tensor.to("cpu", torch.float32).clone()
    return dict(sorted(state.items()))


def load_adapter_state(
    peft_model: peft.PeftModel, state: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Copy exactly the tensors of `state` into the adapter (strict on keys and shapes)."""
    targets = {}
    for path, layer in _lora_layers(peft_model, adapter_name).items():
        targets[f"{path}.lora_A"] = layer.lora_A[adapter_name].weight
        targets[f"{path}.lora_B"] = layer.lora_B[adapter_name].weight
    missing = sorted(set(targets) - set(state))
    extra = sorted(set(state) - set(targets))
    if missing or extra:
        raise ValueError(f"adapter state does not match the model: missing {missing[:5]}, extra {extra[:5]}")
    for key, target in targets.items():
        _check_shape("adapter", key, state[key], target)
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(state[key])


def live_factors(
    peft_model: peft.PeftModel, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """{original module path: (A, B)}: the adapter's live parameters (for penalties on them)."""
    return {
        path: (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)
        for path, layer in _lora_layers(peft_model, adapter_name).items()
    }


def freeze_lora_a(peft_model: peft.PeftModel, frozen: bool, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Train B only (FFA-LoRA: A stays at its shared init) or, with frozen=False, both factors."""
    for layer in _lora_layers(peft_model, adapter_name).values():
        layer.lora_A[adapter_name].weight.requires_grad_(not frozen)
        layer.lora_B[adapter_name].weight.requires_grad_(True)


def _check_shape(kind: str, key: str, given: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(given.shape) != tuple(target.shape):
        got, expected = tuple(given.shape), tuple(target.shape)
        raise ValueError(f"{kind} tensor {key!r} has shape {got}, model expects {expected}")


def _base_tensors(peft_model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """{original state_dict name: live tensor} for every base parameter and buffer (no LoRA)."""
    model = peft_model.base_model.model
    lora_paths = {path for path, m in model.named_modules() if isinstance(m, LoraLayer)}
    for path in lora_paths:
        if getattr(model.get_submodule(path), "merged", False):
            raise ValueError(f"LoRA layer {path!r} has an adapter merged into its weight")
    tensors = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = next((p for p in lora_paths if name.startswith(p + ".")), None)
        if owner is None:
            tensors[name] = tensor
            continue
        rest = name[len(owner) + 1 :]
        if rest.startswith("base_layer."):  # peft moved the original layer one level down
            tensors[f"{owner}.{rest[len('base_layer.') :]}"] = tensor
        # anything else under a LoRA layer is an adapter tensor, not part of the base
    return tensors


def base_state(peft_model: peft.PeftModel) -> dict[str, torch.Tensor]:
    """The frozen base's weights and buffers under the ORIGINAL model's names (CPU clones)."""
    tensors = sorted(_base_tensors(peft_model).items())
    return {name: tensor.detach().to("cpu").clone() for name, tensor in tensors}


def load_base_state(peft_model: peft.PeftModel, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Write new base weights in place (after centralization). Unknown keys or shapes are errors;
    missing keys too unless strict=False (e.g. a server that only ships the merged weights)."""
    targets = _base_tensors(peft_model)
    extra = sorted(set(state) - set(targets))
    missing = sorted(set(targets) - set(state)) if strict else []
    if extra or missing:
        raise ValueError(f"base state does not match the model: missing {missing[:5]}, extra {extra[:5]}")
    for key, value in state.items():
        _check_shape("base", key, value, targets[key])
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)


def save_adapter(peft_model: peft.PeftModel, directory: str | Path) -> None:
    """Save the adapter in PEFT's own format (adapter_config.json + adapter_model.safetensors)."""
    peft_model.save_pretrained(str(directory))


def load_adapter(model: nn.Module, directory: str | Path, trainable: bool = False) -> peft.PeftModel:
    """Wrap `model` with the adapter saved by `save_adapter` (PEFT format) in `directory`."""
    config_file = Path(directory) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no PEFT adapter in {directory}: {config_file} is missing")
    peft_model = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    _check_linear_only(peft_model, DEFAULT_ADAPTER)
    return peft_model
