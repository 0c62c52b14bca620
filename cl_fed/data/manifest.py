"""Read and write utterance manifests (JSONL or CSV), vetting every row before training sees it.

A manifest row names an audio file and its transcript, plus optional id, speaker, site, stage,
split, language and seconds. Rows are checked here once, cheaply (audio headers only), so that a
bad file fails the run at load time with its manifest row named, not hours later inside a batch.
`check_rows` is the one validation loop; `cl_fed.data.hf` feeds Hugging Face rows through it too.

NeMo-style manifests load as they are: `audio_filepath` is read as `audio`, `duration` as `seconds`.
"""

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cl_fed.data.audio import AudioError, audio_info
from cl_fed.data.utterance import Utterance
from cl_fed.textnorm import normalize_text

REQUIRED_FIELDS = ("audio", "text")
OPTIONAL_FIELDS = ("id", "speaker", "site", "stage", "split", "language", "seconds")
FIELD_ALIASES = {"audio_filepath": "audio", "duration": "seconds"}
SPLITS = ("train", "test")
ON_ERROR = ("raise", "skip")
MAX_EXAMPLES = 5  # problems quoted in a LoadSummary


class ManifestError(ValueError):
    """A manifest (or dataset) that cannot be used as given; the message names file, row and value."""


class RowProblem(Exception):
    """Why one row is unusable. `reason` is the key rows are counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class LoadSummary:
    """What loading kept and what it skipped (by reason), for the run to print."""

    source: str
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def format(self) -> str:
        total = self.kept + self.num_skipped
        text = f"Loaded {self.kept} of {total} rows from {self.source}"
        if not self.skipped:
            return text + "."
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        text += f"; skipped {self.num_skipped} ({counts})."
        if self.examples:
            text += " First problems: " + "; ".join(self.examples) + "."
        return text


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _as_text(value: object) -> str:
    """A cell as a stripped string; None stays None-like ("")."""
    return "" if value is None else str(value).strip()


def _check_defaults(defaults: dict | None) -> dict:
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"defaults has unknown field(s) {unknown}; allowed: {list(OPTIONAL_FIELDS)}")
    return defaults


def check_row(
    fields: dict,
    *,
    base_dir: Path,
    default_id: str,
    vocab: set[str] | None,
    max_seconds: float | None,
    check_audio: bool,
) -> Utterance:
    """One row's fields (defaults already applied) as an Utterance, or RowProblem saying what is wrong.

    Relative audio paths resolve against `base_dir`. With `check_audio`, the file header is read and
    its duration replaces any `seconds` given; without it, `seconds` is trusted (0.0 = unknown, and
    `max_seconds` cannot be checked for such rows). Spaces are word boundaries and are not vocab-checked.
    """
    for name in REQUIRED_FIELDS:
        if name not in fields:
            raise RowProblem("missing_field", f"missing required field {name!r}")
    audio_value = _as_text(fields["audio"])
    if not audio_value:
        raise RowProblem("missing_field", "empty 'audio' field")
    audio_path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(audio_value)))
    where = f"audio={audio_value!r}"

    split = _as_text(fields.get("split")) or "train"
    if split not in SPLITS:
        raise RowProblem("bad_value", f"unknown split {split!r} (expected 'train' or 'test'); {where}")
    try:
        seconds = float(fields.get("seconds") or 0.0)
    except (TypeError, ValueError):
        raise RowProblem(
            "bad_value", f"seconds is not a number: {_short(fields.get('seconds'))}; {where}"
        ) from None
    if seconds < 0 or seconds != seconds:
        raise RowProblem("bad_value", f"seconds must be >= 0, got {fields.get('seconds')!r}; {where}")

    raw_text = "" if fields.get("text") is None else str(fields["text"])
    text = normalize_text(raw_text)
    if not text:
        raise RowProblem(
            "empty_text", f"empty transcript after normalisation (text={_short(raw_text)}); {where}"
        )
    if vocab is not None:
        outside = sorted(set(text) - set(vocab) - {" "})
        if outside:
            chars = ", ".join(repr(c) for c in outside)
            problem = f"characters not in the vocabulary: {chars} (text={_short(text)}); {where}"
            raise RowProblem("out_of_vocab", problem)

    if check_audio:
        try:
            seconds, _, _ = audio_info(audio_path)
        except AudioError as err:
            raise RowProblem(f"{err.reason}_audio", f"{err.problem}: {audio_path} ({where})") from None
    if max_seconds is not None and seconds > max_seconds:
        raise RowProblem(
            "too_long", f"clip is {seconds:.2f} s, longer than max_seconds={max_seconds:g}; {audio_path}"
        )

    return Utterance(
        id=_as_text(fields.get("id")) or default_id,
        audio=audio_path,
        text=text,
        site=_as_text(fields.get("site")),
        stage=_as_text(fields.get("stage")),
        split=split,
        speaker=_as_text(fields.get("speaker")),
        language=_as_text(fields.get("language")),
        seconds=float(seconds),
    )


def check_rows(
    rows: Iterable[tuple[int | str, dict | RowProblem]],
    *,
    source: str,
    base_dir: Path,
    id_prefix: str,
    vocab: set[str] | None = None,
    max_seconds: float | None = None,
    on_error: str = "raise",
    check_audio: bool = True,
    defaults: dict | None = None,
) -> tuple[list[Utterance], LoadSummary]:
    """Validate (row label, fields) pairs from any source into Utterances.

    The label is the 1-based line number for files (or e.g. "train:3" for a dataset split).

    A parser yields a RowProblem instead of fields for a row it could not parse. With
    on_error="raise" the first problem raises ManifestError naming `source` and the row; with
    "skip" it is counted in the summary. No usable row at all is always an error.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    defaults = _check_defaults(defaults)
    summary = LoadSummary(source=str(source))
    utterances: list[Utterance] = []
    seen_ids: dict[str, int | str] = {}
    for row_number, fields in rows:
        try:
            if isinstance(fields, RowProblem):
                raise fields
            # an empty cell takes the default; empty audio/text stay, so check_row can report them
            merged = dict(defaults)
            merged.update((k, v) for k, v in fields.items() if k in REQUIRED_FIELDS or _as_text(v) != "")
            utt = check_row(
                merged,
                base_dir=base_dir,
                default_id=f"{id_prefix}-{row_number}",
                vocab=vocab,
                max_seconds=max_seconds,
                check_audio=check_audio,
            )
            if utt.id in seen_ids:
                raise RowProblem("duplicate_id", f"id {utt.id!r} already used on row {seen_ids[utt.id]}")
        except RowProblem as problem:
            message = f"row {row_number}: {problem.message}"
            if on_error == "raise":
                raise ManifestError(f"{source}, {message}") from None
            summary.skipped[problem.reason] = summary.skipped.get(problem.reason, 0) + 1
            if len(summary.examples) < MAX_EXAMPLES:
                summary.examples.append(message)
            continue
        seen_ids[utt.id] = row_number
        utterances.append(utt)
    summary.kept = len(utterances)
    if not utterances:
        raise ManifestError(f"{source}: no usable rows. {summary.format()}")
    return utterances, summary


