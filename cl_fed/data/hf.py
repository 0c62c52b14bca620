"""Hugging Face `datasets` sources as Utterances: a `save_to_disk` folder or an audiofolder folder.

datasets 5.x decodes and encodes audio through torchcodec, which cl-fed does not install, so audio
is never decoded here. A saved dataset is read with its audio column cast to `Audio(decode=False)`:
a clip whose original file still exists is used in place, otherwise its embedded bytes are written
once into `cache_dir` under a content hash. An audiofolder's splits are found with
`load_dataset_builder("audiofolder")` (the same split rules as `load_dataset`), and its metadata
files are read directly: building it with `load_dataset` would encode every clip via torchcodec.
Every row then goes through the manifest checks (`cl_fed.data.manifest.check_rows`).
"""

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cl_fed.data.manifest import (
    LoadSummary,
    ManifestError,
    RowProblem,
    check_rows,
    read_csv_rows,
    read_jsonl_rows,
)
from cl_fed.data.utterance import Utterance
from cl_fed.paths import cache_root

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
logger = logging.getLogger(__name__)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _cached_audio_file(data: bytes, name_hint: str, cache_dir: Path) -> str:
    """Write clip bytes once to cache_dir/<sha256 prefix><suffix>.

    The same bytes always map to the same file.
    """
    suffix = Path(name_hint).suffix.lower() if name_hint else ""
    if not (1 < len(suffix) <= 6):
        suffix = ".audio"  # libsndfile recognises formats by content, so any suffix works
    target = cache_dir / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp_name, target)
    return str(target)


def _audio_value(value: object, cache_dir: Path) -> str | RowProblem:
    """An audio cell (Audio(decode=False) dict or plain path) as a file path, or why it has none."""
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        if path and os.path.isabs(path) and os.path.isfile(path):
            return path
        if data:
            return _cached_audio_file(data, path or "", cache_dir)
        if path:
            return path  # relative to the dataset folder, or missing: check_row reports it
        return RowProblem("missing_field", "audio cell has neither bytes nor a path")
    if isinstance(value, str) and value.strip():
        return value
    return RowProblem("missing_field", f"audio cell is empty or not a path ({type(value).__name__})")


def _fields(
    row: dict, audio: str | RowProblem, columns: dict[str, str | None], split_name: str | None, row_id: str
):
    """Map a source row onto Utterance field names. `split_name` (if given) is the row's split."""
    if isinstance(audio, RowProblem):
        return audio
    fields = {"audio": audio, "id": row_id}
    if split_name is not None:
        fields["split"] = split_name
    for name, column in columns.items():
        if column is not None and row.get(column) is not None:
            fields[name] = row[column]
    return fields


def _check_columns(available: list[str], columns: dict[str, str | None], where: str) -> None:
    missing = [column for column in columns.values() if column is not None and column not in available]
    if missing:
        raise ManifestError(f"{where}: column(s) {missing} not found; columns are {available}")


