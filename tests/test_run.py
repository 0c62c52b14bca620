"""The single-site runner (the paper's setting) on the tiny scenario, and the results format."""

import json

import pytest

from cl_fed.config import make_config
from cl_fed.metrics import continual_metrics
from cl_fed.models.registry import load_model
from cl_fed.results import recompute_matrices
from cl_fed.run import main, run_joint, run_single_site


@pytest.mark.parametrize("every", ["stage", "2", "round"])
def test_single_site_runner_writes_consistent_results(tmp_path, every):
    cfg = make_config(
        {"scenario": "tiny", "rounds-per-stage": 1, "centralize-every": every, "output-dir": str(tmp_path)}
    )
    run_dir = run_single_site(cfg, site="all", progress=False)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"] == ["en-welding", "de-codeswitch"] and results["complete"]
    assert results["schedule"]["centralize_every"] == {"stage": 1, "2": 2, "round": "round"}[every]
    # every figure recomputes: matrices from the predictions, metrics from the matrix
    wer, cer = recompute_matrices(run_dir)
    assert wer == results["wer_matrix"] and cer == results["cer_matrix"]
    assert results["metrics"] == continual_metrics(results["wer_matrix"], initial=results["initial_wer"])
    merged = [r["merged"] for r in results["rounds"]]
    assert merged == ([False, True] if every == "2" else [True, True])
    # the saved base is the merged model: it loads and differs from the starting base
    final = load_model(run_dir / "model")
    assert sum(p.numel() for p in final.model.parameters()) > 1_000_000
    assert "foundation" in results["other_test_sets"]


def test_joint_upper_bound_trains_once_on_every_stage(tmp_path):
    cfg = make_config(
        {
            "scenario": "tiny",
            "rounds-per-stage": 2,
            "strategy": "centralization",
            "lora-rank": 4,
            "output-dir": str(tmp_path),
        }
    )
    run_dir = run_joint(cfg, progress=False)
    assert run_dir.name == "tiny-joint-seed0"  # full fine-tuning: LoRA and schedule knobs do not apply
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and results["schedule"] == {"mode": "joint"}
    assert len(results["wer_matrix"]) == 1 and len(results["wer_matrix"][0]) == 2  # one model, every test set
    assert results["metrics"]["awer"] == pytest.approx(sum(results["wer_matrix"][0]) / 2)
    assert results["metrics"]["bwt"] is None  # forgetting is undefined for a model trained once
    # both rounds saw every site's data of both stages
    assert [r["num_examples"] for r in results["rounds"]] == [32, 32]
    wer, cer = recompute_matrices(run_dir)
    assert wer == results["wer_matrix"] and cer == results["cer_matrix"]


def test_unknown_site_and_strategy_are_clear_errors(tmp_path):
    cfg = make_config({"scenario": "tiny", "output-dir": str(tmp_path)})
    with pytest.raises(ValueError, match="site='factory-z' is not in the data"):
        run_single_site(cfg, site="factory-z", progress=False)
    with pytest.raises(ValueError, match="needs several sites"):
        run_single_site(make_config({"strategy": "local"}), progress=False)
    with pytest.raises(ValueError, match="does not divide the 2 stages"):
        run_single_site(make_config({"scenario": "tiny", "centralize-every": 3}), progress=False)
    private = make_config({"scenario": "tiny", "dp-noise": 1.0, "merge": "factors", "weighting": "uniform"})
    with pytest.raises(ValueError, match="dp-noise=1.0.*federated runs only"):
        run_single_site(private, progress=False)
    with pytest.raises(ValueError, match="dp-noise=1.0.*federated runs only"):
        run_joint(private, progress=False)


def test_command_line_flags_are_the_run_config_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--scenario", "tiny", "--strategy", "fedprox"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "strategy='fedprox'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one line that says what to fix
    with pytest.raises(ValueError, match="warmup=2.0 is a fraction"):
        main(["--scenario", "tiny", "--warmup", "2", "--traceback"])
    with pytest.raises(SystemExit):
        main(["--no-such-flag", "1"])