def _canonical(fields: dict) -> dict:
    """Rename aliased columns (audio_filepath -> audio, duration -> seconds).

    An alias is left alone when the real name is present.
    """
    out = dict(fields)
    for alias, name in FIELD_ALIASES.items():
        if alias in out and name not in out:
            out[name] = out.pop(alias)
    return out


def read_jsonl_rows(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    """(line number, fields) per non-blank line; a RowProblem for a line that is not a JSON object."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                hint = (
                    " (one JSON object per line, not a JSON array)" if line.lstrip().startswith("[") else ""
                )
                yield (
                    line_number,
                    RowProblem("bad_row", f"malformed JSON: {err.msg} at column {err.colno}{hint}"),
                )
                continue
            if not isinstance(value, dict):
                yield (
                    line_number,
                    RowProblem("bad_row", f"expected a JSON object, got {type(value).__name__}"),
                )
                continue
            yield line_number, _canonical(value)


def read_csv_rows(
    path: Path, required: Iterable[str] = REQUIRED_FIELDS
) -> Iterator[tuple[int, dict | RowProblem]]:
    """(line number, fields) per CSV record; the header must name the `required` columns."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        raw_header = [name.strip() for name in (reader.fieldnames or [])]
        # an alias column is renamed unless the real name is there too
        header = [
            FIELD_ALIASES.get(n, n) if FIELD_ALIASES.get(n) not in raw_header else n for n in raw_header
        ]
        if not header:
            raise ManifestError(f"{path}, row 1: empty CSV manifest (no header row)")
        missing = [name for name in required if name not in header]
        if missing:
            problem = f"missing required column(s) {missing}; columns are {header}"
            raise ManifestError(f"{path}, row 1 (header): {problem}")
        reader.fieldnames = header
        for record in reader:
            if None in record:  # more cells than header columns
                cells = len(header) + len(record[None])
                yield reader.line_num, RowProblem("bad_row", f"{cells} cells for {len(header)} columns")
                continue
            yield reader.line_num, {name: value for name, value in record.items() if value is not None}


def load_manifest(
    path: str | Path,
    *,
    vocab: set[str] | None = None,
    max_seconds: float | None = None,
    on_error: str = "raise",
    check_audio: bool = True,
    defaults: dict | None = None,
) -> tuple[list[Utterance], LoadSummary]:
    """Utterances from a JSONL (.jsonl/.json, one object per line) or CSV manifest, plus what was skipped.

    `defaults` fills optional fields a row leaves empty (e.g. {"site": "plant-a"}).
    Every bad row raises ManifestError (on_error="raise") or is counted and skipped ("skip").
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = read_jsonl_rows(path)
    elif suffix == ".csv":
        rows = read_csv_rows(path)
    else:
        raise ManifestError(f"{path}: unsupported manifest type {suffix!r} (use .jsonl, .json or .csv)")
    try:
        return check_rows(
            rows,
            source=str(path),
            base_dir=path.parent,
            id_prefix=path.stem,
            vocab=vocab,
            max_seconds=max_seconds,
            on_error=on_error,
            check_audio=check_audio,
            defaults=defaults,
        )
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err})") from None


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> Path:
    """Write utterances as JSONL, audio paths relative to the manifest's folder when inside it; atomic."""
    path = Path(path).expanduser().absolute()
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise ValueError(f"{path}: write_manifest writes JSONL; use a .jsonl or .json name")
    path.parent.mkdir(parents=True, exist_ok=True)
    root = str(path.parent) + os.sep
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for utt in utterances:
                row = utt.to_dict()
                audio = os.path.abspath(row["audio"])
                row["audio"] = os.path.relpath(audio, path.parent) if audio.startswith(root) else audio
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temp_name, path)
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
    return path
