"""Models for the server-side benchmarks: the embedded tiny model and Whisper shapes, built locally.

Whisper models get random weights from a WhisperConfig with the published sizes of
openai/whisper-{base,small}, so nothing downloads; the LoRA spec is the one a run would use
(cl_fed.continual.lora_spec with the default config: tiny r=8 on its attention and feed-forward
projections, Whisper r=32 on q_proj/v_proj).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from cl_fed.adapters import LoraSpec
from cl_fed.config import make_config
from cl_fed.continual import lora_spec
from cl_fed.models.tiny import NAME as TINY_NAME
from cl_fed.models.tiny import build_tiny

# config.json of openai/whisper-tiny, -base, -small and -large-v3-turbo
WHISPER_SIZES = {
    "whisper-tiny": dict(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
    ),
    "whisper-base": dict(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
    ),
    "whisper-small": dict(
        d_model=768,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=12,
        decoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_ffn_dim=3072,
    ),
    "whisper-large-v3-turbo": dict(
        d_model=1280,
        encoder_layers=32,
        decoder_layers=4,
        encoder_attention_heads=20,
        decoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_ffn_dim=5120,
        num_mel_bins=128,
        vocab_size=51866,
    ),
}
MODELS = ("tiny", "whisper-base", "whisper-small")  # the server-side benchmarks' defaults


def build(name: str, seed: int = 0) -> tuple[str, nn.Module, LoraSpec]:
    """(display name, plain torch model with random weights, the run's default LoRA spec for it)."""
    cfg = make_config({})
    if name == "tiny":
        speech = build_tiny(seed=seed)
        return TINY_NAME, speech.model, lora_spec(cfg, speech)
    if name not in WHISPER_SIZES:
        raise ValueError(f"unknown benchmark model {name!r}; choose from tiny, {', '.join(WHISPER_SIZES)}")
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from cl_fed.models.hf import WhisperSpeech

    sizes = {"vocab_size": 51865, "num_mel_bins": 80, **WHISPER_SIZES[name]}
    config = WhisperConfig(max_source_positions=1500, max_target_positions=448, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    return f"{name} (random)", model.eval(), lora_spec(cfg, WhisperSpeech)  # the family's class defaults


def name_list(allowed: tuple[str, ...], flag: str):
    """argparse type for a comma-separated list of names from `allowed`."""

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{flag} {text!r}: unknown {unknown}; choose from {', '.join(allowed)}"
            )
        return names

    return parse
