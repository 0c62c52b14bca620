"""Run configuration and schedules: defaults in one place, clear errors for bad values."""

import tomllib
from pathlib import Path

import pytest

from cl_fed.config import DEFAULTS, make_config
from cl_fed.schedule import parse_schedule

ROOT = Path(__file__).resolve().parents[1]


def test_flower_app_config_mirrors_defaults():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == DEFAULTS


def test_overrides_are_typed_like_defaults():
    cfg = make_config({"seed": "3", "lora_rank": 4, "resume": "true", "lr": "1e-3"})
    assert (cfg.seed, cfg.lora_rank, cfg.resume, cfg.lr) == (3, 4, True, 1e-3)


@pytest.mark.parametrize(
    "override, words",
    [
        ({"strategy": "fedprox"}, ["fedprox", "centralization"]),
        ({"merge": "mean"}, ["mean", "product"]),
        ({"colour": 1}, ["colour", "known keys"]),
        ({"seed": "x"}, ["seed", "'x'"]),
        ({"rounds-per-stage": 0}, ["rounds-per-stage", ">= 1"]),
        ({"lora-rank": -2}, ["lora-rank", "-2"]),
        ({"centralize-every": "often"}, ["often", "round"]),
        ({"fraction-train": 1.5}, ["fraction-train"]),
    ],
)
def test_bad_values_name_key_and_value(override, words):
    with pytest.raises(ValueError) as err:
        make_config(override)
    for word in words:
        assert word in str(err.value)


def test_schedules():
    assert parse_schedule("round", 3).merge_after_round()
    stage = parse_schedule("stage", 3)
    assert [stage.merge_after_stage(i) for i in range(3)] == [True, True, True]
    pool = parse_schedule(3, 3)
    assert [pool.merge_after_stage(i) for i in range(3)] == [False, False, True]
    two = parse_schedule("2", 4)
    assert [two.merge_after_stage(i) for i in range(4)] == [False, True, False, True]


def test_schedule_must_divide_stages():
    with pytest.raises(ValueError, match=r"centralize-every=2 does not divide the 3 stages"):
        parse_schedule(2, 3)


def test_run_name_is_deterministic_for_resume():
    a = make_config({"seed": 1, "centralize-every": 3})
    assert a.default_run_name() == make_config({"seed": 1, "centralize-every": "3"}).default_run_name()
    assert a.default_run_name() != make_config({"seed": 2, "centralize-every": 3}).default_run_name()
