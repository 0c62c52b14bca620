"""SpeechModel implementations: character vocab, tiny FastConformer, HF CTC (wav2vec2) and Whisper.

HF models are tiny, randomly initialised and written to tmp_path by the test itself (nothing downloads).
"""

import json
import math

import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import (
    GenerationConfig,
    ParakeetCTCConfig,
    ParakeetFeatureExtractor,
    ParakeetForCTC,
    ParakeetProcessor,
    ParakeetTokenizer,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Processor,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.data.utterance import Utterance
from cl_fed.evaluate import evaluate
from cl_fed.models import CharVocab, ModelNotFoundError, VocabError, build_model, load_model, unwrap
from cl_fed.models.hf import HFCTCModel, WhisperSpeech
from cl_fed.models.tiny import TinyFastConformer
from cl_fed.train import TrainConfig, train_local

SR = 16000


def waves(*seconds: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(SR * s), generator=g) for s in seconds]


def lora_spec(speech) -> LoraSpec:
    return LoraSpec(speech.lora_rank, speech.lora_alpha, speech.lora_dropout, speech.lora_targets)


def make_wav2vec2(directory) -> None:
    directory.mkdir()
    vocab = {
        "<pad>": 0,
        "<unk>": 1,
        "|": 2,
        **{c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")},
    }
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(directory / "vocab.json"), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|"
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 4, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        mask_time_prob=0.05,
        mask_time_length=2,
    )
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(directory)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)


