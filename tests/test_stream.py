"""The site x stage stream: order, rehearsal-free access, shared test sets, foundation rows, errors."""

import json

import numpy as np
import pytest
import soundfile as sf

from cl_fed.data.manifest import ManifestError, write_manifest
from cl_fed.data.stream import StageStream, StreamError
from cl_fed.data.utterance import Utterance


def utt(uid, site, stage, split="train"):
    # the stream never opens audio, so a path is enough here; from_dataset_dir below uses real files
    return Utterance(id=uid, audio=f"/data/{uid}.flac", text="x", site=site, stage=stage, split=split)


def rows():
    """Two sites, stages s1 -> s2 -> s3 in first-appearance order; site b has nothing in s2."""
    return [
        utt("f1", "a", "foundation"),
        utt("f2", "", "foundation", "test"),
        utt("a1", "a", "s1"),
        utt("a2", "a", "s1"),
        utt("b1", "b", "s1"),
        utt("t1", "", "s1", "test"),
        utt("t1a", "a", "s1", "test"),
        utt("a3", "a", "s2"),
        utt("t2", "", "s2", "test"),
        utt("b3", "b", "s3"),
        utt("a4", "a", "s3"),
        utt("t3", "", "s3", "test"),
    ]


def ids(utterances):
    return [u.id for u in utterances]


def test_defaults_order_stages_by_appearance_and_sort_sites():
    stream = StageStream(rows())
    assert stream.stages == ["s1", "s2", "s3"] and stream.sites == ["a", "b"]
    assert [stream.num_train("a", s) for s in stream.stages] == [2, 1, 1]
    assert [stream.num_train("b", s) for s in range(3)] == [1, 0, 1]
    assert ids(stream.foundation("train")) == ["f1"] and ids(stream.foundation("test")) == ["f2"]
    with pytest.raises(StreamError, match="unknown split"):
        stream.foundation("dev")


def test_site_stream_is_rehearsal_free():
    stream = StageStream(rows())
    site_a = stream.site("a")
    assert ids(site_a.enter(0)) == ["a1", "a2"]
    assert ids(site_a.enter(0)) == ["a1", "a2"]  # several rounds within one stage
    assert ids(site_a.enter(1)) == ["a3"]
    with pytest.raises(StreamError, match=r"site 'a' is at stage 1 \('s2'\) and cannot go back to stage 0"):
        site_a.enter(0)
    assert "s1" not in site_a._train  # released, not just hidden
    site_b = stream.site("b")
    assert site_b.enter(1) == []  # no data for b in s2: it trains on nothing there
    assert ids(site_b.enter(2)) == ["b3"] and site_b.current == 2
    with pytest.raises(StreamError, match="out of range"):
        site_b.enter(3)
    with pytest.raises(StreamError, match="unknown site 'c'"):
        stream.site("c")


def test_test_sets_of_every_stage_stay_available():
    stream = StageStream(rows())
    stream.site("a").enter(2)
    assert ids(stream.test("s1")) == ["t1", "t1a"]
    assert ids(stream.test(0, site="a")) == ["t1a"]
    assert ids(stream.test("s3")) == ["t3"]
    with pytest.raises(StreamError, match="unknown stage 's9'"):
        stream.test("s9")


def test_explicit_order_and_subsets():
    stream = StageStream(rows(), stages=["s3", "s1"], sites=["b"])
    assert stream.stages == ["s3", "s1"] and stream.sites == ["b"]
    assert ids(stream.site("b").enter(0)) == ["b3"]
    with pytest.raises(StreamError, match="unknown site 'a'"):
        stream.num_train("a", "s1")


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (rows()[:-1], {}, r"stage\(s\) \['s3'\] have no test rows"),
        (rows(), {"sites": ["a", "c"]}, r"site\(s\) \['c'\] have no train rows in any stage"),
        (
            rows(),
            {"stages": ["s1", "s4"]},
            r"unknown stage\(s\) \['s4'\]; the data has stages \['s1', 's2', 's3'\]",
        ),
        (rows(), {"stages": ["foundation", "s1"]}, "'foundation' is pre-training data"),
        (rows(), {"stages": ["s1", "s1"]}, "list a stage twice"),
        (rows() + [utt("z", "a", "")], {}, r"1 row\(s\) have no stage \(first: 'z'\)"),
        (rows() + [utt("z", "", "s1")], {}, r"train rows without a site \(e.g. 'z'\)"),
        (rows()[:2], {}, "no rows outside the 'foundation' stage"),
    ],
)
def test_bad_streams_name_what_is_missing(data, kwargs, message):
    with pytest.raises(StreamError, match=message):
        StageStream(data, **kwargs)


def test_describe_tables_train_and_test_counts():
    table = StageStream(rows()).describe().splitlines()
    assert table[0].split() == ["site", "\\", "stage", "s1", "s2", "s3"]
    assert table[1].split() == ["a", "2", "1", "1"]
    assert table[2].split() == ["b", "1", "0", "1"]
    assert set(table[3]) == {"-"}
    assert table[4].split() == ["test", "(all)", "2", "1", "1"]
    assert table[5] == "foundation: 1 train, 1 test rows"


def make_dataset_dir(root, summary):
    """A small generated-style dataset: FLAC clips, manifest.jsonl with relative paths, summary.json."""
    t = np.arange(4000) / 16000
    records = []
    plan = [("foundation", "", "train"), ("foundation", "", "test")]
    plan += [(stage, site, "train") for stage in ("s1", "s2") for site in ("north", "south")]
    plan += [("s1", "", "test"), ("s2", "north", "test")]
    for i, (stage, site, split) in enumerate(plan):
        path = root / "audio" / f"{i}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
        records.append(Utterance(f"u{i}", str(path), f"word {i}", site, stage, split, seconds=0.25))
    write_manifest(records, root / "manifest.jsonl")
    (root / "summary.json").write_text(json.dumps(summary))
    return records


def test_from_dataset_dir_reads_order_from_summary(tmp_path):
    records = make_dataset_dir(tmp_path, {"stages": ["foundation", "s2", "s1"], "sites": ["south", "north"]})
    assert json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[0])["audio"] == "audio/0.flac"
    stream = StageStream.from_dataset_dir(tmp_path, vocab=set("word 0123456789"))
    assert stream.stages == ["s2", "s1"] and stream.sites == ["south", "north"]
    assert ids(stream.foundation("train")) == ["u0"] and ids(stream.test("s2")) == ["u7"]
    assert stream.site("north").enter(1) == [records[2]]
    assert stream.load_summary.kept == len(records)

    by_manifest = StageStream.from_manifest(tmp_path / "manifest.jsonl", stages=["s1", "s2"])
    assert by_manifest.stages == ["s1", "s2"] and by_manifest.sites == ["north", "south"]
    with pytest.raises(ManifestError, match="characters not in the vocabulary: '1'"):
        StageStream.from_dataset_dir(tmp_path, vocab=set("word 0"))


def test_from_dataset_dir_errors(tmp_path):
    with pytest.raises(StreamError, match="summary.json: not found"):
        StageStream.from_dataset_dir(tmp_path)
    make_dataset_dir(tmp_path, {"stages": ["s1", "s2"]})
    with pytest.raises(StreamError, match="needs a non-empty list 'sites'"):
        StageStream.from_dataset_dir(tmp_path)
    (tmp_path / "summary.json").write_text('{"stages": ["s1", "s2"], "sites": ["north", "east"]}')
    with pytest.raises(StreamError, match=r"site\(s\) \['east'\] have no train rows"):
        StageStream.from_dataset_dir(tmp_path)
