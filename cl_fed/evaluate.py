"""Transcribe utterances with a SpeechModel and score WER/CER (cl_fed.metrics, normalised text)."""

from __future__ import annotations

from cl_fed.data.utterance import Utterance
from cl_fed.metrics import cer, wer
from cl_fed.models.base import SpeechModel
from cl_fed.train import FEATURE_CACHE, FeatureCache


def transcribe(
    speech: SpeechModel,
    utterances: list[Utterance],
    batch_size: int = 32,
    cache: FeatureCache | None = None,
) -> list[str]:
    """One hypothesis per utterance, in the order given (batched by length to limit padding)."""
    cache = FEATURE_CACHE if cache is None else cache
    features = [cache.get(speech, u)[0] for u in utterances]
    order = sorted(range(len(utterances)), key=lambda i: (features[i].shape[0], i))
    hypotheses: list[str] = [""] * len(utterances)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = speech.collate(
            [features[i] for i in indices], languages=[utterances[i].language for i in indices]
        )
        texts = speech.transcribe(batch)
        for i, text in zip(indices, texts):
            hypotheses[i] = text
    return hypotheses


def evaluate(
    speech: SpeechModel,
    utterances: list[Utterance],
    batch_size: int = 32,
    cache: FeatureCache | None = None,
) -> dict:
    """{"wer", "cer" (percent), "predictions": [{"id", "reference", "hypothesis"}]}."""
    if not utterances:
        raise ValueError("evaluate needs at least one utterance")
    hypotheses = transcribe(speech, utterances, batch_size=batch_size, cache=cache)
    references = [u.text for u in utterances]
    return {
        "wer": wer(references, hypotheses),
        "cer": cer(references, hypotheses),
        "predictions": [
            {"id": u.id, "reference": u.text, "hypothesis": h} for u, h in zip(utterances, hypotheses)
        ],
    }