def make_whisper(directory) -> None:
    """A byte-level Whisper tokenizer (no merges) with the real special-token layout, and a 1-layer model."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    specials = [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{c}|>" for c in LANGUAGES],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        bos_token_id=eot,
        max_length=32,
        is_multilingual=True,
        lang_to_id={f"<|{c}|>": vocab[f"<|{c}|>"] for c in LANGUAGES},
        task_to_id={"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]},
        no_timestamps_token_id=vocab["<|notimestamps|>"],
    )
    model.save_pretrained(directory)
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    ).save_pretrained(directory)


def make_parakeet(directory) -> None:
    """A character-level ParakeetTokenizer ("<blank>" = pad = CTC blank) and a 1-block ParakeetForCTC."""
    vocab = {"<unk>": 0, "\u2581": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    vocab["<blank>"] = len(vocab)
    backend = Tokenizer(
        tokenizer_models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer = ParakeetTokenizer(tokenizer_object=backend, unk_token="<unk>", pad_token="<blank>")
    config = ParakeetCTCConfig(
        vocab_size=len(vocab),
        pad_token_id=vocab["<blank>"],
        encoder_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            subsampling_conv_channels=16,
            num_mel_bins=80,
        ),
    )
    torch.manual_seed(0)
    ParakeetForCTC(config).save_pretrained(directory)
    ParakeetProcessor(
        feature_extractor=ParakeetFeatureExtractor(feature_size=80), tokenizer=tokenizer
    ).save_pretrained(directory)


def assert_targets_exist(speech) -> None:
    names = [name for name, _ in unwrap(speech.model).named_modules()]
    for target in speech.lora_targets:
        assert any(n.endswith("." + target) for n in names), target


def assert_trains(speech, texts: list[str]) -> None:
    """loss is finite and positive; backward reaches every trainable parameter."""
    speech.model.train()
    batch = speech.batch(waves(1.0, 0.7), texts, augment=True, generator=torch.Generator().manual_seed(0))
    loss = speech.loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in speech.model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# ---- vocabulary ----------------------------------------------------------------------------------


def test_char_vocab_round_trip_and_ctc_decoding(tmp_path):
    vocab = CharVocab()
    text = "l'été à köln señor ça"
    ids = vocab.encode(text)
    assert 0 not in ids
    with_blanks = [t for i in ids for t in (0, i)]
    assert vocab.decode_ctc(with_blanks) == text
    # blanks separate a real double letter; repeats without a blank collapse
    el, o = vocab.encode("l")[0], vocab.encode("o")[0]
    assert vocab.decode_ctc([0, el, el, 0, el, o, o, 0]) == "llo"
    vocab.save(tmp_path)
    assert CharVocab.load(tmp_path).tokens == vocab.tokens
    for ch in "äöüßáéíóúñçàèêëîïôûùÿœæâ":
        assert ch in vocab


def test_char_vocab_rejects_unknown_characters_by_name():
    with pytest.raises(VocabError, match=r"\['7', 'ж'\]"):
        CharVocab().encode("room 7 жж")


def test_char_vocab_load_rejects_bad_file(tmp_path):
    (tmp_path / "char_vocab.json").write_text('{"tokens": ["a", "b"]}')
    with pytest.raises(VocabError, match="char_vocab.json"):
        CharVocab.load(tmp_path)


# ---- tiny FastConformer ----------------------------------------------------------------------------


def test_tiny_model_size_and_seeded_init():
    a = build_model("tiny-fastconformer-ctc", seed=0)
    b = build_model("tiny-fastconformer-ctc", seed=0)
    c = build_model("tiny-fastconformer-ctc", seed=1)
    assert isinstance(a, TinyFastConformer) and a.family == "fastconformer-ctc"
    assert 1_500_000 < a.num_parameters() < 3_000_000
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_model_forward_backward_and_transcribe():
    speech = build_model("tiny-fastconformer-ctc")
    assert_targets_exist(speech)
    assert_trains(speech, ["guten tag", "ça va très bien"])
    batch = speech.batch(waves(1.0, 0.5))
    assert batch["input_features"].shape == (2, 101, 80)
    assert batch["attention_mask"].sum(dim=1).tolist() == [101, 51]
    texts = speech.transcribe(batch)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_tiny_model_padding_does_not_change_transcripts():
    speech = build_model("tiny-fastconformer-ctc", seed=3)
    short, long = waves(0.6, 1.5, seed=4)
    alone = speech.transcribe(speech.batch([short]))
    padded = speech.transcribe(speech.batch([short, long]))
    assert padded[0] == alone[0]


def test_tiny_model_save_load_round_trip_is_identical(tmp_path):
    speech = build_model("tiny-fastconformer-ctc", seed=5)
    speech.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, TinyFastConformer)
    batch = speech.batch(waves(1.2, 0.8))
    speech.model.eval()
    with torch.no_grad():
        assert torch.equal(speech.model(**batch).logits, loaded.model(**batch).logits)
    assert speech.transcribe(batch) == loaded.transcribe(batch)


def test_saving_a_lora_wrapped_model_merges_the_adapter(tmp_path):
    speech = build_model("tiny-fastconformer-ctc", seed=6)
    speech.model = attach_lora(speech.model, lora_spec(speech), seed=0)
    with torch.no_grad():  # a non-zero adapter, so merging matters
        for name, p in speech.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = speech.batch(waves(1.0))
    speech.model.eval()
    with torch.no_grad():
        wrapped = speech.model(**batch).logits
        base = unwrap(speech.model)
        with speech.model.disable_adapter():
            plain = speech.model(**batch).logits
    speech.save(tmp_path / "merged")
    loaded = load_model(tmp_path / "merged")
    with torch.no_grad():
        reloaded = loaded.model(**batch).logits
    assert torch.allclose(reloaded, wrapped, atol=1e-4)
    assert not torch.allclose(reloaded, plain, atol=1e-3)
    assert any("lora" in n for n, _ in base.named_modules())  # the live model still carries its adapter


# ---- Hugging Face CTC (wav2vec2) ------------------------------------------------------------------


def test_wav2vec2_directory_loads_trains_and_transcribes(tmp_path):
    make_wav2vec2(tmp_path / "w2v")
    speech = build_model(tmp_path / "w2v")
    assert isinstance(speech, HFCTCModel) and speech.family == "ctc"
    assert speech.lora_targets == ("q_proj", "k_proj", "v_proj", "out_proj")
    assert_targets_exist(speech)
    batch = speech.batch(waves(1.0, 0.7), ["hello world", "it's"])
    # the tokenizer spells the space as its word delimiter; padding is -100
    delimiter = speech.tokenizer.convert_tokens_to_ids("|")
    assert batch["labels"][0, 5].item() == delimiter
    assert batch["labels"][1, 4:].eq(-100).all()
    assert_trains(speech, ["hello world", "it's"])
    texts = speech.transcribe(speech.batch(waves(1.0, 0.7)))
    assert len(texts) == 2 and all(set(t) <= set("abcdefghijklmnopqrstuvwxyz' ") for t in texts)


def test_wav2vec2_with_lora_attached_still_trains(tmp_path):
    make_wav2vec2(tmp_path / "w2v")
    speech = build_model(tmp_path / "w2v")
    speech.model = attach_lora(speech.model, lora_spec(speech), seed=0)
    assert 0 < speech.num_parameters(trainable_only=True) < speech.num_parameters() / 2
    assert_trains(speech, ["abc", "de"])


def test_parakeet_directory_uses_the_generic_ctc_path(tmp_path):
    make_parakeet(tmp_path / "pk")
    speech = build_model(tmp_path / "pk")
    assert isinstance(speech, HFCTCModel)
    assert speech.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "linear1", "linear2")
    assert_targets_exist(speech)
    batch = speech.batch(waves(1.0, 0.5), ["ab ba", "ab"])
    assert batch["input_features"].shape[:2] == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(dim=1).tolist()[1] < batch["attention_mask"].shape[1]
    assert_trains(speech, ["ab ba", "ab"])
    # a blank between two equal tokens keeps both; repeats without one collapse
    g, b, space, blank = (speech.tokenizer.convert_tokens_to_ids(t) for t in ("g", "b", "\u2581", "<blank>"))
    assert speech.tokenizer.decode([g, g, blank, g, space, b]) == "gg b"
    texts = speech.transcribe(speech.batch(waves(1.0, 0.5)))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


# ---- Whisper ------------------------------------------------------------------------------------


def test_whisper_directory_loads_with_language_prefix(tmp_path):
    make_whisper(tmp_path / "wh")
    speech = build_model(tmp_path / "wh", language="de")
    assert isinstance(speech, WhisperSpeech) and speech.family == "whisper"
    assert (speech.lora_targets, speech.lora_rank, speech.lora_alpha) == (("q_proj", "v_proj"), 32, 64)
    assert_targets_exist(speech)
    labels = speech.batch(waves(1.0), ["hallo"])["labels"][0].tolist()
    tok = speech.tokenizer
    # decoder_start is prepended by the model, so labels begin at the language token
    assert labels[:3] == tok.convert_tokens_to_ids(["<|de|>", "<|transcribe|>", "<|notimestamps|>"])
    assert tok.decode(labels[3:-1]) == "hallo" and labels[-1] == tok.eos_token_id
    assert_trains(speech, ["hallo welt", "ja"])


def test_whisper_learns_a_transcript_that_generate_reproduces(tmp_path):
    """Training labels and generation prompts agree: an overfit utterance decodes exactly."""
    make_whisper(tmp_path / "wh")
    speech = build_model(tmp_path / "wh", language="de")
    speech.max_new_tokens = 12
    path = tmp_path / "a.wav"
    sf.write(path, waves(1.0)[0].numpy(), SR)
    utterances = [Utterance(id="a", audio=str(path), text="hallo")]
    config = TrainConfig(
        max_steps=30, batch_size=1, lr=5e-3, schedule="constant", spec_augment=False, progress=False
    )
    result = train_local(speech, utterances, config)
    assert result.step_losses[-1] < 0.2 * result.step_losses[0]
    assert evaluate(speech, utterances)["predictions"][0]["hypothesis"] == "hallo"
    speech.save(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")  # language/task come back from the saved info
    assert reloaded.language == "de" and reloaded.task == "transcribe"
    assert evaluate(reloaded, utterances)["wer"] == 0.0


def test_whisper_language_auto_prompts_each_utterance_in_its_own_language(tmp_path):
    make_whisper(tmp_path / "wh")
    speech = build_model(tmp_path / "wh")  # language=None: each utterance's own
    tok = speech.tokenizer
    batch = speech.batch(waves(1.0, 0.5), ["hallo", "hola"], languages=["de", "es-en"])
    assert batch["languages"] == ["de", "es"]  # code-switched de-en / es-en prompt their first language
    assert batch["labels"][0][:2].tolist() == tok.convert_tokens_to_ids(["<|de|>", "<|transcribe|>"])
    assert batch["labels"][1][0].item() == tok.convert_tokens_to_ids("<|es|>")
    with pytest.raises(ValueError, match="language=auto.*language column"):
        speech.batch(waves(1.0), ["hallo"], languages=[""])
    speech.set_language("german", "translate")  # a fixed language wins over the data's
    labels = speech.batch(waves(1.0), ["hallo"], languages=["es"])["labels"][0][:2].tolist()
    assert labels == tok.convert_tokens_to_ids(["<|de|>", "<|translate|>"])
    with pytest.raises(ValueError, match="klingon"):
        speech.set_language("klingon")
    with pytest.raises(ValueError, match="task='summarise'"):
        speech.set_language("de", "summarise")


def test_whisper_auto_language_reaches_generate(tmp_path):
    """One clip, two transcripts told apart only by the language token: training labels and the
    generate prompt both carry each utterance's language, so each decodes to its own text."""
    make_whisper(tmp_path / "wh")
    speech = build_model(tmp_path / "wh")
    speech.max_new_tokens = 12
    path = tmp_path / "a.wav"
    sf.write(path, waves(1.0)[0].numpy(), SR)
    utterances = [
        Utterance(id="de", audio=str(path), text="hallo", language="de"),
        Utterance(id="es", audio=str(path), text="hola", language="es"),
    ]
    config = TrainConfig(
        max_steps=60, batch_size=2, lr=5e-3, schedule="constant", spec_augment=False, progress=False
    )
    train_local(speech, utterances, config)
    hypotheses = [p["hypothesis"] for p in evaluate(speech, utterances)["predictions"]]
    assert hypotheses == ["hallo", "hola"]


