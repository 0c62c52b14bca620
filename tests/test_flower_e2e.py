"""Real `flwr run` simulations of the tiny scenario against a SuperLink this module starts.

Checks results.json end to end, that no message carries audio, features or transcripts, that
an injected client crash and a NaN update are survived and recorded, and that a run killed
after a round and resumed ends exactly like an uninterrupted one.
"""

import json
from pathlib import Path

import pytest

from cl_fed import protocol as P
from cl_fed.data.stream import StageStream
from cl_fed.data.synth import generate
from cl_fed.metrics import continual_metrics
from cl_fed.results import recompute_matrices
from server.checkpoint import CHECKPOINT
from simulations.flower import FlowerRunError, flwr_run
from simulations.superlink import private_superlink

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    work = tmp_path_factory.mktemp("flower")
    with private_superlink(
        work, {"CL_FED_AUDIT_DIR": str(work / "audit"), "CL_FED_FAULTS_FILE": str(work / "faults.json")}
    ) as env:
        yield {"env": env, "work": work}


def run(flower, faults=None, **overrides):
    (flower["work"] / "faults.json").write_text(json.dumps(faults or {}))
    config = {
        "scenario": "tiny",
        "rounds-per-stage": 2,
        "output-dir": str(flower["work"] / "runs"),
        **overrides,
    }
    return flwr_run(config, env=flower["env"], stream=False, timeout=900)


def test_centralization_run_results_and_privacy(flower):
    run_dir = run(
        flower,
        faults={
            "client": [
                {"site": "factory-b", "round": 2, "fault": "raise"},
                {"site": "factory-a", "round": 3, "fault": "nan"},
            ]
        },
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy"] == "centralization" and results["complete"]
    assert results["stages"] == ["en-welding", "de-codeswitch"]
    assert len(results["rounds"]) == 4 and len(results["wer_matrix"]) == 2
    # the injected faults: left out of their round with a reason, the run went on
    dropped = {r["server_round"]: r["clients_dropped"] for r in results["rounds"]}
    assert "injected fault" in dropped[2][0]["reason"] and results["rounds"][1]["clients_used"] == [
        "factory-a"
    ]
    assert "NaN" in dropped[3][0]["reason"] and results["rounds"][2]["clients_used"] == ["factory-b"]
    assert dropped[1] == [] and dropped[4] == []
    # metrics recompute from the matrix, and the matrix from the saved predictions
    assert results["metrics"] == continual_metrics(results["wer_matrix"], initial=results["initial_wer"])
    wer, cer = recompute_matrices(run_dir)
    assert wer == results["wer_matrix"] and cer == results["cer_matrix"]
    assert results["bytes_up"] > 0 and results["bytes_down"] > results["bytes_up"]
    # the final base loads with from_pretrained
    from transformers import ParakeetForCTC

    ParakeetForCTC.from_pretrained(run_dir / "model")

    # privacy: every array is a model weight or an adapter factor; no transcript in any message
    audit = [
        json.loads(line)
        for f in (flower["work"] / "audit").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    incoming = [row for row in audit if row["direction"] == "in" and row["type"] == "train"]
    assert len(incoming) == 2 * 4  # 2 sites x 4 rounds, the crashing one included
    assert sum(row["direction"] == "out" for row in audit) == 2 * 4 - 1  # the crash sent no reply
    stream = StageStream.from_dataset_dir(generate("tiny", progress=False))
    transcripts = {u.text for s in stream.stages for u in stream.test(s)} | {
        u.text for site in stream.sites for i in range(len(stream.stages)) for u in stream.site(site).enter(i)
    }
    for row in audit:
        for record, arrays in row["arrays"].items():
            for key, (dtype, _shape) in arrays.items():
                assert dtype in ("float32", "torch.float32", "int64", "torch.int64"), (key, dtype)
                name = key.split("/", 1)[-1]
                assert (
                    name.endswith(
                        (
                            ".lora_A",
                            ".lora_B",
                            ".weight",
                            ".bias",
                            "running_mean",
                            "running_var",
                            "num_batches_tracked",
                        )
                    )
                    or record in (P.WEIGHTS, P.EVALUATED)  # model weights, under any name
                ), key
        text = json.dumps(row["configs"]) + json.dumps(row["metrics"])
        assert not any(t in text for t in transcripts if len(t) > 8)


def test_resume_after_a_server_crash_equals_an_uninterrupted_run(flower):
    # one round per stage (CI time): the crash comes after stage 1, the resumed run does stage 2
    common = {"strategy": "fedavg-lora", "rounds-per-stage": 1}
    whole = run(flower, **{"run-name": "whole", **common})
    with pytest.raises(FlowerRunError):
        run(flower, faults={"stop-after-round": 1}, **{"run-name": "crashed", **common})
    assert (whole.parent / "crashed" / CHECKPOINT).is_file()
    assert not (whole.parent / "crashed" / "results.json").exists()
    resumed = run(flower, **{"run-name": "crashed", "resume": True, **common})
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert a["wer_matrix"] == b["wer_matrix"] and a["cer_matrix"] == b["cer_matrix"]
    assert [r["loss"] for r in a["rounds"]] == [r["loss"] for r in b["rounds"]]
    assert a["base_checksum"] and a["base_checksum"] == b["base_checksum"]
    # fedavg-lora never merges: the saved model (base + live adapter) is where the runs could differ
    from safetensors.torch import load_file

    from cl_fed.continual import state_checksum

    saved = [state_checksum(load_file(d / "model" / "model.safetensors")) for d in (whole, resumed)]
    assert saved[0] == saved[1]


def test_wrong_number_of_supernodes_is_a_clear_error(flower):
    (flower["work"] / "faults.json").write_text("{}")
    with pytest.raises(FlowerRunError, match="SuperNodes"):
        flwr_run(
            {"scenario": "tiny", "output-dir": str(flower["work"] / "runs")},
            num_supernodes=3,
            env=flower["env"],
            stream=False,
            timeout=600,
        )


def test_differential_privacy_run_noises_what_it_merges(flower):
    """dp-clip 0.2 is above every update of the tiny scenario (0.10..0.14): nothing is clipped, so
    all that separates this run from the one without DP is the noise."""
    import torch
    from safetensors.torch import load_file

    from cl_fed.models.tiny import LORA_TARGETS
    from cl_fed.privacy import epsilon

    common = {"merge": "factors", "weighting": "uniform", "rounds-per-stage": 1}  # 2 rounds each: CI time
    noised = run(flower, **common, **{"dp-noise": 0.5, "dp-clip": 0.2})
    plain = run(flower, **common)
    results = json.loads((noised / "results.json").read_text())
    assert results["complete"] and len(results["rounds"]) == 2
    assert [r["dp_noise_std"] for r in results["rounds"]] == [0.5 * 0.2 / 2] * 2
    privacy = results["privacy"]
    assert privacy["rounds"] == 2 and privacy["noise_multiplier"] == 0.5 and privacy["clipping_norm"] == 0.2
    assert 0 < privacy["epsilon"] == epsilon(0.5, 1.0, 2, 1e-5) < float("inf")
    assert "## Differential privacy" in (noised / "report.md").read_text()
    assert "dp_noise_std" not in json.loads((plain / "results.json").read_text())["rounds"][0]
    # the merged bases differ, in the LoRA-targeted weights only, by far more than float rounding
    a, b = load_file(noised / "model" / "model.safetensors"), load_file(plain / "model" / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in LORA_TARGETS and k.endswith(".weight") for k in changed)
    assert max(float((a[k] - b[k]).abs().max()) for k in changed) > 1e-3
