"""LoRA factorization via peft: attaching, stable names, state round trips, base weights, PEFT files."""

import json

import pytest
import torch
from torch import nn

from cl_fed.adapters import (
    LoraSpec,
    adapter_state,
    attach_lora,
    base_key,
    base_state,
    load_adapter,
    load_adapter_state,
    load_base_state,
    lora_pairs,
    reset_adapters,
    save_adapter,
)


class Block(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.ff = nn.Linear(width, width)
        self.register_buffer("gain", torch.linspace(0.5, 1.5, width))  # a buffer, like a norm's stats

    def forward(self, x):
        return x + self.gain * self.ff(torch.tanh(self.q_proj(x) + self.v_proj(x)))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


SPEC = LoraSpec(rank=2, alpha=4.0, dropout=0.05, target_modules=("q_proj", "v_proj"))
ADAPTER_KEYS = [f"layers.{i}.{m}.lora_{f}" for i in (0, 1) for m in ("q_proj", "v_proj") for f in ("A", "B")]


def fresh_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def random_state(like: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in like.items()}


def test_lora_spec():
    spec = LoraSpec(rank=32, alpha=64, dropout=0.05, target_modules=["q_proj", "v_proj"])
    assert spec.scale == 2.0
    assert spec.target_modules == ("q_proj", "v_proj")
    hash(spec)  # frozen and hashable even when built from a list
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0, alpha=1, dropout=0.0, target_modules=("q",))
    with pytest.raises(ValueError, match="dropout"):
        LoraSpec(rank=1, alpha=1, dropout=1.0, target_modules=("q",))
    with pytest.raises(ValueError, match="target_modules"):
        LoraSpec(rank=1, alpha=1, dropout=0.0, target_modules=())


def test_attach_keeps_train_eval_mode():
    eval_model = attach_lora(fresh_net(), SPEC, seed=0)
    assert not any(m.training for m in eval_model.modules())
    train_model = attach_lora(fresh_net().train(), SPEC, seed=0)
    assert all(m.training for m in train_model.modules())


def test_attach_freezes_base_and_starts_at_base():
    model = fresh_net()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_base = model(x)
    pm = attach_lora(model, SPEC, seed=3)
    trainable = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    state = adapter_state(pm)
    assert all(torch.count_nonzero(state[k]) == 0 for k in state if k.endswith("lora_B"))
    assert all(torch.count_nonzero(state[k]) > 0 for k in state if k.endswith("lora_A"))
    with torch.no_grad():
        assert torch.allclose(pm(x), y_base, atol=1e-6)


