"""Devices, precision, gradient accumulation and checkpointing: each key's wiring, on the CPU.
(The CUDA paths run where a GPU is present: benchmarks/train_speed.py --device cuda.)"""

import math

import pytest
import torch

from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.config import make_config
from cl_fed.continual import on_device, train_config
from cl_fed.data.manifest import load_manifest
from cl_fed.data.synth import generate
from cl_fed.devices import amp_mode, enable_gradient_checkpointing, resolve_device
from cl_fed.models.tiny import build_tiny
from cl_fed.plan import Train
from cl_fed.train import FeatureCache, TrainConfig, steps_per_call, train_local


@pytest.fixture(scope="module")
def utterances():
    rows, _ = load_manifest(generate("tiny", progress=False) / "manifest.jsonl")
    return [u for u in rows if u.stage != "foundation" and u.split == "train"][:8]


def test_devices_resolve_or_are_refused_naming_the_key():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device='gpu'; choose auto, cpu, cuda, cuda:N or mps"):
        make_config({"device": "gpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but torch sees no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="device='cuda:3'"):
            on_device(make_config({"device": "cuda:3"}), build_tiny())
    else:
        with pytest.raises(ValueError, match="device='cuda:99', but torch sees"):
            resolve_device("cuda:99")


def test_precision_maps_onto_training_and_needs_cuda_for_half():
    cpu = torch.device("cpu")
    assert amp_mode("auto", cpu) == amp_mode("fp32", cpu) == "none"  # the CPU trains in fp32
    for half in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision='{half}' needs a CUDA device"):
            amp_mode(half, cpu)
    with pytest.raises(ValueError, match="precision='fp8'; choose one of auto, fp32, bf16, fp16"):
        make_config({"precision": "fp8"})
    cfg = make_config({"precision": "fp32", "device": "cpu", "grad-accumulation": 2})
    step = Train(0, 0, 1, 0, "fresh", 0, 2)
    config = train_config(cfg, step, num_utterances=40, progress=False)
    assert config.amp == "none" and config.accumulate == 2
    # 40 utterances in batches of 16: 3 micro-batches, 2 optimizer steps an epoch, 3 epochs, 2 rounds
    assert config.span_steps == 2 * steps_per_call(40, 3, 16, 2) == 2 * 3 * 2


def test_grad_accumulation_takes_k_micro_batches_per_optimizer_step(utterances):
    cache = FeatureCache()
    runs = {}
    for k in (1, 2, 3):
        speech = build_tiny(seed=0)
        config = TrainConfig(epochs=2, batch_size=2, accumulate=k, progress=False, spec_augment=False)
        runs[k] = train_local(speech, utterances, config, cache=cache)
    # 8 utterances = 4 micro-batches an epoch: 4, 2 and 2 (3 + 1) optimizer steps an epoch
    assert [runs[k].steps for k in (1, 2, 3)] == [8, 4, 4]
    assert steps_per_call(8, 2, 2, 3) == 4
    # every utterance is trained on once an epoch, whatever k
    assert (
        runs[1].audio_seconds == pytest.approx(runs[2].audio_seconds) == pytest.approx(runs[3].audio_seconds)
    )
    assert all(math.isfinite(x) for r in runs.values() for x in r.step_losses)
    with pytest.raises(ValueError, match="grad-accumulation=0 must be >= 1"):
        make_config({"grad-accumulation": 0})


def test_gradient_checkpointing_gives_the_same_gradients(utterances):
    """Recomputing activations changes memory, not the math (dropout draws are replayed)."""
    grads = []
    for checkpointing in (False, True):
        speech = build_tiny(seed=0)
        spec = LoraSpec(speech.lora_rank, speech.lora_alpha, 0.0, speech.lora_targets)
        speech.model = attach_lora(speech.model, spec, seed=0)
        if checkpointing:
            enable_gradient_checkpointing(speech.model)
        speech.model.train()
        features = [
            speech.features(torch.randn(16000, generator=torch.Generator().manual_seed(i))) for i in (1, 2)
        ]
        batch = speech.collate(features, ["weld the seam", "check the gap"])
        torch.manual_seed(0)
        speech.loss(batch).backward()
        grads.append({n: p.grad.clone() for n, p in speech.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name
    with pytest.raises(ValueError, match="Linear does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_the_site_model_goes_to_the_run_device_with_checkpointing():
    speech = on_device(
        make_config({"device": "cpu", "gradient-checkpointing": True}), build_tiny(), training=True
    )
    assert speech.device == torch.device("cpu") and speech.model.is_activation_checkpointing
    # device and checkpointing do not change what is computed: not part of the run's name
    assert make_config({"device": "cpu", "gradient-checkpointing": True}).default_run_name() == (
        make_config().default_run_name()
    )
    assert "grad-accumulation2" in make_config({"grad-accumulation": 2}).default_run_name()
