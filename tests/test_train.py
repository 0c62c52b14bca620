"""train_local and evaluate: learning, determinism, LoRA vs full fine-tuning, schedules, caching.

The data are tone sequences: each character is a 160 ms tone of its own pitch ("a" 400 Hz, "b" 900 Hz,
"c" 1600 Hz, space = silence), written as wav files, so a small model can learn them in seconds.

Tests that train assert properties with a wide margin (the loss falls by a stated factor, the CER stays
below a bound), never exact figures: those differ with the CPU and the number of threads.
"""

import math

import pytest
import soundfile as sf
import torch
import transformers

from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.data.utterance import Utterance
from cl_fed.evaluate import evaluate, transcribe
from cl_fed.models import unwrap
from cl_fed.models.tiny import build_tiny
from cl_fed.train import (
    SCHEDULES,
    FeatureCache,
    TrainConfig,
    length_batches,
    lr_at,
    num_warmup_steps,
    steps_per_call,
    train_local,
)

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
    """160 steps take the tiny model from CER 100 to about 0 (at most 1 of the 14 characters wrong and
    the loss down 5000-fold over 8 training seeds on 1 and 2 threads); the bounds leave a wide margin."""
    speech = build_tiny(seed=0, **SMALL)
    assert evaluate(speech, utterances)["cer"] >= 90  # untrained
    config = TrainConfig(max_steps=160, batch_size=4, lr=1e-2, spec_augment=False, progress=False)
    result = train_local(speech, utterances, config)
    assert result.steps == 160 and len(result.step_losses) == 160 and len(result.step_lrs) == 160
    assert sum(result.step_losses[-10:]) / 10 < 0.05 * result.step_losses[0]  # seen: < 0.001
    assert result.num_examples == 4
    assert result.audio_seconds == pytest.approx(160 * sum(u.seconds for u in utterances), rel=1e-6)
    scores = evaluate(speech, utterances)
    assert scores["cer"] <= 30  # at most 4 of 14 characters wrong; seen: 0 or 7.1
    assert [p["id"] for p in scores["predictions"]] == [u.id for u in utterances]
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
    assert result.steps == steps_per_call(4, 2, 3) == 2 * math.ceil(4 / 3)
    assert result.audio_seconds == pytest.approx(2 * sum(u.seconds for u in utterances), rel=1e-6)
    assert steps_per_call(5, 3, 2) == 9 and steps_per_call(4, 1, 4) == 1 and steps_per_call(4, 0, 4) == 0


def transformers_lrs(schedule: str, warmup_steps: int, span: int) -> list[float]:
    """The multipliers transformers' own scheduler gives steps 1..span of a `span + 1`-step schedule
    (its step 0 runs at LR 0 in warm-up, and cosine/linear reach 0 at their last step: both skipped)."""
    span += 1
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
    extra = {} if schedule in ("inverse_sqrt", "constant") else {"num_training_steps": span}
    scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, **extra)
    out = []
    for _ in range(span):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out[1:]


def test_schedules_are_transformers_with_linear_warmup():
    # transformers' steps shifted by one: step k < W runs at (k + 1) / W, the peak at step W - 1, and
    # the decay reaches 0 one step after the span (no step of a span runs at LR 0)
    def lrs(schedule: str, span: int, warmup: float = 0.1) -> list[float]:
        return [lr_at(TrainConfig(schedule=schedule, warmup=warmup), k, span) for k in range(span)]

    inv = lrs("inverse_sqrt", 40)  # W = 4, timescale W: sqrt(W / (k + 1)) from step W - 1 on
    assert inv[:4] == [0.25, 0.5, 0.75, 1.0]
    assert inv[15] == pytest.approx(0.5) and inv[35] == pytest.approx(1 / 3)
    cos = lrs("cosine", 20)  # W = 2, then half a cosine that would reach 0 at step 20
    assert cos[:2] == [0.5, 1.0]
    assert cos[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 19)))
    assert cos[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 18 / 19))) and cos[19] > 0
    lin = lrs("linear", 20)  # W = 2, then a straight line that would reach 0 at step 20
    assert lin[:2] == [0.5, 1.0]
    assert lin[10] == pytest.approx(10 / 19) and lin[19] == pytest.approx(1 / 19)
    assert lrs("constant", 20) == [0.5] + [1.0] * 19
    assert lrs("constant", 1) == [1.0]  # a one-step round learns (W = 1: the first step is the peak)
    # no warm-up: peak at once; inverse_sqrt then takes transformers' default timescale 10_000
    assert lrs("constant", 5, warmup=0) == [1.0] * 5
    assert lrs("inverse_sqrt", 5, warmup=0) == pytest.approx(
        [math.sqrt(1e4 / (1e4 + k + 1)) for k in range(5)]
    )
    for schedule in SCHEDULES:
        for span, warmup in [(20, 0.1), (7, 0.3), (12, 0.0)]:
            expected = transformers_lrs(schedule, num_warmup_steps(warmup, span), span)
            assert lrs(schedule, span, warmup) == pytest.approx(expected, abs=1e-12), (schedule, span)


