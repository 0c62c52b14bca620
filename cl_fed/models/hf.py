"""Hugging Face speech models behind the SpeechModel interface.

- `HFCTCModel`: any `AutoModelForCTC` (wav2vec2, HuBERT, WavLM, Parakeet CTC) with its processor;
  greedy CTC decoding through the tokenizer (which groups repeats and drops the blank/pad token).
- `WhisperSpeech`: `WhisperForConditionalGeneration` with its processor. The language is fixed or
  taken per utterance from the data's `language` field; labels carry the same prefix tokens
  (language, task, no timestamps) that `generate` is given. Optionally a shorter encoder window.

Features cached by training are the raw waves: the processors pad and normalise per batch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCTC, AutoProcessor, WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from cl_fed.data.features import spec_augment
from cl_fed.models.base import SpeechModel, pad_labels, unwrap
from cl_fed.textnorm import normalize_text

CTC_LORA_TARGETS = {
    # model_type -> attention (and feed-forward) projection names inside the encoder blocks
    "parakeet_ctc": ("q_proj", "k_proj", "v_proj", "o_proj", "linear1", "linear2"),
}
DEFAULT_CTC_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # wav2vec2 / HuBERT / WavLM
SPEC_AUGMENT = dict(freq_masks=2, freq_width=15, time_masks=2, time_width_ratio=0.05)
WHISPER_TASKS = ("transcribe", "translate")


class _WhisperGenerateNoise(logging.Filter):
    """Drops two warnings transformers' Whisper `generate` raises about itself: it passes its own
    suppress tokens next to its generation_config, and its decoder prompt (same length for every row,
    no padding) is all the "attention mask" warning is about. Every evaluation would print both."""

    NOISE = ("Passing `generation_config` together with generation-related", "The attention mask is not set")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


logging.getLogger("transformers.generation.utils").addFilter(_WhisperGenerateNoise())


def _waves_as_numpy(features: list[torch.Tensor]) -> list[np.ndarray]:
    return [f.detach().to(torch.float32).cpu().numpy() for f in features]


class HFCTCModel(SpeechModel):
    family = "ctc"
    lora_rank = 16
    lora_alpha = 32
    lora_dropout = 0.05

    def __init__(self, model: torch.nn.Module, processor, name: str = ""):
        self.model = model
        self.processor = processor
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.feature_key = f"wave:{self.sample_rate}"
        # Per-token mean CTC loss (wav2vec2 checkpoints default to "sum"), so one lr suits every batch
        # size, and infeasible alignments give zero loss instead of inf.
        model.config.ctc_loss_reduction = "mean"
        model.config.ctc_zero_infinity = True
        self.lora_targets = CTC_LORA_TARGETS.get(model.config.model_type, DEFAULT_CTC_LORA_TARGETS)
        letters = [t for t in self.tokenizer.get_vocab() if len(t) == 1 and t.isalpha()]
        # Checkpoints such as wav2vec2-base-960h spell in capitals; our normalised texts are lower case.
        self.uppercase_targets = bool(letters) and all(t.isupper() for t in letters)
        self.blank_id = model.config.pad_token_id

    def features(self, wave: torch.Tensor) -> torch.Tensor:
        return wave.to(torch.float32)

    def collate(self, features, texts=None, augment=False, generator=None, languages=None) -> dict:
        # Models fed raw waves (wav2vec2 family) apply their own SpecAugment in train mode
        # (config.apply_spec_augment); models fed filterbanks get ours when `augment`.
        inputs = self.feature_extractor(
            _waves_as_numpy(features), sampling_rate=self.sample_rate, padding=True, return_tensors="pt"
        )
        batch = dict(inputs)
        if augment and "input_features" in batch:
            batch["input_features"] = _augment_rows(
                batch["input_features"], batch.get("attention_mask"), generator
            )
        if texts is not None:
            targets = [t.upper() if self.uppercase_targets else t for t in texts]
            ids = self.tokenizer(targets, add_special_tokens=False)["input_ids"]
            batch["labels"] = pad_labels(ids)
        return batch

    @torch.no_grad()
    def transcribe(self, batch: dict) -> list[str]:
        batch = {k: v for k, v in self._on_device(batch).items() if k != "labels"}
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(**batch).logits
        finally:
            self.model.train(was_training)
        ids = logits.argmax(dim=-1)
        lengths = self._output_lengths(batch.get("attention_mask"), ids.shape[1], ids.shape[0])
        rows = [row[:length].tolist() for row, length in zip(ids, lengths)]
        texts = self.tokenizer.batch_decode(rows)  # CTC tokenizers group repeats and drop the blank
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        for special in specials:
            texts = [text.replace(special, " ") for text in texts]
        return [normalize_text(text) for text in texts]

    def _output_lengths(self, attention_mask, num_frames: int, batch_size: int) -> list[int]:
        if attention_mask is None:
            return [num_frames] * batch_size
        inner = unwrap(self.model)
        if hasattr(inner, "_get_output_attention_mask"):  # Parakeet
            return inner._get_output_attention_mask(attention_mask, target_length=num_frames).sum(-1).tolist()
        lengths = inner._get_feat_extract_output_lengths(attention_mask.sum(-1))
        return lengths.clamp(max=num_frames).tolist()

    def _save_extra(self, directory: Path) -> None:
        self.processor.save_pretrained(directory)

    def _info(self) -> dict:
        return {"name": self.name}


class WhisperSpeech(SpeechModel):
    """Whisper with its processor.

    language: a Whisper language code or name ("de", "german"), or None for each utterance's own
        `language` field ("de-en", code-switched, is prompted as its first language, "de"). It
        sets the label prefix and is given to `generate`, so training and decoding agree. English-
        only checkpoints (".en") take neither a language nor a task token.
    task: "transcribe" or "translate" (the labels are the data's texts either way).
    window: the encoder's input in seconds (Whisper: 30). A shorter window (`set_window`) cuts the
        positional embeddings and the padding, so a 5 s clip costs ~1/6 of the encoder's compute;
        the pretrained model never saw a short window, so accuracy drops until it is fine-tuned.
    """

    family = "whisper"
    lora_targets = ("q_proj", "v_proj")  # the paper's code
    lora_rank = 32
    lora_alpha = 64
    lora_dropout = 0.05

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        processor: WhisperProcessor,
        name: str = "",
        language: str | None = None,
        task: str = "transcribe",
        max_new_tokens: int | None = None,
    ):
        self.model = model
        self.processor = processor
        self.feature_extractor = processor.feature_extractor
        self.tokenizer = processor.tokenizer
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.feature_key = f"wave:{self.sample_rate}"
        self.multilingual = bool(getattr(model.generation_config, "is_multilingual", False))
        self.set_language(language, task)
        positions = int(model.config.max_source_positions)
        if positions * 2 != self.feature_extractor.nb_max_frames:  # a saved shortened model
            self._pad_features_to(positions * 2)

    # ---- language, task, window -----------------------------------------------------------------
    def set_language(self, language: str | None, task: str = "transcribe") -> None:
        """Fix the language (a code or name) or, with None / "auto", take each utterance's."""
        if task not in WHISPER_TASKS:
            raise ValueError(f"task={task!r}; choose one of {', '.join(WHISPER_TASKS)}")
        code = None if language in (None, "", "auto") else self._language_code(language, "language")
        if not self.multilingual and (code not in (None, "en") or task != "transcribe"):
            raise ValueError(
                f"language={language!r}, task={task!r}: {self.name or 'this Whisper model'} is English-"
                "only (a .en checkpoint); use language=auto or en and task=transcribe"
            )
        self.language, self.task = code, task

    def set_window(self, seconds: float) -> None:
        """Cut the encoder window to `seconds` (rounded up to 20 ms; at most 30 s)."""
        hop = self.feature_extractor.hop_length
        frames = 2 * math.ceil(seconds * self.sample_rate / hop / 2)
        full = 2 * int(unwrap(self.model).config.max_source_positions)  # the model's window, in frames
        if not 0 < seconds or frames > full:
            raise ValueError(
                f"whisper-window={seconds!r} s: choose 0 < seconds <= {full * hop / self.sample_rate:g}"
            )
        inner = unwrap(self.model)
        encoder = inner.model.encoder
        weight = encoder.embed_positions.weight.detach()[: frames // 2].clone()
        encoder.embed_positions = torch.nn.Embedding.from_pretrained(weight, freeze=True).to(weight.device)
        for config in {id(inner.config): inner.config, id(encoder.config): encoder.config}.values():
            config.max_source_positions = frames // 2
        encoder.max_source_positions = frames // 2
        self._pad_features_to(frames)

    @property
    def window_seconds(self) -> float:
        return self.feature_extractor.n_samples / self.sample_rate

    def _pad_features_to(self, frames: int) -> None:
        self.feature_extractor.nb_max_frames = frames
        self.feature_extractor.n_samples = frames * self.feature_extractor.hop_length

    def _language_code(self, language: str, what: str) -> str:
        code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
        if code not in LANGUAGES:
            raise ValueError(f"{what}={language!r} is not a Whisper language (e.g. en, de, es, fr, german)")
        return code

    def _languages(self, languages: list[str] | None, count: int) -> list[str | None]:
        """The language each row is prompted with (None rows: English-only models)."""
        if not self.multilingual:
            return [None] * count
        if self.language is not None:
            return [self.language] * count
        if languages is None or len(languages) != count or not all(languages):
            raise ValueError(
                "language=auto takes each utterance's language, but some utterances have none; "
                "give the data a language field (manifests: a language column) or set language=<code>"
            )
        return [self._language_code(lang.split("-")[0], "utterance language") for lang in languages]

    def _prefix(self, language: str | None) -> list[int]:
        """<|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>: what generate forces."""
        tokens = ["<|startoftranscript|>"]
        if self.multilingual:
            tokens += [f"<|{language}|>", f"<|{self.task}|>"]
        return self.tokenizer.convert_tokens_to_ids(tokens + ["<|notimestamps|>"])

    # ---- SpeechModel ----------------------------------------------------------------------------
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        return wave.to(torch.float32)

    def collate(self, features, texts=None, augment=False, generator=None, languages=None) -> dict:
        waves = _waves_as_numpy(features)
        longest = max((len(w) for w in waves), default=0) / self.sample_rate
        if longest > self.window_seconds + 1e-6:
            raise ValueError(
                f"a {longest:.2f} s clip does not fit Whisper's {self.window_seconds:g} s window; "
                "raise whisper-window (0 = 30 s) or cut the clip (max-seconds)"
            )
        inputs = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        input_features = inputs["input_features"]  # (batch, n_mels, window frames): padded to the window
        if augment:
            hop = self.feature_extractor.hop_length
            frames = torch.tensor([min(input_features.shape[-1], math.ceil(len(w) / hop)) for w in waves])
            mask = torch.arange(input_features.shape[-1])[None, :] < frames[:, None]
            input_features = _augment_rows(input_features.transpose(1, 2), mask, generator).transpose(1, 2)
        rows = self._languages(languages, len(waves))
        batch = {"input_features": input_features}
        if self.multilingual:
            batch["languages"] = rows
        if texts is not None:
            text_ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
            # The model prepends decoder_start_token_id (<|startoftranscript|>) when shifting labels right.
            ids = [self._prefix(lang)[1:] + seq + [eot] for lang, seq in zip(rows, text_ids)]
            batch["labels"] = pad_labels(ids)
        return batch

    def outputs(self, batch: dict):
        return super().outputs({k: v for k, v in batch.items() if k != "languages"})

    @torch.no_grad()
    def transcribe(self, batch: dict) -> list[str]:
        batch = self._on_device(batch)
        kwargs = {}
        if self.multilingual:
            rows = batch.get("languages") or self._languages(None, batch["input_features"].shape[0])
            kwargs = {"language": rows[0] if len(set(rows)) == 1 else list(rows), "task": self.task}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.max_new_tokens
        was_training = self.model.training
        self.model.eval()
        try:
            ids = unwrap(self.model).generate(input_features=batch["input_features"], **kwargs)
        finally:
            self.model.train(was_training)
        return [normalize_text(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _save_extra(self, directory: Path) -> None:
        self.processor.save_pretrained(directory)

    def _info(self) -> dict:
        return {"name": self.name, "language": self.language, "task": self.task}


def _augment_rows(features: torch.Tensor, mask: torch.Tensor | None, generator) -> torch.Tensor:
    """SpecAugment each row of (batch, frames, bins) on its valid frames only."""
    out = features.clone()
    for row in range(features.shape[0]):
        length = int(mask[row].sum()) if mask is not None else features.shape[1]
        if length > 0:
            out[row, :length] = spec_augment(features[row, :length], generator, **SPEC_AUGMENT)
    return out


def load_hf_ctc(name_or_path: str | os.PathLike, *, local_files_only: bool) -> HFCTCModel:
    processor = AutoProcessor.from_pretrained(name_or_path, local_files_only=local_files_only)
    model = AutoModelForCTC.from_pretrained(
        name_or_path, local_files_only=local_files_only, dtype=torch.float32
    )
    return HFCTCModel(model.eval(), processor, name=str(name_or_path))


def load_whisper(
    name_or_path: str | os.PathLike,
    *,
    language: str | None,
    task: str,
    local_files_only: bool,
) -> WhisperSpeech:
    processor = WhisperProcessor.from_pretrained(name_or_path, local_files_only=local_files_only)
    model = WhisperForConditionalGeneration.from_pretrained(
        name_or_path, local_files_only=local_files_only, dtype=torch.float32
    )
    return WhisperSpeech(model.eval(), processor, name=str(name_or_path), language=language, task=task)
