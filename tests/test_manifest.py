"""Manifest loading: JSONL and CSV, path resolution, every bad-input case, skip mode, atomic writing."""

import csv
import json
import os
import time

import numpy as np
import pytest
import soundfile as sf

from cl_fed.data.manifest import LoadSummary, ManifestError, load_manifest, write_manifest
from cl_fed.data.utterance import Utterance

VOCAB = set("abcdefghijklmnopqrstuvwxyz'")


def write_tone(path, seconds=0.25, rate=16000, freq=330.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def clips(tmp_path):
    write_tone(tmp_path / "clips" / "a.flac", 0.25)
    write_tone(tmp_path / "clips" / "b.flac", 0.5)
    write_tone(tmp_path / "clips" / "c.wav", 0.75)
    return tmp_path


GOOD_ROWS = [
    {"audio": "clips/a.flac", "text": "Hello, World!", "speaker": "s1", "site": "plant-a", "stage": "s1"},
    {"audio": "clips/b.flac", "text": "don't stop", "split": "test", "id": "u-b", "language": "en"},
]


def test_jsonl_rows_are_normalised_resolved_and_measured(clips):
    path = write_jsonl(clips / "m.jsonl", [GOOD_ROWS[0], "", GOOD_ROWS[1]])
    utts, summary = load_manifest(path)
    assert utts[0] == Utterance(
        id="m-1",  # default id: manifest stem + line number
        audio=str(clips / "clips" / "a.flac"),
        text="hello world",
        site="plant-a",
        stage="s1",
        split="train",
        speaker="s1",
        seconds=0.25,
    )
    assert (utts[1].id, utts[1].split, utts[1].language, utts[1].text) == ("u-b", "test", "en", "don't stop")
    assert utts[1].seconds == pytest.approx(0.5)
    assert (summary.kept, summary.skipped) == (2, {})
    assert summary.format() == f"Loaded 2 of 2 rows from {path}."


def test_csv_manifest_matches_jsonl(clips):
    jsonl = write_jsonl(clips / "m.jsonl", GOOD_ROWS)
    csv_path = clips / "m.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["id", "audio", "text", "speaker", "site", "stage", "split", "language"])
        writer.writeheader()
        for row in GOOD_ROWS:
            writer.writerow(row)
    from_csv, _ = load_manifest(csv_path)
    from_jsonl, _ = load_manifest(jsonl)
    assert from_csv[1] == from_jsonl[1]
    assert from_csv[0].id == "m-2"  # line 2: the header is line 1
    assert from_csv[0].text == from_jsonl[0].text and from_csv[0].audio == from_jsonl[0].audio


def test_nemo_fields_absolute_paths_and_defaults(clips):
    row = {"audio_filepath": str(clips / "clips" / "c.wav"), "duration": 0.75, "text": "yes"}
    (clips / "sub").mkdir()
    path = write_jsonl(clips / "sub" / "nemo.json", [row])  # absolute audio path, in another folder
    utts, _ = load_manifest(path, defaults={"site": "plant-b", "stage": "s2", "split": "test"})
    assert (utts[0].audio, utts[0].site, utts[0].stage, utts[0].split) == (
        str(clips / "clips" / "c.wav"),
        "plant-b",
        "s2",
        "test",
    )
    with pytest.raises(ValueError, match="unknown field"):
        load_manifest(path, defaults={"txt": "x"})


def _bad_cases(root):
    """(manifest file name, rows, expected words in the message); each manifest has one bad row on line 2."""
    (root / "clips" / "random.wav").write_bytes(np.random.default_rng(1).bytes(4000))
    full = write_tone(root / "clips" / "full.wav", 1.0)
    (root / "clips" / "truncated.wav").write_bytes(full.read_bytes()[:9000])
    sf.write(root / "clips" / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    good = {"audio": "clips/a.flac", "text": "fine"}
    return {
        "missing_audio": ([good, {"audio": "clips/nope.flac", "text": "x"}], ["nope.flac", "not found"]),
        "corrupt_audio": ([good, {"audio": "clips/random.wav", "text": "x"}], ["random.wav", "corrupt"]),
        "truncated_audio": (
            [good, {"audio": "clips/truncated.wav", "text": "x"}],
            ["truncated.wav", "truncated"],
        ),
        "empty_audio": ([good, {"audio": "clips/zero.wav", "text": "x"}], ["zero.wav", "zero-length"]),
        "empty_text": ([good, {"audio": "clips/b.flac", "text": " ?! "}], ["empty transcript", "b.flac"]),
        "out_of_vocab": ([good, {"audio": "clips/b.flac", "text": "naïve straße"}], ["'ß'", "'ï'", "b.flac"]),
        "too_long": (
            [good, {"audio": "clips/c.wav", "text": "long"}],
            ["0.75 s", "max_seconds=0.6", "c.wav"],
        ),
        "bad_json": ([good, '{"audio": "clips/b.flac", "text": }'], ["malformed JSON"]),
        "missing_text": ([good, {"audio": "clips/b.flac"}], ["missing required field 'text'"]),
        "bad_split": (
            [good, {"audio": "clips/b.flac", "text": "x", "split": "dev"}],
            ["split 'dev'", "b.flac"],
        ),
        "duplicate_id": (
            [{**good, "id": "x"}, {"audio": "clips/b.flac", "text": "y", "id": "x"}],
            ["id 'x'", "row 1"],
        ),
    }


def test_every_bad_row_raises_naming_manifest_row_and_value(clips):
    for name, (rows, words) in _bad_cases(clips).items():
        path = write_jsonl(clips / f"{name}.jsonl", rows)
        with pytest.raises(ManifestError) as caught:
            load_manifest(path, vocab=VOCAB, max_seconds=0.6)
        message = str(caught.value)
        assert str(path) in message and "row 2" in message, (name, message)
        for word in words:
            assert word in message, (name, word, message)


def test_csv_header_without_text_column_is_an_error(clips):
    path = clips / "m.csv"
    path.write_text("audio,transcript\nclips/a.flac,hello\n", encoding="utf-8")
    with pytest.raises(
        ManifestError, match=r"row 1 \(header\): missing required column\(s\) \['text'\]"
    ) as caught:
        load_manifest(path, on_error="skip")
    assert str(path) in str(caught.value)


def test_skip_mode_counts_each_reason_and_keeps_good_rows(clips):
    cases = _bad_cases(clips)
    rows = [{"audio": "clips/a.flac", "text": "first", "id": "keep-1"}]
    for name in sorted(cases):
        if name != "duplicate_id":
            rows.append(cases[name][0][1])
    rows.append({"audio": "clips/b.flac", "text": "second", "id": "keep-2"})
    rows.append({"audio": "clips/b.flac", "text": "x", "id": "keep-1"})  # duplicate id
    path = write_jsonl(clips / "mixed.jsonl", rows)
    utts, summary = load_manifest(path, vocab=VOCAB, max_seconds=0.6, on_error="skip")
    assert [u.id for u in utts] == ["keep-1", "keep-2"]
    assert summary.kept == 2
    assert summary.skipped == {
        "bad_row": 1,
        "bad_value": 1,
        "corrupt_audio": 2,  # random bytes and the truncated WAV
        "duplicate_id": 1,
        "empty_audio": 1,
        "empty_text": 1,
        "missing_audio": 1,
        "missing_field": 1,
        "out_of_vocab": 1,
        "too_long": 1,
    }
    assert len(summary.examples) == 5 and summary.examples[0].startswith("row 2: ")
    text = summary.format()
    assert text.startswith(
        f"Loaded 2 of 13 rows from {path}; skipped 11 (bad_row 1, bad_value 1, corrupt_audio 2"
    )


def test_no_usable_row_is_an_error_even_when_skipping(clips):
    path = write_jsonl(clips / "allbad.jsonl", [{"audio": "clips/nope.wav", "text": "x"}, "not json"])
    with pytest.raises(ManifestError, match="no usable rows") as caught:
        load_manifest(path, on_error="skip")
    assert str(path) in str(caught.value) and "missing_audio 1" in str(caught.value)


def test_file_level_errors(clips):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(clips / "absent.jsonl")
    (clips / "m.txt").write_text("x\n")
    with pytest.raises(ManifestError, match="unsupported manifest type '.txt'"):
        load_manifest(clips / "m.txt")
    path = write_jsonl(clips / "m.jsonl", GOOD_ROWS)
    with pytest.raises(ValueError, match="on_error"):
        load_manifest(path, on_error="ignore")
    (clips / "latin1.jsonl").write_bytes('{"audio": "clips/a.flac", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(clips / "latin1.jsonl")


def test_without_audio_checks_files_are_not_opened(clips):
    path = write_jsonl(clips / "m.jsonl", [{"audio": "later/x.wav", "text": "x", "seconds": 12.5}])
    utts, _ = load_manifest(path, check_audio=False)
    assert utts[0].seconds == 12.5 and utts[0].audio == str(clips / "later" / "x.wav")
    with pytest.raises(ManifestError, match="12.50 s, longer than max_seconds=10"):
        load_manifest(path, check_audio=False, max_seconds=10)


def test_write_manifest_round_trips_with_relative_paths_and_no_temp_files(clips, tmp_path_factory):
    outside = write_tone(tmp_path_factory.mktemp("elsewhere") / "o.flac", 0.5)
    utts, _ = load_manifest(write_jsonl(clips / "m.jsonl", GOOD_ROWS))
    utts.append(Utterance(id="o", audio=str(outside), text="outside", site="x", stage="s1", seconds=0.5))
    target = clips / "out.jsonl"
    target.write_text("old content\n")
    assert write_manifest(utts, target) == target
    stored = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["audio"] for row in stored] == ["clips/a.flac", "clips/b.flac", str(outside)]
    assert sorted(os.listdir(clips)) == ["clips", "m.jsonl", "out.jsonl"]
    reloaded, _ = load_manifest(target)
    assert reloaded == utts
    with pytest.raises(ValueError, match="JSONL"):
        write_manifest(utts, clips / "out.csv")


def test_many_rows_load_quickly(tmp_path):
    for i in range(20):
        write_tone(tmp_path / "c" / f"{i}.flac", 0.1 + 0.01 * i)
    rows = [{"audio": f"c/{i % 20}.flac", "text": f"row {i}", "id": str(i)} for i in range(1000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    start = time.perf_counter()
    utts, summary = load_manifest(path, vocab=set("row 0123456789"))
    elapsed = time.perf_counter() - start
    assert summary.kept == 1000 and utts[999].seconds == pytest.approx(0.29)
    assert elapsed < 10.0, f"1000 rows took {elapsed:.1f} s"
    assert isinstance(summary, LoadSummary)
