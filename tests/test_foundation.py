"""The cached foundation base on the tiny scenario, with a small step budget."""

import json
import time

import pytest

from cl_fed.data.scenario import load_scenario
from cl_fed.models import foundation, load_model
from cl_fed.models.foundation import COMMITTED, FOUNDATION_TRAIN, INFO_FILE, foundation_base, foundation_key
from cl_fed.models.tiny import TinyFastConformer
from cl_fed.paths import project_root
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


def test_scenarios_with_one_foundation_share_one_base():
    default, second = load_scenario("default"), load_scenario("paint-and-food")
    assert foundation_key(default, BUDGET) == foundation_key(second, BUDGET)  # stages and sites differ
    assert foundation_key(default, BUDGET) == foundation_key(default, BUDGET, default.seed)
    assert foundation_key(default, BUDGET) != foundation_key(load_scenario("new-languages"), BUDGET)


def test_the_committed_default_base_is_the_recipe_and_used_without_training(tmp_path):
    scenario = load_scenario("default")
    key = foundation_key(scenario, FOUNDATION_TRAIN)
    path = foundation_base(scenario, cache_dir=tmp_path, progress=False)
    assert path == COMMITTED / key[:16]  # shipped, so nothing was generated or trained
    assert not list(tmp_path.iterdir())
    info = json.loads((path / INFO_FILE).read_text())
    assert info["key"] == key and info["test_utterances"] == 200 and info["train_utterances"] == 4800
    assert info["wer"] <= 15.0  # what issue 11 asks of the base
    assert isinstance(load_model(path), TinyFastConformer)


def test_the_regeneration_command_reproduces_its_base(tmp_path, monkeypatch, capsys):
    """`python -m cl_fed.models.foundation --commit` on the tiny scenario with a short recipe: two
    regenerations from empty caches ship bit-identical bases under the recipe's key."""
    monkeypatch.setattr(foundation, "FOUNDATION_TRAIN", BUDGET)
    shipped = []
    for attempt in ("a", "b"):
        monkeypatch.setattr(foundation, "COMMITTED", tmp_path / attempt / "committed")
        assert (
            foundation.main(["--scenario", "tiny", "--commit", "--cache-dir", str(tmp_path / attempt)]) == 0
        )
        base = tmp_path / attempt / "committed" / foundation_key(load_scenario("tiny"), BUDGET)[:16]
        assert json.loads((base / INFO_FILE).read_text())["key"] == foundation_key(
            load_scenario("tiny"), BUDGET
        )
        shipped.append((base / "model.safetensors").read_bytes())
        assert foundation_base("tiny", cache_dir=tmp_path / "empty", train_config=BUDGET) == base
    assert shipped[0] == shipped[1]
    assert "committed" in capsys.readouterr().out


def test_committed_bases_are_found_from_the_checkout_not_from_flowers_app_copy():
    """`flwr run` runs the apps from a copy of the project that leaves binary files (the weights)
    out; the shipped bases must be looked up in the checkout cl-fed is installed from."""
    root = project_root()
    assert root is not None and COMMITTED == root / "cl_fed" / "models" / "bases"
    shipped = foundation_base("default", progress=False)
    assert (shipped / "model.safetensors").is_file() and shipped.parent == COMMITTED