def _saved_rows(
    folder: Path, split: str | None, audio_column: str, columns: dict, cache_dir: Path, name_splits: bool
) -> Iterator[tuple[str, dict | RowProblem]]:
    import datasets  # heavy import, only for this path

    loaded = datasets.load_from_disk(str(folder))
    parts = dict(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else {None: loaded}
    if split is not None:
        if split not in parts:
            raise ManifestError(f"{folder}: no split {split!r}; splits are {[p for p in parts if p]}")
        parts = {split: parts[split]}
    for split_name, dataset in parts.items():
        where = f"{folder} [{split_name or 'dataset'}]"
        _check_columns(dataset.column_names, {"audio": audio_column, **columns}, where)
        if isinstance(dataset.features[audio_column], datasets.Audio):
            dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
        for index, row in enumerate(dataset, start=1):
            label = f"{split_name}:{index}" if split_name else str(index)
            audio = _audio_value(row[audio_column], cache_dir)
            as_split = split_name if name_splits else None
            yield label, _fields(row, audio, columns, as_split, f"{split_name or 'row'}-{index}")


def _metadata_rows(path: Path, text_column: str) -> Iterator[tuple[int, dict | RowProblem]]:
    if path.suffix == ".csv":
        return read_csv_rows(path, required=(text_column,))
    if path.suffix == ".jsonl":
        return read_jsonl_rows(path)
    import pyarrow.parquet as pq

    return enumerate(pq.read_table(path).to_pylist(), start=1)


def _audiofolder_rows(
    folder: Path, split: str | None, audio_column: str, columns: dict, cache_dir: Path, name_splits: bool
) -> Iterator[tuple[str, dict | RowProblem]]:
    import datasets

    # the builder only lists files per split here; nothing is prepared or encoded
    hf_cache = str(cache_dir / "datasets")
    builder = datasets.load_dataset_builder("audiofolder", data_dir=str(folder), cache_dir=hf_cache)
    split_files = {str(name): [Path(f) for f in files] for name, files in builder.config.data_files.items()}
    if split is not None:
        if split not in split_files:
            raise ManifestError(f"{folder}: no split {split!r}; splits are {sorted(split_files)}")
        split_files = {split: split_files[split]}
    for split_name, files in split_files.items():
        metadata_files = sorted(f for f in files if f.name in METADATA_NAMES)
        if not metadata_files:
            names = " / ".join(METADATA_NAMES)
            raise ManifestError(f"{folder} [{split_name}]: audiofolder without {names}, so no transcripts")
        for metadata in metadata_files:
            for line, row in _metadata_rows(metadata, columns["text"]):
                label = f"{metadata.relative_to(folder)}:{line}"
                if isinstance(row, RowProblem):
                    yield label, row
                    continue
                file_name = row.get("file_name") or row.get(f"{audio_column}_file_name")
                if not file_name:
                    yield (
                        label,
                        RowProblem("missing_field", f"no 'file_name' (or '{audio_column}_file_name')"),
                    )
                    continue
                audio = os.path.normpath(metadata.parent / str(file_name))
                row_id = Path(os.path.relpath(audio, folder)).with_suffix("").as_posix()
                yield label, _fields(row, audio, columns, split_name if name_splits else None, row_id)


def read_hf_dataset(
    source: str | Path,
    *,
    split: str | None = None,
    audio_column: str = "audio",
    text_column: str = "text",
    site_column: str | None = None,
    stage_column: str | None = None,
    split_column: str | None = None,
    speaker_column: str | None = None,
    id_column: str | None = None,
    language_column: str | None = None,
    cache_dir: str | Path | None = None,
    vocab: set[str] | None = None,
    max_seconds: float | None = None,
    on_error: str = "raise",
    check_audio: bool = True,
    defaults: dict | None = None,
) -> tuple[list[Utterance], LoadSummary]:
    """Like `load_hf_dataset`, also returning the LoadSummary of kept and skipped rows."""
    folder = Path(source).expanduser().absolute()
    if not folder.is_dir():
        raise ManifestError(f"{folder}: dataset folder not found")
    cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir else cache_root() / "hf_audio"
    columns = {
        "text": text_column,
        "site": site_column,
        "stage": stage_column,
        "split": split_column,
        "speaker": speaker_column,
        "id": id_column,
        "language": language_column,
    }
    # the HF split name is the row's split unless a column or a default says otherwise
    name_splits = split_column is None and "split" not in (defaults or {})
    read_rows = _saved_rows if _is_saved_dataset(folder) else _audiofolder_rows
    rows = read_rows(folder, split, audio_column, columns, cache_dir, name_splits)
    return check_rows(
        rows,
        source=str(folder),
        base_dir=folder,
        id_prefix=folder.name,
        vocab=vocab,
        max_seconds=max_seconds,
        on_error=on_error,
        check_audio=check_audio,
        defaults=defaults,
    )


def load_hf_dataset(source: str | Path, **kwargs: Any) -> list[Utterance]:
    """Utterances from a `save_to_disk` folder (Dataset or DatasetDict) or an audiofolder folder.

    `split` picks one split (default: all). A row's split is its `split_column` value, else
    `defaults["split"]`, else the HF split name; anything but train/test is a row error, so pick
    e.g. split="validation" with defaults={"split": "test"}. Other keyword arguments are those of
    `read_hf_dataset` (columns, cache_dir, vocab, max_seconds, on_error, check_audio, defaults).
    """
    utterances, summary = read_hf_dataset(source, **kwargs)
    if summary.skipped:
        logger.warning(summary.format())
    return utterances
