"""Dataset generation: layout, manifest content, determinism over worker counts, cache reuse,
invalidation and atomic writes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import yaml

from cl_fed.data import synth
from cl_fed.data.scenario import load_scenario, parse_scenario
from cl_fed.data.text import CODE_SWITCHED
from cl_fed.textnorm import normalize_text

MICRO = {
    "name": "micro",
    "sites": ["site-a"],
    "stages": [
        {
            "name": "only",
            "test_utterances": 1,
            "conditions": {"train_utterances": 2, "languages": ["fr", "es-en"]},
        }
    ],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return synth.generate("tiny", cache_dir=tmp_path_factory.mktemp("cache"), workers=1, progress=False)


def manifest(dataset: Path) -> list[dict]:
    return [
        json.loads(line) for line in (dataset / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    ]


def test_layout_and_manifest_records(tiny_dir):
    scenario = load_scenario("tiny")
    assert tiny_dir.name == scenario.fingerprint()[:16] and tiny_dir.parent.name == "speech"
    records = manifest(tiny_dir)
    assert len(records) == 8 + 2 * 2 * 8 + 2 * 6  # foundation test rows, stage train rows, stage test rows
    assert len({r["id"] for r in records}) == len(records)
    assert sorted(p.name for p in (tiny_dir / "audio").iterdir()) == sorted(
        f"{r['id']}.flac" for r in records
    )
    for r in records:
        assert set(r) == {"id", "audio", "text", "site", "stage", "split", "speaker", "language", "seconds"}
        assert r["audio"] == f"audio/{r['id']}.flac"
        assert r["text"] and normalize_text(r["text"]) == r["text"]
        info = sf.info(tiny_dir / r["audio"])
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert r["seconds"] == pytest.approx(info.frames / 16000, abs=1e-4)
        assert 0.3 < r["seconds"] <= scenario.max_seconds


def test_splits_stages_sites_and_languages_follow_the_scenario(tiny_dir):
    scenario = load_scenario("tiny")
    records = manifest(tiny_dir)
    foundation = [r for r in records if r["stage"] == "foundation"]
    # the foundation's train rows pre-train the base from its own dataset, not from the scenario's
    assert sorted({(r["split"], r["site"]) for r in foundation}) == [("test", "")]
    assert sum(r["split"] == "test" for r in foundation) == 8
    for stage in scenario.stages:
        for site, conditions in stage.sites.items():
            train = [r for r in records if (r["stage"], r["site"], r["split"]) == (stage.name, site, "train")]
            assert len(train) == conditions.train_utterances
            assert {r["language"] for r in train} <= set(conditions.languages)
        test = [r for r in records if (r["stage"], r["split"]) == (stage.name, "test")]
        assert [r["site"] for r in test] == [scenario.sites[i % 2] for i in range(stage.test_utterances)]
    switched = [r for r in records if r["language"] in CODE_SWITCHED]
    assert switched and all(r["stage"] == "de-codeswitch" for r in switched)


def test_audio_is_speech_not_silence(tiny_dir):
    for r in manifest(tiny_dir)[:10]:
        wave, _ = sf.read(tiny_dir / r["audio"], dtype="float32")
        assert 0.01 < abs(wave).max() <= 1.0
        assert (wave**2).mean() > 1e-5


def test_summary_counts_match_the_manifest(tiny_dir):
    summary = json.loads((tiny_dir / "summary.json").read_text())
    records = manifest(tiny_dir)
    assert summary["name"] == "tiny" and summary["fingerprint"] == load_scenario("tiny").fingerprint()
    assert summary["stages"] == ["en-welding", "de-codeswitch"] and summary["sites"] == [
        "factory-a",
        "factory-b",
    ]
    assert summary["total_utterances"] == len(records)
    cell = summary["counts"]["train"]["en-welding"]["factory-b"]
    chosen = [
        r for r in records if (r["split"], r["stage"], r["site"]) == ("train", "en-welding", "factory-b")
    ]
    assert cell["utterances"] == len(chosen)
    assert cell["seconds"] == pytest.approx(sum(r["seconds"] for r in chosen), abs=1e-3)
    assert summary["counts"]["test"]["foundation"][""]["utterances"] == 8


def test_second_call_reuses_the_dataset_at_once(tiny_dir):
    before = {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*")}
    start = time.perf_counter()
    again = synth.generate("tiny", cache_dir=tiny_dir.parent.parent, progress=False)
    assert again == tiny_dir
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in tiny_dir.rglob("*")} == before


def test_same_scenario_is_byte_identical_with_two_workers(tiny_dir, tmp_path):
    other = synth.generate("tiny", cache_dir=tmp_path, workers=2, progress=False)
    assert other.name == tiny_dir.name
    assert (other / "manifest.jsonl").read_bytes() == (tiny_dir / "manifest.jsonl").read_bytes()
    for record in manifest(tiny_dir):
        assert (other / record["audio"]).read_bytes() == (tiny_dir / record["audio"]).read_bytes(), record[
            "id"
        ]


def test_changed_scenario_gets_a_new_directory(tmp_path):
    first = synth.generate(parse_scenario(MICRO), cache_dir=tmp_path, progress=False)
    changed = dict(MICRO, seed=1)
    second = synth.generate(parse_scenario(changed), cache_dir=tmp_path, progress=False)
    assert first != second and first.is_dir() and second.is_dir()
    assert manifest(first) != manifest(second)


def test_leftover_temp_dir_is_not_taken_as_the_dataset(tmp_path):
    scenario = parse_scenario(MICRO)
    prefix = scenario.fingerprint()[:16]
    leftover = tmp_path / "speech" / f".tmp-{prefix}-interrupted"
    (leftover / "audio").mkdir(parents=True)
    (leftover / "manifest.jsonl").write_text('{"id": "half"}\n')
    path = synth.generate(scenario, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "speech" / prefix
    assert len(manifest(path)) == 3 and (path / "summary.json").is_file()
    assert not leftover.exists()  # cleaned up under the lock


def test_killed_generation_leaves_no_dataset(tmp_path):
    big = dict(MICRO, stages=[dict(MICRO["stages"][0], conditions={"train_utterances": 400})])
    scenario_file = tmp_path / "big.yaml"
    scenario_file.write_text(yaml.safe_dump(big))
    code = (
        f"from cl_fed.data.synth import generate; "
        f"generate({str(scenario_file)!r}, cache_dir={str(tmp_path)!r}, workers=1, progress=False)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    speech = tmp_path / "speech"
    try:
        deadline = time.monotonic() + 60
        while not any(len(list(d.glob("audio/*.flac"))) >= 5 for d in speech.glob(".tmp-*")):
            assert child.poll() is None, "generation ended before it could be interrupted"
            assert time.monotonic() < deadline, "generation did not start within 60 s"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    prefix = load_scenario(scenario_file).fingerprint()[:16]
    assert not (speech / prefix).exists()
    assert [d.name for d in speech.iterdir() if not d.name.endswith(".lock")][0].startswith(f".tmp-{prefix}-")


def test_describe_and_command_line(tiny_dir, capsys):
    text = synth.describe(tiny_dir)
    for word in (
        "tiny",
        "factory-a",
        "factory-b",
        "foundation",
        "en-welding",
        "de-codeswitch",
        "train",
        "test",
    ):
        assert word in text
    assert "8 / 0.0" in text  # 8 utterances per site and stage
    synth.main(["--scenario", "tiny", "--cache-dir", str(tiny_dir.parent.parent), "--no-progress"])
    out = capsys.readouterr().out
    assert f"dataset: {tiny_dir}" in out and "factory-b" in out


def test_utterance_seed_depends_on_every_part():
    seeds = {
        synth.utterance_seed(0, "s", "a", "train", 0),
        synth.utterance_seed(1, "s", "a", "train", 0),
        synth.utterance_seed(0, "t", "a", "train", 0),
        synth.utterance_seed(0, "s", "b", "train", 0),
        synth.utterance_seed(0, "s", "a", "test", 0),
        synth.utterance_seed(0, "s", "a", "train", 1),
    }
    assert len(seeds) == 6