def test_whisper_window_cut_for_short_clips(tmp_path):
    make_whisper(tmp_path / "wh")
    speech = build_model(tmp_path / "wh", language="de")
    full = unwrap(speech.model).model.encoder.embed_positions.weight.detach().clone()
    speech.set_window(2.0)
    encoder = unwrap(speech.model).model.encoder
    assert speech.window_seconds == 2.0 and unwrap(speech.model).config.max_source_positions == 100
    assert torch.equal(encoder.embed_positions.weight, full[:100])  # positions cut, not re-learnt
    assert not encoder.embed_positions.weight.requires_grad
    batch = speech.batch(waves(1.0, 1.5), ["hallo", "ja"])
    assert batch["input_features"].shape[-1] == 200  # 2 s of 10 ms frames, not 30 s
    assert torch.isfinite(speech.loss(batch)) and len(speech.transcribe(batch)) == 2
    with pytest.raises(ValueError, match="2.50 s clip does not fit.*2 s window"):
        speech.batch(waves(2.5), ["hallo"])
    with pytest.raises(ValueError, match="whisper-window=3"):
        speech.set_window(3.0)  # longer than the (already cut) window
    speech.save(tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    assert reloaded.window_seconds == 2.0
    assert reloaded.batch(waves(1.0))["input_features"].shape[-1] == 200


# ---- registry -----------------------------------------------------------------------------------


def test_missing_directory_and_uncached_hub_id_fail_clearly(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        build_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="allow the download"):
        build_model("cl-fed-test/definitely-not-cached")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_lr_independent_ctc_loss_reduction(tmp_path):
    """wav2vec2 checkpoints sum the CTC loss; we switch to the per-token mean so lr means the same."""
    make_wav2vec2(tmp_path / "w2v")
    speech = build_model(tmp_path / "w2v")
    assert speech.model.config.ctc_loss_reduction == "mean"
    batch = speech.batch(waves(1.0, 1.0), ["abc abc", "de"])
    speech.model.eval()
    with torch.no_grad():
        loss = speech.loss(batch)
        speech.model.config.ctc_loss_reduction = "none"
        per_sequence = speech.loss(batch)
    target_lengths = torch.tensor([7.0, 2.0])
    assert math.isfinite(loss.item())
    assert torch.allclose(loss, (per_sequence / target_lengths).mean())
