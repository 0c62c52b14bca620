"""The one speech-model interface the project uses (training, evaluation, LoRA, merging, Flower).

A `SpeechModel` bundles a torch module with its input pipeline and decoder:

    features(wave)  -> the per-utterance input, cacheable across rounds (log-mel or the wave itself)
    collate(features, texts, augment, generator, languages) -> batch dict (model inputs; labels with texts)
    batch(waves, ...) = collate([features(w) ...], ...)
    loss(batch), transcribe(batch), save(directory)

`model` is the module LoRA attaches to; `cl_fed.adapters` may replace it with a peft PeftModel that
wraps it, and every method here keeps working on the wrapper.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

MODEL_INFO_FILE = "cl_fed_model.json"


@contextlib.contextmanager
def quiet_progress():
    """Silence transformers' per-call "Loading weights"/"Writing model shards" bars."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft PeftModel (LoRA layers still injected), or `module`."""
    get_base_model = getattr(module, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else module


def plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy without peft wrappers: LoRA deltas merged into the weights, `module` untouched."""
    if not callable(getattr(module, "merge_and_unload", None)):
        return module
    return copy.deepcopy(module).merge_and_unload()


class SpeechModel:
    family: str = ""  # "fastconformer-ctc" | "ctc" | "whisper"
    model: torch.nn.Module
    sample_rate: int = 16000
    lora_targets: tuple[str, ...] = ()
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # Identifies what `features` computes, so cached features of one pipeline never feed another.
    feature_key: str = ""

    # ---- input pipeline -------------------------------------------------------------------------
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def collate(
        self,
        features: list[torch.Tensor],
        texts: list[str] | None = None,
        augment: bool = False,
        generator: torch.Generator | None = None,
        languages: list[str] | None = None,
    ) -> dict:
        """`languages`: each utterance's `language` field (only Whisper uses it, to prompt)."""
        raise NotImplementedError

    def batch(
        self,
        waves: list[torch.Tensor],
        texts: list[str] | None = None,
        augment: bool = False,
        generator: torch.Generator | None = None,
        languages: list[str] | None = None,
    ) -> dict:
        return self.collate([self.features(w) for w in waves], texts, augment, generator, languages)

    # ---- model ----------------------------------------------------------------------------------
    def loss(self, batch: dict) -> torch.Tensor:
        return self.outputs(batch).loss

    def outputs(self, batch: dict):
        """The model's output on a batch made with texts: `.loss` and `.logits` (CTC: per frame;
        Whisper: per label position)."""
        if "labels" not in batch:
            raise ValueError("loss needs a batch made with texts (no 'labels' in the batch)")
        return self.model(**self._on_device(batch))

    def output_mask(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """(batch, positions) true where `logits` hold an output that counts: a label position
        (sequence-to-sequence: labels != -100), else a frame of speech (CTC: the encoder's mask)."""
        labels = batch.get("labels")
        if labels is not None and labels.shape[:2] == logits.shape[:2]:
            return labels.to(logits.device) != -100
        mask = batch.get("attention_mask")
        lengths_of = getattr(unwrap(self.model), "_get_output_attention_mask", None)
        if mask is not None and callable(lengths_of):
            return lengths_of(mask.to(logits.device), target_length=logits.shape[1]).bool()
        vector_mask = getattr(unwrap(self.model), "_get_feature_vector_attention_mask", None)  # wav2vec2
        if mask is not None and callable(vector_mask):
            return vector_mask(logits.shape[1], mask.to(logits.device)).bool()
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)

    def transcribe(self, batch: dict) -> list[str]:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """save_pretrained of the plain model (LoRA merged in if attached) + vocab/processor files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_progress():
            plain_copy(self.model).save_pretrained(directory)
        self._save_extra(directory)
        info = {"family": self.family, **self._info()}
        (directory / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    def _save_extra(self, directory: Path) -> None:
        pass

    def _info(self) -> dict:
        return {}

    # ---- helpers --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> SpeechModel:
        self.model.to(device)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)

    def _on_device(self, batch: dict) -> dict:
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pad_labels(sequences: list[list[int]], pad: int = -100) -> torch.Tensor:
    """Right-pad token id lists into (batch, longest) with `pad` (ignored by the CTC and CE losses)."""
    longest = max((len(s) for s in sequences), default=0)
    labels = torch.full((len(sequences), max(longest, 1)), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        labels[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return labels
