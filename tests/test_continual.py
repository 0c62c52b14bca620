"""Shared loop pieces: user manifests as a run's data (bad rows raise or are skipped and counted)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from cl_fed.config import make_config
from cl_fed.continual import prepare_data, state_checksum


def _manifest(tmp_path):
    rows = []
    for i, (stage, split, site) in enumerate(
        [
            ("s1", "train", "a"),
            ("s1", "test", "a"),
            ("s2", "train", "a"),
            ("s2", "test", "a"),
            ("s2", "train", "b"),
            ("s1", "train", "b"),
        ]
    ):
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, 0.1 * np.sin(np.linspace(0, 400, 8000)).astype("float32"), 16000)
        rows.append(
            {"audio": path.name, "text": f"stop the press {i}", "stage": stage, "split": split, "site": site}
        )
    rows.append({"audio": "missing.wav", "text": "gone", "stage": "s1", "split": "train", "site": "a"})
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_manifest_bad_rows_raise_naming_row_or_are_skipped_and_reported(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    with pytest.raises(ValueError, match=r"missing\.wav") as err:
        prepare_data(make_config({"scenario": str(manifest)}))
    assert "data.jsonl" in str(err.value) and "7" in str(err.value)  # the manifest and the row
    scenario, stream = prepare_data(make_config({"scenario": str(manifest), "bad-rows": "skip"}))
    assert scenario is None and stream.stages == ["s1", "s2"] and stream.sites == ["a", "b"]
    assert stream.num_train("a", "s1") == 1 and stream.num_train("b", "s2") == 1
    assert "skipped" in capsys.readouterr().out


def test_checksum_sees_every_byte_and_name():
    state = {"w": torch.zeros(3), "n": torch.tensor(5)}
    same = {"n": torch.tensor(5), "w": torch.zeros(3)}
    assert state_checksum(state) == state_checksum(same)
    assert state_checksum(state) != state_checksum(
        {"w": torch.tensor([0.0, 0.0, 1e-30]), "n": torch.tensor(5)}
    )
    assert state_checksum(state) != state_checksum({"v": torch.zeros(3), "n": torch.tensor(5)})


def test_whisper_keys_on_another_model_are_an_error_naming_them():
    from cl_fed.continual import with_model_options
    from cl_fed.models.tiny import build_tiny

    tiny = build_tiny(seed=0)
    assert with_model_options(make_config(), tiny) is tiny  # the defaults pass
    for key, value in (("language", "de"), ("task", "translate"), ("whisper-window", 8.0)):
        with pytest.raises(ValueError, match=rf"{key}=.*Whisper keys.*ctc model"):
            with_model_options(make_config({key: value}), tiny)
    with pytest.raises(ValueError, match="whisper-window=40"):
        make_config({"whisper-window": 40})
    with pytest.raises(ValueError, match="task='summarise'"):
        make_config({"task": "summarise"})
