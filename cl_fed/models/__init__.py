"""Speech models behind one interface (`SpeechModel`): the embedded tiny FastConformer CTC model,
any Hugging Face CTC model, and Whisper. Build or load them with `build_model` / `load_model`."""

from cl_fed.models.base import SpeechModel, unwrap
from cl_fed.models.registry import EMBEDDED_MODELS, ModelNotFoundError, build_model, load_model
from cl_fed.models.vocab import CharVocab, VocabError

__all__ = [
    "EMBEDDED_MODELS",
    "CharVocab",
    "ModelNotFoundError",
    "SpeechModel",
    "VocabError",
    "build_model",
    "load_model",
    "unwrap",
]
