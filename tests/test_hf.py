"""Hugging Face datasets: save_to_disk folders and audiofolders, read offline without torchcodec."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Audio, Dataset, DatasetDict

from cl_fed.data.audio import load_audio
from cl_fed.data.hf import load_hf_dataset, read_hf_dataset
from cl_fed.data.manifest import ManifestError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_tone(path, seconds=0.25, freq=330.0, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


def audio_dataset(audio_cells: list[dict], **columns) -> Dataset:
    """A Dataset with an Audio column, built without encoding (which would need torchcodec)."""
    return Dataset.from_dict({"audio": audio_cells, **columns}).cast_column("audio", Audio())


def test_saved_dataset_maps_columns_and_caches_embedded_audio(tmp_path):
    clips = [write_tone(tmp_path / "src" / f"{i}.flac", 0.25 * (i + 1), 200.0 * (i + 1)) for i in range(3)]
    dataset = audio_dataset(
        [{"bytes": None, "path": str(p)} for p in clips],
        sentence=["Good morning!", "Line two", "THREE"],
        plant=["a", "b", "a"],
        chunk=["s1", "s1", "s2"],
        spk=["x", "y", "x"],
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    utts = load_hf_dataset(
        tmp_path / "saved",
        text_column="sentence",
        site_column="plant",
        stage_column="chunk",
        speaker_column="spk",
        cache_dir=tmp_path / "cache",
    )
    assert [u.text for u in utts] == ["good morning", "line two", "three"]
    assert [(u.site, u.stage, u.speaker, u.split) for u in utts] == [
        ("a", "s1", "x", "train"),
        ("b", "s1", "y", "train"),
        ("a", "s2", "x", "train"),
    ]
    assert [u.id for u in utts] == ["row-1", "row-2", "row-3"]
    assert [u.seconds for u in utts] == [0.25, 0.5, 0.75]
    # save_to_disk embeds the bytes and keeps only a base name, so the clips come from the cache
    assert all(u.audio.startswith(str(tmp_path / "cache")) for u in utts)
    assert [torch.equal(load_audio(u.audio), load_audio(p)) for u, p in zip(utts, clips)] == [True] * 3


def test_plain_path_column_uses_files_in_place(tmp_path):
    clip = write_tone(tmp_path / "src" / "x.flac")
    Dataset.from_dict({"path": [str(clip), "src/x.flac"], "text": ["absolute", "relative"]}).save_to_disk(
        str(tmp_path / "saved")
    )
    (tmp_path / "saved" / "src").mkdir()
    write_tone(tmp_path / "saved" / "src" / "x.flac")
    utts = load_hf_dataset(tmp_path / "saved", audio_column="path", cache_dir=tmp_path / "cache")
    assert [u.audio for u in utts] == [str(clip), str(tmp_path / "saved" / "src" / "x.flac")]
    assert not (tmp_path / "cache").exists()


def test_dataset_dict_with_embedded_bytes_is_cached_by_content(tmp_path):
    sources = [write_tone(tmp_path / "gone" / f"{i}.wav", 0.5, 300.0 + 100 * i) for i in range(2)]
    cells = [{"bytes": p.read_bytes(), "path": p.name} for p in sources]
    originals = [load_audio(p) for p in sources]
    train = audio_dataset(cells, text=["one", "two"])
    test = audio_dataset(cells[:1], text=["one again"])
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    for p in sources:
        p.unlink()

    utts, summary = read_hf_dataset(tmp_path / "dd", cache_dir=tmp_path / "cache")
    assert summary.kept == 3
    assert [(u.id, u.split, u.text) for u in utts] == [
        ("train-1", "train", "one"),
        ("train-2", "train", "two"),
        ("test-1", "test", "one again"),
    ]
    assert utts[0].audio == utts[2].audio  # same bytes -> same cache file
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".wav", ".wav"]
    for utt, original in zip(utts, originals + originals[:1]):
        assert torch.equal(load_audio(utt.audio), original)

    test_only = load_hf_dataset(tmp_path / "dd", split="test", cache_dir=tmp_path / "cache")
    assert [u.text for u in test_only] == ["one again"]
    with pytest.raises(ManifestError, match=r"no split 'dev'; splits are \['train', 'test'\]"):
        load_hf_dataset(tmp_path / "dd", split="dev", cache_dir=tmp_path / "cache")


def test_validation_split_must_be_mapped_and_columns_must_exist(tmp_path):
    clip = write_tone(tmp_path / "c.flac")
    DatasetDict(
        {"validation": audio_dataset([{"bytes": None, "path": str(clip)}], text=["hi"])}
    ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ManifestError, match=r"row validation:1: unknown split 'validation'"):
        load_hf_dataset(tmp_path / "dd", cache_dir=tmp_path / "cache")
    utts = load_hf_dataset(tmp_path / "dd", defaults={"split": "test"}, cache_dir=tmp_path / "cache")
    assert [(u.split, u.text, u.seconds) for u in utts] == [("test", "hi", 0.25)]
    with pytest.raises(ManifestError, match=r"column\(s\) \['plant'\] not found"):
        load_hf_dataset(tmp_path / "dd", site_column="plant", cache_dir=tmp_path / "cache")


def test_saved_rows_share_the_manifest_checks(tmp_path):
    good = write_tone(tmp_path / "good.flac")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(np.random.default_rng(3).bytes(2000))
    dataset = audio_dataset(
        [{"bytes": None, "path": str(p)} for p in (good, broken, good)],
        text=["fine", "fine too", "naïve"],
    )
    dataset.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ManifestError) as caught:
        load_hf_dataset(
            tmp_path / "saved", vocab=set("abcdefghijklmnopqrstuvwxyz"), cache_dir=tmp_path / "cache"
        )
    assert str(tmp_path / "saved") in str(caught.value) and "row 2:" in str(caught.value)
    utts, summary = read_hf_dataset(
        tmp_path / "saved",
        vocab=set("abcdefghijklmnopqrstuvwxyz"),
        on_error="skip",
        cache_dir=tmp_path / "cache",
    )
    assert [u.text for u in utts] == ["fine"]
    assert summary.skipped == {"corrupt_audio": 1, "out_of_vocab": 1}


def test_audiofolder_with_metadata_csv(tmp_path):
    folder = tmp_path / "af"
    for name in ("a.flac", "sub/b.wav"):
        write_tone(folder / name, 0.5)
    (folder / "metadata.csv").write_text(
        "file_name,transcription,speaker,site\n"
        "a.flac,Hello there!,007,plant-a\n"
        "sub/b.wav,good day,008,plant-b\n",
        encoding="utf-8",
    )
    utts = load_hf_dataset(
        folder,
        text_column="transcription",
        speaker_column="speaker",
        site_column="site",
        cache_dir=tmp_path / "c",
    )
    assert [(u.id, u.text, u.speaker, u.site, u.split) for u in utts] == [
        ("a", "hello there", "007", "plant-a", "train"),
        ("sub/b", "good day", "008", "plant-b", "train"),
    ]
    assert utts[1].audio == str(folder / "sub" / "b.wav") and utts[1].seconds == 0.5


def test_audiofolder_with_split_folders_and_jsonl_metadata(tmp_path):
    folder = tmp_path / "af"
    for split, texts in (("train", ["one", "two"]), ("test", ["three"])):
        rows = []
        for i, text in enumerate(texts):
            write_tone(folder / split / f"{i}.flac", 0.25)
            rows.append(json.dumps({"file_name": f"{i}.flac", "text": text, "stage": "s1"}))
        rows.append(json.dumps({"file_name": "missing.flac", "text": "lost", "stage": "s1"}))
        (folder / split / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        load_hf_dataset(folder, stage_column="stage", cache_dir=tmp_path / "c")
    message = str(caught.value)
    assert "metadata.jsonl:3" in message and "missing.flac" in message and "not found" in message
    utts, summary = read_hf_dataset(folder, stage_column="stage", on_error="skip", cache_dir=tmp_path / "c")
    assert sorted((u.split, u.id, u.text, u.stage) for u in utts) == [
        ("test", "test/0", "three", "s1"),
        ("train", "train/0", "one", "s1"),
        ("train", "train/1", "two", "s1"),
    ]
    assert summary.skipped == {"missing_audio": 2}


def test_folder_errors(tmp_path):
    with pytest.raises(ManifestError, match="dataset folder not found"):
        load_hf_dataset(tmp_path / "absent", cache_dir=tmp_path / "c")
    write_tone(tmp_path / "bare" / "x.flac")
    with pytest.raises(ManifestError, match="no transcripts"):
        load_hf_dataset(tmp_path / "bare", cache_dir=tmp_path / "c")
