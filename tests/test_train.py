"""train_local and evaluate: learning, determinism, LoRA vs full fine-tuning, schedule, caching.

The data are tone sequences: each character is a 160 ms tone of its own pitch ("a" 400 Hz, "b" 900 Hz,
"c" 1600 Hz, space = silence), written as wav files, so a small model can learn them in seconds.
"""

import math

import pytest
import soundfile as sf
import torch

from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.data.utterance import Utterance
from cl_fed.evaluate import evaluate, transcribe
from cl_fed.models import unwrap
from cl_fed.models.tiny import build_tiny
from cl_fed.train import FeatureCache, TrainConfig, length_batches, lr_factor, train_local

SR = 16000
PITCH = {"a": 400.0, "b": 900.0, "c": 1600.0, " ": None}
TEXTS = ["abc", "cab", "ba ca", "acb"]
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    subsampling_conv_channels=32,
)


def tone_sequence(text: str, seconds_per_char: float = 0.16) -> torch.Tensor:
    t = torch.arange(int(SR * seconds_per_char)) / SR
    parts = [0.5 * torch.sin(2 * math.pi * PITCH[c] * t) if PITCH[c] else torch.zeros_like(t) for c in text]
    silence = torch.zeros(SR // 10)
    return torch.cat([silence, *parts, silence])


@pytest.fixture
def utterances(tmp_path) -> list[Utterance]:
    out = []
    for i, text in enumerate(TEXTS):
        path = tmp_path / f"u{i}.wav"
        wave = tone_sequence(text)
        sf.write(path, wave.numpy(), SR)
        out.append(Utterance(id=f"u{i}", audio=str(path), text=text, seconds=wave.numel() / SR))
    return out


def quick(**overrides) -> TrainConfig:
    return TrainConfig(**{"max_steps": 6, "batch_size": 2, "lr": 3e-3, "progress": False, **overrides})


def test_small_model_learns_tone_sequences(utterances):
    speech = build_tiny(seed=0, **SMALL)
    config = TrainConfig(
        max_steps=80, batch_size=4, lr=1e-2, warmup_steps=10, spec_augment=False, progress=False
    )
    result = train_local(speech, utterances, config)
    assert result.steps == 80 and len(result.step_losses) == 80
    assert result.step_losses[-1] < 0.1 * result.step_losses[0]
    assert result.num_examples == 4
    assert result.audio_seconds == pytest.approx(80 * sum(u.seconds for u in utterances), rel=1e-6)
    scores = evaluate(speech, utterances)
    assert scores["cer"] == 0.0 and scores["wer"] == 0.0
    assert [p["id"] for p in scores["predictions"]] == [u.id for u in utterances]
    assert [p["hypothesis"] for p in scores["predictions"]] == TEXTS
    assert not speech.model.training  # mode restored


def test_same_seed_gives_identical_weights_and_different_seed_does_not(utterances):
    def run(seed: int) -> dict:
        speech = build_tiny(seed=0, **SMALL)
        train_local(speech, utterances, quick(seed=seed, spec_augment=True))
        return speech.model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_lora_training_changes_only_adapter_factors(utterances):
    speech = build_tiny(seed=0, **SMALL)
    spec = LoraSpec(speech.lora_rank, speech.lora_alpha, speech.lora_dropout, speech.lora_targets)
    speech.model = attach_lora(speech.model, spec, seed=0)
    before = {k: v.clone() for k, v in speech.model.state_dict().items()}
    train_local(speech, utterances, quick())
    after = speech.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)
    # BatchNorm running statistics of the frozen base stay put too (the base is shared by all clients)
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)


def test_full_fine_tuning_changes_the_weights(utterances):
    speech = build_tiny(seed=0, **SMALL)
    before = {k: v.clone() for k, v in speech.model.state_dict().items()}
    train_local(speech, utterances, quick(max_steps=2))
    after = speech.model.state_dict()
    weights = [k for k in before if k.endswith(".weight")]
    assert sum(not torch.equal(before[k], after[k]) for k in weights) > 0.9 * len(weights)
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)


def test_epochs_set_the_step_count(utterances):
    speech = build_tiny(seed=0, **SMALL)
    result = train_local(speech, utterances, TrainConfig(epochs=2, batch_size=3, progress=False))
    assert result.steps == 2 * math.ceil(4 / 3)
    assert result.audio_seconds == pytest.approx(2 * sum(u.seconds for u in utterances), rel=1e-6)


def test_lr_schedules():
    inv = TrainConfig(lr=1.0, warmup_steps=4, schedule="inverse_sqrt")
    assert [lr_factor(s, inv, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(15, inv, 100) == pytest.approx(math.sqrt(4 / 16))
    cos = TrainConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert lr_factor(1, cos, 12) == 1.0
    assert lr_factor(6, cos, 12) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(11, cos, 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, TrainConfig(warmup_steps=0, schedule="constant"), 100) == 1.0


def test_bad_config_and_bad_input_fail_clearly(utterances):
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    speech = build_tiny(seed=0, **SMALL)
    with pytest.raises(ValueError, match="at least one utterance"):
        train_local(speech, [], quick())
    bad = Utterance(id="bad-1", audio=utterances[0].audio, text="abc 42")
    with pytest.raises(ValueError, match=r"bad-1.*\['4', '2'\]"):
        train_local(speech, [bad], quick())
    for p in speech.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_local(speech, utterances, quick())


def test_length_batches_cover_everything_once_with_similar_lengths():
    lengths = [5, 100, 7, 98, 6, 101, 99, 4]
    batches = length_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[4, 5, 6, 7], [98, 99, 100, 101]]
    again = length_batches(lengths, 4, torch.Generator().manual_seed(0))
    assert batches == again


def test_feature_cache_reuses_and_evicts(utterances):
    speech = build_tiny(seed=0, **SMALL)
    cache = FeatureCache()
    first, seconds = cache.get(speech, utterances[0])
    assert cache.get(speech, utterances[0])[0] is first  # not recomputed
    assert seconds == pytest.approx(utterances[0].seconds)
    small = FeatureCache(max_bytes=first.numel() * 4 + 1)
    small.get(speech, utterances[0])
    small.get(speech, utterances[1])
    assert len(small) == 1


def test_transcribe_keeps_input_order_across_length_sorted_batches(utterances):
    speech = build_tiny(seed=0, **SMALL)
    reordered = [utterances[2], utterances[0], utterances[3], utterances[1]]
    one_by_one = [transcribe(speech, [u])[0] for u in reordered]
    assert transcribe(speech, reordered, batch_size=3) == one_by_one
    assert unwrap(speech.model) is speech.model