def test_warmup_is_a_fraction_of_the_span():
    assert num_warmup_steps(0.1, 40) == 4 and num_warmup_steps(0.1, 400) == 40
    assert num_warmup_steps(0.25, 12) == 3 and num_warmup_steps(1.0, 10) == 10
    assert num_warmup_steps(0.1, 3) == 1  # rounds to 0, but any warm-up is at least one step
    assert num_warmup_steps(0.0, 100) == 0
    for span in (50, 100):  # warmup 0.2: the peak comes at step 9 of 50, step 19 of 100
        config = TrainConfig(schedule="constant", warmup=0.2)
        peak = span // 5
        assert lr_at(config, peak - 2, span) == pytest.approx(1 - 1 / peak)
        assert lr_at(config, peak - 1, span) == 1.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_span_split_into_calls_gives_the_lr_sequence_of_one_call(utterances, schedule):
    def call(**overrides) -> list[float]:
        speech = build_tiny(seed=0, **SMALL)
        result = train_local(speech, utterances, quick(schedule=schedule, warmup=0.3, **overrides))
        assert result.lr_mean == pytest.approx(sum(result.step_lrs) / len(result.step_lrs))
        return result.step_lrs

    whole = call(max_steps=10)  # span_steps None: the span is this call's 10 steps
    assert whole == pytest.approx([lr_at(quick(schedule=schedule, warmup=0.3), k, 10) for k in range(10)])
    assert 0 < whole[0] < 1 and max(whole) == pytest.approx(1.0)  # warm-up to the peak
    first = call(max_steps=4, span_steps=10)
    second = call(max_steps=6, span_steps=10, span_offset=4)
    assert first + second == whole  # exactly: the second call starts at span step 4
    # as a caller computes it from epochs: a stage of 3 rounds of 1 epoch of 4 utterances in batches of 2
    span = 3 * steps_per_call(4, 1, 2)
    rounds = [call(max_steps=None, epochs=1, span_steps=span, span_offset=r * 2) for r in range(3)]
    assert [lr for r in rounds for lr in r] == call(max_steps=None, epochs=3)


def test_bad_config_and_bad_input_fail_clearly(utterances):
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig(schedule="cosine_with_restarts")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match=r"warmup is a fraction.*got 10"):
        TrainConfig(warmup=10)  # a step count where a fraction belongs
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=-0.1)
    with pytest.raises(TypeError, match="warmup_steps"):
        TrainConfig(warmup_steps=5)  # the old field is gone, not silently ignored
    with pytest.raises(ValueError, match="span_offset must be >= 0"):
        TrainConfig(span_steps=10, span_offset=-1)
    with pytest.raises(ValueError, match="span_steps must be >= 0"):
        TrainConfig(span_steps=-1)
    with pytest.raises(ValueError, match=r"span_offset \(2\) needs span_steps"):
        TrainConfig(span_offset=2)
    with pytest.raises(
        ValueError, match=r"span_offset \+ steps \(4 \+ 7\) exceeds TrainConfig.span_steps \(10\)"
    ):
        TrainConfig(max_steps=7, span_steps=10, span_offset=4)
    with pytest.raises(ValueError, match=r"0 <= step < span_steps"):
        lr_at(TrainConfig(), 10, 10)
    with pytest.raises(ValueError, match="steps_per_call needs"):
        steps_per_call(4, 1, 0)
    speech = build_tiny(seed=0, **SMALL)
    with pytest.raises(ValueError, match="at least one utterance"):
        train_local(speech, [], quick())
    with pytest.raises(
        ValueError, match=r"span_offset \+ steps \(3 \+ 2\) exceeds TrainConfig.span_steps \(4\)"
    ):
        train_local(speech, utterances, quick(max_steps=None, batch_size=2, span_steps=4, span_offset=3))
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