def test_attach_is_deterministic_from_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    a = adapter_state(attach_lora(fresh_net(0), SPEC, seed=3))
    b = adapter_state(attach_lora(fresh_net(1), SPEC, seed=3))
    c = adapter_state(attach_lora(fresh_net(0), SPEC, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)  # A depends on the seed only, not on the base
    assert not torch.equal(a["layers.0.q_proj.lora_A"], c["layers.0.q_proj.lora_A"])
    assert not torch.equal(a["layers.0.q_proj.lora_A"], a["layers.1.q_proj.lora_A"])  # per-module draws

    model = fresh_net()
    torch.manual_seed(9)
    attach_lora(model, SPEC, seed=3)
    after_attach = torch.rand(3)
    torch.manual_seed(9)
    assert torch.equal(torch.rand(3), after_attach)


def test_adapter_state_names_dtype_and_independence():
    pm = attach_lora(fresh_net(), SPEC, seed=0)
    state = adapter_state(pm)
    assert list(state) == sorted(ADAPTER_KEYS)
    assert state["layers.0.q_proj.lora_A"].shape == (2, 6) and state["layers.0.q_proj.lora_B"].shape == (6, 2)
    assert all(
        t.dtype == torch.float32 and t.device.type == "cpu" and not t.requires_grad for t in state.values()
    )
    state["layers.0.q_proj.lora_A"].add_(1.0)  # a clone: the model must not change
    assert not torch.equal(adapter_state(pm)["layers.0.q_proj.lora_A"], state["layers.0.q_proj.lora_A"])
    pairs = lora_pairs(state)
    assert list(pairs) == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert base_key("layers.0.q_proj") == "layers.0.q_proj.weight"


def test_adapter_state_is_fp32_for_a_bf16_base():
    pm = attach_lora(fresh_net().to(torch.bfloat16), SPEC, seed=0)
    assert all(t.dtype == torch.float32 for t in adapter_state(pm).values())
    assert base_state(pm)["layers.0.q_proj.weight"].dtype == torch.bfloat16


def test_load_adapter_state_round_trip_and_strictness():
    pm = attach_lora(fresh_net(), SPEC, seed=0)
    wanted = random_state(adapter_state(pm), seed=5)
    load_adapter_state(pm, wanted)
    got = adapter_state(pm)
    assert all(torch.equal(got[k], wanted[k]) for k in wanted)

    missing = dict(wanted)
    missing.pop("layers.1.v_proj.lora_B")
    with pytest.raises(ValueError, match=r"missing \['layers.1.v_proj.lora_B'\]"):
        load_adapter_state(pm, missing)
    with pytest.raises(ValueError, match=r"extra \['head.lora_A'\]"):
        load_adapter_state(pm, {**wanted, "head.lora_A": torch.zeros(2, 6)})
    with pytest.raises(
        ValueError, match=r"'layers.0.q_proj.lora_A' has shape \(3, 6\), model expects \(2, 6\)"
    ):
        load_adapter_state(pm, {**wanted, "layers.0.q_proj.lora_A": torch.zeros(3, 6)})


def test_reset_adapters_restores_base_outputs_and_seeded_init():
    pm = attach_lora(fresh_net(), SPEC, seed=2)
    initial = adapter_state(pm)
    load_adapter_state(pm, random_state(initial, seed=8))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pm.disable_adapter():
            y_base = pm(x)
        assert not torch.allclose(pm(x), y_base, atol=1e-3)
        reset_adapters(pm, seed=2)
        assert torch.allclose(pm(x), y_base, atol=1e-6)
    after = adapter_state(pm)
    assert all(torch.equal(after[k], initial[k]) for k in initial)  # same seed, same A, B = 0


def test_base_state_uses_original_names_and_values():
    original = fresh_net()
    expected = {k: v.clone() for k, v in original.state_dict().items()}
    pm = attach_lora(original, SPEC, seed=0)
    state = base_state(pm)
    assert list(state) == sorted(expected)  # includes the buffers, no LoRA or base_layer names
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_load_base_state_in_place_and_strictness():
    pm = attach_lora(fresh_net(0), SPEC, seed=0)
    new = {k: v.clone() for k, v in fresh_net(1).state_dict().items()}
    load_base_state(pm, new)
    got = base_state(pm)
    assert all(torch.equal(got[k], new[k]) for k in new)
    assert torch.equal(pm.base_model.model.layers[0].q_proj.base_layer.weight, new["layers.0.q_proj.weight"])

    partial = {"layers.0.q_proj.weight": torch.zeros(6, 6)}
    with pytest.raises(ValueError, match="missing"):
        load_base_state(pm, partial)
    load_base_state(pm, partial, strict=False)
    assert torch.count_nonzero(base_state(pm)["layers.0.q_proj.weight"]) == 0
    with pytest.raises(ValueError, match=r"extra \['nope.weight'\]"):
        load_base_state(pm, {"nope.weight": torch.zeros(1)}, strict=False)
    with pytest.raises(ValueError, match=r"'head.bias' has shape \(4,\), model expects \(3,\)"):
        load_base_state(pm, {"head.bias": torch.zeros(4)}, strict=False)


def test_save_and_load_adapter_in_peft_format(tmp_path):
    pm = attach_lora(fresh_net(), SPEC, seed=0)
    load_adapter_state(pm, random_state(adapter_state(pm), seed=4))
    save_adapter(pm, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (
        config["r"] == 2
        and config["lora_alpha"] == 4.0
        and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    )
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    loaded = load_adapter(fresh_net(), tmp_path / "adapter")
    want, got = adapter_state(pm), adapter_state(loaded)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded(x), pm(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(fresh_net(), tmp_path / "nothing")


def test_only_linear_targets():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 3)

    with pytest.raises(ValueError, match="'conv' is a Conv1d"):
        attach_lora(WithConv(), LoraSpec(rank=1, alpha=1, dropout=0.0, target_modules=("conv",)), seed=0)
