"""A real `flwr run` simulation of the tiny scenario against a SuperLink this module starts.

Checks results.json end to end, that no message carries audio, features or transcripts, and that
an injected client crash and a NaN update are survived and recorded. Resuming after a server crash,
a wrong number of SuperNodes and differential privacy run in-process (tests/test_inprocess_runs.py);
the real-process kill-and-resume is in tests/test_deployment.py.
"""

import json
from pathlib import Path

import pytest

from cl_fed import protocol as P
from cl_fed.data.stream import StageStream
from cl_fed.data.synth import generate
from cl_fed.metrics import continual_metrics
from cl_fed.results import recompute_matrices
from simulations.flower import flwr_run
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


def test_flowers_fedavgm_and_fedprox_composed_in_a_real_simulation(flower):
    """server-optimizer=avgm and proximal-mu through `flwr run`: Flower's FedProx, FedAvgM and our
    strategy as one class (server/strategies.py build_strategy); the in-process runs of every
    option are in tests/test_server_optimizers.py."""
    run_dir = run(flower, **{"server-optimizer": "avgm", "proximal-mu": 0.01, "run-name": "composed"})
    results = json.loads((run_dir / "results.json").read_text())
    assert results["complete"] and len(results["rounds"]) == 4
    assert results["config"]["server-optimizer"] == "avgm" and results["config"]["proximal-mu"] == 0.01
    assert all(len(r["clients_used"]) == 2 and r["clients_dropped"] == [] for r in results["rounds"])
    assert sum(r["merged"] for r in results["rounds"]) == 2  # a merge per stage, the momentum restarted
