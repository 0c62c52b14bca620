"""The record every data source (synthetic scenario, manifest, HF dataset) is mapped onto."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Utterance:
    id: str  # unique within a dataset
    audio: str  # absolute path to an audio file
    text: str  # transcript, already normalised with cl_fed.textnorm.normalize_text
    site: str = ""  # which factory holds it ("" = not site-specific, e.g. a shared test set)
    stage: str = ""  # which stage (data chunk) it belongs to
    split: str = "train"  # "train" or "test"
    speaker: str = ""
    language: str = ""  # e.g. "en", "de", or "de-en" for code-switched
    seconds: float = 0.0  # duration, 0.0 if unknown

    def to_dict(self) -> dict:
        return asdict(self)
