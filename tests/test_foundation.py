"""The cached foundation base on the tiny scenario, with a small step budget."""

import json
import time

import pytest

from cl_fed.data.scenario import load_scenario
from cl_fed.models import load_model
from cl_fed.models.foundation import INFO_FILE, foundation_base, foundation_key
from cl_fed.models.tiny import TinyFastConformer
from cl_fed.train import TrainConfig

BUDGET = TrainConfig(max_steps=25, batch_size=8, lr=3e-3, warmup=0.2, schedule="constant")


def test_foundation_base_trains_caches_and_reloads(tmp_path):
    path = foundation_base("tiny", cache_dir=tmp_path, progress=False, train_config=BUDGET)
    assert path.parent == tmp_path / "bases"
    info = json.loads((path / INFO_FILE).read_text())
    assert info["key"] == foundation_key(load_scenario("tiny"), BUDGET, 0)
    assert path.name == info["key"][:16]
    assert info["steps"] == 25 and info["train_utterances"] == 40 and info["test_utterances"] == 8
    assert info["final_train_loss"] < 0.7 * info["first_train_loss"]  # it learned something
    assert 0.0 <= info["cer"] <= 100.0 and info["wall_seconds"] > 0
    assert not list((tmp_path / "bases").glob(".tmp-*"))  # nothing half-written left behind

    speech = load_model(path)
    assert isinstance(speech, TinyFastConformer)

    weights = path / "model.safetensors"
    written = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = foundation_base("tiny", cache_dir=tmp_path, progress=False, train_config=BUDGET)
    assert again == path and time.perf_counter() - start < 5.0
    assert weights.stat().st_mtime_ns == written  # reused, not retrained


def test_key_depends_on_everything_that_shapes_the_base():
    scenario = load_scenario("tiny")
    key = foundation_key(scenario, BUDGET, 0)
    assert foundation_key(scenario, BUDGET, 0) == key
    assert foundation_key(scenario, BUDGET, 1) != key
    assert (
        foundation_key(
            scenario, TrainConfig(max_steps=26, batch_size=8, lr=3e-3, warmup=0.2, schedule="constant"), 0
        )
        != key
    )
    assert foundation_key(load_scenario("default"), BUDGET, 0) != key
    # the progress bar does not change the weights, so it does not change the key
    assert foundation_key(scenario, TrainConfig(**{**BUDGET.__dict__, "progress": False}), 0) == key


def test_scenario_without_foundation_data_is_rejected(tmp_path):
    text = (
        "name: nofoundation\nsites: [a]\nstages:\n  - name: s1\n    test_utterances: 1\n"
        "    conditions: {train_utterances: 1}\n"
    )
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(ValueError, match="foundation needs train and test utterances"):
        foundation_base(tmp_path / "s.yaml", cache_dir=tmp_path, progress=False, train_config=BUDGET)
