"""Run configuration and schedules: defaults in one place, clear errors for bad values."""

from pathlib import Path

import pytest
import tomllib

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


def test_run_name_names_every_knob_that_changes_results():
    base = make_config({"scenario": "tiny"}).default_run_name()
    assert base == "tiny-centralization-every-stage-product-seed0"
    ranked = make_config({"scenario": "tiny", "lora-rank": 16, "sites": 1}).default_run_name()
    assert ranked == "tiny-centralization-every-stage-product-sites1-lora-rank16-seed0"
    # settings that do not change results stay out of the name
    assert (
        make_config({"scenario": "tiny", "round-timeout": 5, "output-dir": "/x"}).default_run_name() == base
    )
    assert (
        make_config({"scenario": "tiny", "centralize-every": 1}).default_run_name() == base
    )  # 1 stage = "stage"
    assert make_config({"scenario": "/data/tiny.yaml"}).default_run_name() == base


def test_knobs_a_strategy_ignores_do_not_split_runs():
    a = make_config({"strategy": "fedavg", "centralize-every": "round", "lora-rank": 4, "lr": 0.1})
    b = make_config({"strategy": "fedavg", "merge": "factors"})
    assert a.default_run_name() == b.default_run_name() == "default-fedavg-seed0"
    assert a.effective() == b.effective()
    assert (
        make_config({"strategy": "fedavg", "full-lr": 2e-3}).default_run_name()
        == "default-fedavg-full-lr0.002-seed0"
    )
    # local runs the schedule at every site, so its name has the schedule
    assert (
        make_config({"strategy": "local", "centralize-every": "round"}).default_run_name()
        == "default-local-every-round-product-seed0"
    )
    assert (
        make_config({"strategy": "fedavg-lora", "centralize-every": 3}).default_run_name()
        == "default-fedavg-lora-seed0"
    )


def test_sites_restricts_the_data_to_its_first_sites():
    from cl_fed.continual import prepare_data

    _, stream = prepare_data(make_config({"scenario": "tiny", "sites": 1}), progress=False)
    _, full = prepare_data(make_config({"scenario": "tiny"}), progress=False)
    assert stream.sites == full.sites[:1] and len(full.sites) == 2
    assert stream.stages == full.stages
    assert [u.id for u in stream.test(0)] == [u.id for u in full.test(0)]
    with pytest.raises(ValueError, match="sites=3.*only 2 sites"):
        prepare_data(make_config({"scenario": "tiny", "sites": 3}), progress=False)
    with pytest.raises(ValueError, match="sites=-1"):
        make_config({"sites": -1})
