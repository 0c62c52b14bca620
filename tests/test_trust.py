"""Privacy and trust across factories, on real in-process federated runs (tests/loopback.py: the real
ServerApp loop, ClientApp handlers and mods):

- after a merge a site receives a function of the aggregate only: no array it receives equals (or
  holds as a slice) another site's uploaded factors, and bytes down do not grow with the sites;
- a scripted attacker site (huge num-examples, a replayed reply, a 100x update, another site's
  name) is limited or dropped with a logged reason, and the base ends exactly as if the dropped
  replies had never come;
- DP noise comes from a secret the server draws per run: two runs of one seed differ, a run resumed
  from its checkpoint redraws its noise, and the secret is in no message and no result.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from flwr.app import MessageType
from loopback import one_thread_and_task_identity, run_in_process  # noqa: F401  (autouse fixture)

from cl_fed import protocol as P
from cl_fed.data.scenario import scenario_path
from cl_fed.faults import InjectedCrash
from server.checkpoint import CHECKPOINT

SITES = ["factory-a", "factory-b", "factory-c"]


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    """The packaged tiny scenario with a third factory."""
    scenario = yaml.safe_load(scenario_path("tiny").read_text())
    scenario["name"], scenario["sites"] = "tiny-three", SITES
    path = tmp_path_factory.mktemp("scenario") / "tiny-three.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return str(path)


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def arrays_of(msg) -> dict[str, torch.Tensor]:
    out = {}
    for name, record in msg.content.array_records.items():
        for key, value in record.to_torch_state_dict().items():
            out[f"{name}/{key}"] = value
    return out


def vectors(tensor: torch.Tensor) -> set[bytes]:
    """The rows and columns of a 2-D tensor, as float32 bytes (all-zero ones left out)."""
    matrix = tensor.detach().to(torch.float32)
    out = set()
    for lines in (matrix, matrix.T.contiguous()):
        for line in lines:
            if line.any():
                out.add(line.numpy().tobytes())
    return out


def test_vectors_find_a_factor_stacked_into_a_bigger_array():
    a, b = torch.randn(4, 3), torch.randn(2, 3)
    for stacked in (torch.cat([b, a]), torch.cat([a.T, b.T], 1)):
        assert a[0].numpy().tobytes() in vectors(stacked)
    assert (a[0] + 1e-3).numpy().tobytes() not in vectors(torch.cat([b, a]))


def test_sites_receive_the_aggregate_only_and_bytes_down_do_not_grow_with_sites(tmp_path, three_sites):
    config = {"scenario": three_sites, "output-dir": str(tmp_path), "rounds-per-stage": 2}
    run_dir, grid = run_in_process(config, sites=3)
    record = results(run_dir)
    assert record["complete"] and [len(r["clients_used"]) for r in record["rounds"]] == [3, 3, 3, 3]
    received: dict[int, set[bytes]] = {}  # node -> every row and column of every array it received
    for msg in grid.sent:
        for tensor in arrays_of(msg).values():
            if tensor.dim() == 2:
                received.setdefault(msg.metadata.dst_node_id, set()).update(vectors(tensor))
    checked = 0
    for reply in grid.replies:
        owner = reply.metadata.src_node_id
        for key, factor in reply.content[P.ARRAYS].to_torch_state_dict().items():
            first_row, first_column = factor[0], factor[:, 0].contiguous()
            for node, seen in received.items():
                if node != owner:
                    checked += 1
                    for line in (first_row, first_column):
                        assert line.numpy().tobytes() not in seen, f"node {node} received {owner}'s {key}"
    assert checked >= 4 * 3 * 2 * 50  # 4 rounds x 3 sites x 2 other sites x (many) factors
    # after a merge every site gets the same update, a function of the aggregate: the merged layers'
    # change, smaller than the base and independent of how many sites made it; counted in bytes_down
    assert [r["merged"] for r in record["rounds"]] == [False, True, False, True]
    trains = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    full = sum(
        v.numel() * v.element_size() for v in trains[0].content[P.WEIGHTS].to_torch_state_dict().values()
    )
    after_merge = trains[6:9]  # round 3
    assert all(m.content[P.CONFIG][P.SYNC] == P.SYNC_CHANGED for m in after_merge)
    sizes = [sum(v.numel() * v.element_size() for v in arrays_of(m).values()) for m in after_merge]
    assert len(set(sizes)) == 1 and sizes[0] < full
    assert record["rounds"][2]["bytes_down"] == sum(sizes)


def attacked_run(tmp_path, monkeypatch, three_sites, faults: list[dict], name: str):
    path = tmp_path / f"{name}-faults.json"
    path.write_text(json.dumps({"client": faults}))
    monkeypatch.setenv("CL_FED_FAULTS_FILE", str(path))
    config = {"scenario": three_sites, "output-dir": str(tmp_path / name), "rounds-per-stage": 2}
    run_dir, _ = run_in_process(config, sites=3)
    monkeypatch.delenv("CL_FED_FAULTS_FILE")
    return results(run_dir)


def test_an_attacker_site_is_limited_or_dropped_and_moves_the_base_no_further(
    tmp_path, monkeypatch, three_sites
):
    liar = {"site": "factory-b", "round": 1, "fault": "claim-examples", "examples": 10**9}
    attacks = [
        liar,
        {"site": "factory-c", "round": 1, "fault": "record"},
        {"site": "factory-c", "round": 2, "fault": "replay"},
        {"site": "factory-c", "round": 3, "fault": "scale-update", "factor": 100},
        {"site": "factory-c", "round": 4, "fault": "claim-site", "as": "factory-a"},
    ]
    attacked = attacked_run(tmp_path, monkeypatch, three_sites, attacks, "attacked")
    rounds = attacked["rounds"]
    assert attacked["complete"] and len(rounds) == 4
    # 1: the liar's weight is held at max-site-weight (0.5); the others share the rest by examples
    assert rounds[0]["weight_capped"] == ["factory-b"]
    weights = dict(zip(rounds[0]["clients_used"], rounds[0]["weights"]))
    assert weights == pytest.approx({"factory-a": 0.25, "factory-b": 0.5, "factory-c": 0.25})
    # 2-4: dropped, each with its reason
    reasons = [{d.get("site"): d["reason"] for d in r["clients_dropped"]} for r in rounds[1:]]
    assert "nonce" in reasons[0]["factory-c"] and "replay" in reasons[0]["factory-c"]
    assert "update-norm-ratio" in reasons[1]["factory-c"]
    assert "factory-a" in reasons[2] and "rejected" in reasons[2]["factory-a"]
    for r in rounds[1:]:
        assert sorted(r["clients_used"]) == ["factory-a", "factory-b"]
    # the attacker moved the base no further than a site that failed in those rounds would have
    failed = [liar] + [{"site": "factory-c", "round": n, "fault": "raise"} for n in (2, 3, 4)]
    reference = attacked_run(tmp_path, monkeypatch, three_sites, failed, "failed")
    assert reference["base_checksum"] == attacked["base_checksum"]
    assert reference["wer_matrix"] == attacked["wer_matrix"]


DP = {"merge": "factors", "weighting": "uniform", "dp-noise": 0.5, "dp-clip": 0.2, "rounds-per-stage": 1}


def test_dp_noise_comes_from_a_per_run_secret_that_a_resumed_run_keeps(tmp_path, monkeypatch):
    common = {**DP, "scenario": "tiny"}
    first, first_grid = run_in_process({**common, "output-dir": str(tmp_path / "first")}, sites=2)
    second, _ = run_in_process({**common, "output-dir": str(tmp_path / "second")}, sites=2)
    a, b = results(first), results(second)
    same = {k: v for k, v in a["config"].items() if k != "output-dir"} == {
        k: v for k, v in b["config"].items() if k != "output-dir"
    }
    assert same and a["base_checksum"] != b["base_checksum"]  # the same run config, other noise
    assert [r["epsilon"] for r in a["rounds"]] == sorted(r["epsilon"] for r in a["rounds"])
    assert a["rounds"][-1]["epsilon"] == a["privacy"]["epsilon"] > a["rounds"][0]["epsilon"] > 0
    # the secret: in the checkpoint (mode 0600) only, in no message and no result
    from cl_fed.io import read_tensors_meta

    secret = read_tensors_meta(first / CHECKPOINT)["dp_secret"]
    assert len(secret) == 64 and (first / CHECKPOINT).stat().st_mode & 0o077 == 0
    for msg in first_grid.sent:
        assert secret not in json.dumps(
            {k: dict(v) for k, v in msg.content.config_records.items()}, default=str
        )
    assert (
        secret not in (first / "results.json").read_text() and secret not in (first / "report.md").read_text()
    )
    # a run crashed after round 1 and its copy, both resumed from that checkpoint: the same noise
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"stop-after-round": 1}))
    monkeypatch.setenv("CL_FED_FAULTS_FILE", str(faults))
    crashed = {**common, "output-dir": str(tmp_path / "crashed"), "run-name": "dp"}
    with pytest.raises(InjectedCrash):
        run_in_process(crashed, sites=2)
    monkeypatch.delenv("CL_FED_FAULTS_FILE")
    shutil.copytree(tmp_path / "crashed", tmp_path / "copy")
    resumed, _ = run_in_process({**crashed, "resume": True}, sites=2)
    copy, _ = run_in_process({**crashed, "output-dir": str(tmp_path / "copy"), "resume": True}, sites=2)
    c, d = results(resumed), results(copy)
    timeless = [
        [{k: v for k, v in r.items() if k not in ("seconds", "bytes_down")} for r in x["rounds"]]
        for x in (c, d)
    ]
    assert c["complete"] and c["base_checksum"] == d["base_checksum"] and timeless[0] == timeless[1]
    # the copy is another run directory, whose sites hold nothing yet: the resumed round sends them
    # every weight (StaleBase, then the same message again in that round) and is not lost
    assert d["rounds"][-1]["bytes_down"] > c["rounds"][-1]["bytes_down"]
    assert c["base_checksum"] not in (a["base_checksum"], b["base_checksum"])
