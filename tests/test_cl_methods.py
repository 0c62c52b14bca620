"""cl-method (issue 16): EWC, LwF, O-LoRA and replay, their math against hand-computed values, their
config, and each through a real federation of the tiny scenario (ServerApp loop and ClientApp)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from loopback import one_thread_and_task_identity, run_in_process  # noqa: F401  (autouse fixture)

from cl_fed import protocol as P
from cl_fed.clmethods import Anchors, Carried, ewc, lwf, olora
from cl_fed.clmethods.replay import ReplayBuffer, choose
from cl_fed.config import make_config
from cl_fed.data.stream import StageStream
from cl_fed.data.synth import generate
from cl_fed.data.utterance import Utterance
from cl_fed.faults import InjectedCrash
from cl_fed.io import load_tensors
from clients.site import state_dir


def test_ewc_penalty_and_online_fisher_hand_computed():
    deltas, fisher = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 2.0])}
    assert ewc.penalty(deltas, fisher, lam=3.0).item() == pytest.approx(1.5 * (0.5 * 1 + 2 * 4))
    with pytest.raises(ValueError, match="no parameter change for Fisher keys"):
        ewc.penalty({}, fisher, 1.0)
    sites = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    first = ewc.accumulate(None, sites, [1, 3])  # .25 [1, 2] + .75 [3, 6]
    assert torch.allclose(first["w"], torch.tensor([2.5, 5.0]))
    later = ewc.accumulate({"w": torch.tensor([10.0, 10.0])}, sites, [1, 3], decay=0.5)
    assert torch.allclose(later["w"], torch.tensor([7.5, 10.0]))
    with pytest.raises(ValueError, match="Fisher keys differ"):
        ewc.accumulate(None, [sites[0], {"v": torch.ones(2)}], [1, 1])


def test_diagonal_fisher_is_the_mean_squared_per_utterance_gradient():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    inputs = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 2.0])}
    rows = [Utterance(id=k, audio=f"/{k}.wav", text="x") for k in inputs]

    def loss_of(u):  # (w.x)^2 / 2: gradient (w.x) x, so [1, 0] and [3, 6]
        return model(inputs[u.id]).pow(2).sum() / 2

    fisher = ewc.diagonal_fisher(model, {"weight": model.weight}, loss_of, rows)
    assert torch.allclose(fisher["weight"], torch.tensor([[5.0, 18.0]]))  # ([1, 0] + [9, 36]) / 2
    assert model.weight.grad is None and model.weight.requires_grad  # left as it was
    assert ewc.fisher_sample(rows, 5, seed=0) == rows
    assert ewc.fisher_sample(rows, 1, seed=0) == ewc.fisher_sample(rows, 1, seed=0)
    assert len(ewc.fisher_sample(rows, 1, seed=0)) == 1


def test_lwf_distillation_is_t_squared_kl_over_the_unmasked_positions():
    teacher = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])  # 1 x 2 positions x 2 classes
    student = torch.zeros(1, 2, 2)  # uniform
    mask = torch.tensor([[True, False]])  # the second position does not count
    p = torch.tensor([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))  # softmax([0, ln 3] / 2)
    expected = 4 * float((p * (p / 0.5).log()).sum())
    assert lwf.distillation(student, teacher, mask, temperature=2.0).item() == pytest.approx(
        expected, rel=1e-5
    )
    assert lwf.distillation(
        teacher, teacher, torch.ones(1, 2, dtype=torch.bool), 1.0
    ).item() == pytest.approx(0)


def test_olora_subspace_basis_and_penalty_hand_computed():
    delta = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    top = olora.subspace(delta, rank=1)
    assert torch.allclose(top.abs(), torch.tensor([[1.0, 0.0, 0.0]]))
    assert olora.subspace(torch.zeros(2, 3), rank=1).shape == (0, 3)  # a zero update acts nowhere
    basis = olora.extend(top, torch.tensor([[0.0, 1.0, 0.0]]))
    assert basis.shape == (2, 3) and torch.allclose(basis @ basis.T, torch.eye(2), atol=1e-6)
    same = olora.extend(basis, torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2))  # in the span already
    assert same.shape == (2, 3)
    a = torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 5.0]])
    assert olora.penalty({"l": top}, {"l": a}, lam=0.5).item() == pytest.approx(0.5 * 2)  # |Q A^T| = [2, 0]
    assert olora.penalty({"l": basis}, {"l": a}, lam=1.0).item() == pytest.approx(3.0)  # [2, 0] and [-1, 0]


def test_carried_state_round_trips_and_keeps_subspaces_of_committed_merges():
    cfg = make_config({"cl-method": "olora"})
    carried = Carried()
    assert carried.broadcast(cfg) == {}  # nothing merged yet: nothing to send
    before = {"l.weight": torch.zeros(2, 3), "other.weight": torch.ones(2)}
    after = {**before, "l.weight": torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0, 4.0]))}
    carried.merged(cfg, before, after, ["l.lora_A", "l.lora_B"], rank=4)
    assert torch.allclose(carried.bases["l"].abs(), torch.tensor([[0.0, 0.6, 0.8]]))  # rank 1: one row
    again = Carried.from_tensors(carried.to_tensors())
    assert set(again.broadcast(cfg)["subspaces"]) == {"l"}
    ewc_cfg = make_config({"cl-method": "ewc", "ewc-decay": 0.5})
    carried.add_fisher(ewc_cfg, [{"l.weight": torch.ones(2, 3)}], [7])
    carried.add_fisher(ewc_cfg, [{"l.weight": torch.ones(2, 3)}], [7])
    assert torch.allclose(
        Carried.from_tensors(carried.to_tensors()).fisher["l.weight"], torch.full((2, 3), 1.5)
    )
    assert set(carried.broadcast(ewc_cfg)) == {"fisher"}


def test_replay_buffer_keeps_copies_of_a_stage_and_survives_a_restart(tmp_path):
    rows = []
    for i in range(6):
        audio = tmp_path / "data" / f"{i}.wav"
        audio.parent.mkdir(exist_ok=True)
        audio.write_bytes(b"RIFF" + bytes([i]))
        rows.append(Utterance(id=f"u{i}", audio=str(audio), text=f"t {i}", site="a", stage="s0"))
    chosen = choose(rows, 3, seed=1, site="a", stage=0)
    assert len(chosen) == 3 and chosen == choose(rows, 3, seed=1, site="a", stage=0)
    assert choose(rows, 10, seed=1, site="a", stage=0) == rows
    buffer = ReplayBuffer(tmp_path / "replay")
    buffer.keep(0, chosen)
    buffer.keep(0, rows)  # a stage's later rounds keep what its first kept
    for path in (tmp_path / "data").iterdir():
        path.unlink()  # the stage's data is gone; the buffer's copies stay
    again = ReplayBuffer(tmp_path / "replay")
    assert [u.id for u in again.before(1)] == [u.id for u in chosen] and again.before(0) == []
    assert all(open(u.audio, "rb").read().startswith(b"RIFF") for u in again.before(1))


def test_anchors_keep_the_stage_start_until_the_next_stage(tmp_path):
    path = tmp_path / "anchor.safetensors"
    first = Anchors(path).of(0, lambda: {"w": torch.ones(2)})
    kept = Anchors(path).of(0, lambda: {"w": torch.zeros(2)})  # a later round, another process
    assert torch.equal(first["w"], kept["w"]) and torch.equal(kept["w"], torch.ones(2))
    assert torch.equal(Anchors(path).of(1, lambda: {"w": torch.zeros(2)})["w"], torch.zeros(2))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"cl-method": "olora", "strategy": "fedavg"}, "it trains no adapter"),
        ({"cl-method": "olora", "strategy": "fedavg-lora"}, "never merged"),
        ({"cl-method": "olora", "lora-aggregation": "fedsa"}, "lora-aggregation='fedsa'"),
        ({"cl-method": "olora", "lora-aggregation": "ffa"}, "would do nothing"),
        ({"cl-method": "ewc", "strategy": "local"}, "models of their own"),
        ({"cl-method": "ewc", "dp-noise": 1.0, "merge": "factors", "weighting": "uniform"}, "accountant"),
        ({"cl-method": "bogus"}, "choose one of none, ewc, lwf, olora, replay"),
        ({"cl-method": "lwf", "lwf-temperature": 0}, "lwf-temperature=0.0 must be > 0"),
        ({"cl-method": "replay", "replay-per-stage": 0}, "replay-per-stage=0 must be >= 1"),
    ],
)
def test_cl_method_config_refuses_what_does_not_apply(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(overrides)


def test_cl_method_names_runs_and_ignores_the_other_methods_keys():
    assert make_config({"strategy": "fedavg", "cl-method": "ewc"}).default_run_name() == (
        "default-fedavg-cl-methodewc-seed0"
    )
    assert (
        make_config({"cl-method": "lwf", "ewc-lambda": 5}).default_run_name()
        == make_config({"cl-method": "lwf"}).default_run_name()
    )
    assert "ewc-lambda5" in make_config({"cl-method": "ewc", "ewc-lambda": 5}).default_run_name()


def federation(tmp_path, method: str, monkeypatch=None, **overrides):
    run_config = {
        "scenario": "tiny",
        "rounds-per-stage": 2,
        "cl-method": method,
        "output-dir": str(tmp_path / method),
        **overrides,
    }
    if monkeypatch is not None:  # clients/audit.py records every message's records, names and shapes
        monkeypatch.setenv("CL_FED_AUDIT_DIR", str(tmp_path / method / "audit"))
    run_dir, grid = run_in_process(run_config, sites=2)
    return json.loads((run_dir / "results.json").read_text()), run_dir


def audited(run_dir) -> list[dict]:
    """The audit's rows, after checking that no message carries audio, features or a transcript:
    every array record is the model's, an adapter's or a method's statistic, and no transcript is in
    any config or metric."""
    rows = [
        json.loads(line)
        for f in (run_dir.parent / "audit").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    stream = StageStream.from_dataset_dir(generate("tiny", progress=False))
    transcripts = {u.text for s in stream.stages for u in stream.test(s)} | {
        u.text for site in stream.sites for i in range(len(stream.stages)) for u in stream.site(site).enter(i)
    }
    for row in rows:
        assert set(row["arrays"]) <= {P.WEIGHTS, P.ADAPTER, P.EVALUATED, P.ARRAYS, P.FISHER, P.SUBSPACES}, row
        text = json.dumps(row["configs"]) + json.dumps(row["metrics"])
        assert not any(t in text for t in transcripts if len(t) > 8)
    assert rows
    return rows


def test_ewc_federation_sends_the_fisher_up_once_a_stage_and_down_in_later_stages(tmp_path, monkeypatch):
    plain, _ = federation(tmp_path, "none")
    result, run_dir = federation(tmp_path, "ewc", monkeypatch)
    assert result["complete"] and all(len(r["clients_used"]) == 2 for r in result["rounds"])
    tensors, _ = load_tensors(run_dir / "checkpoint.safetensors")
    fisher = {k[len("extra/cl/fisher/") :]: v for k, v in tensors.items() if k.startswith("extra/cl/fisher/")}
    assert fisher and all(k.endswith(".weight") for k in fisher)  # the adapted layers' weights
    assert all(bool((v >= 0).all()) and float(v.sum()) > 0 for v in fisher.values())
    size = sum(v.numel() * 4 for v in fisher.values())  # float32
    up = [r["bytes_up"] - p["bytes_up"] for r, p in zip(result["rounds"], plain["rounds"])]
    assert up == [0, 2 * size, 0, 2 * size]  # each site's Fisher with its stage's last reply
    # the running Fisher goes to each site in every round of the second stage (and only then)
    down = [r["bytes_down"] - p["bytes_down"] for r, p in zip(result["rounds"], plain["rounds"])]
    assert down[:3] == [0, 0, 2 * size]
    rows = audited(run_dir)
    sent = [r for r in rows if r["direction"] == "in" and r["type"] == "train"]
    assert len(sent) == 2 * 4
    assert all((P.FISHER in r["arrays"]) == (r["configs"][P.CONFIG][P.STAGE] == 1) for r in sent)
    replies = [r for r in rows if r["direction"] == "out" and P.FISHER in r["arrays"]]
    assert len(replies) == 2 * 2 and all(set(r["arrays"][P.FISHER]) == set(fisher) for r in replies)

    # a server crash after the first stage: the resumed run has the running Fisher back and ends as
    # the uninterrupted one (the sites' anchors are on their disks)
    crashed = {"run-name": "ewc-crashed", "output-dir": str(tmp_path / "crashed")}
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"stop-after-round": 2}))
    monkeypatch.setenv("CL_FED_FAULTS_FILE", str(faults))
    with pytest.raises(InjectedCrash, match="after round 2"):
        federation(tmp_path, "ewc", **crashed)
    monkeypatch.delenv("CL_FED_FAULTS_FILE")
    resumed, resumed_dir = federation(tmp_path, "ewc", **crashed, resume=True)
    assert [r["loss"] for r in resumed["rounds"]] == [r["loss"] for r in result["rounds"]]
    assert resumed["wer_matrix"] == result["wer_matrix"] and resumed["bytes_down"] == result["bytes_down"]
    again, _ = load_tensors(resumed_dir / "checkpoint.safetensors")
    assert all(torch.equal(again[f"extra/cl/fisher/{k}"], v) for k, v in fisher.items())


def test_lwf_olora_and_replay_federations_keep_their_state_at_the_sites(tmp_path, monkeypatch):
    olora_run, run_dir = federation(tmp_path, "olora", monkeypatch)
    tensors, _ = load_tensors(run_dir / "checkpoint.safetensors")
    bases = {k: v for k, v in tensors.items() if k.startswith("extra/cl/subspaces/")}
    assert bases and all(32 < v.shape[0] <= 2 * 32 for v in bases.values())  # top-r rows of each of 2 merges
    sent = [r for r in audited(run_dir) if r["direction"] == "in" and r["type"] == "train"]
    assert all((P.SUBSPACES in r["arrays"]) == (r["configs"][P.CONFIG][P.STAGE] == 1) for r in sent)
    replay, replay_dir = federation(tmp_path, "replay", monkeypatch, **{"replay-per-stage": 3})
    for site in ("factory-a", "factory-b"):
        kept = state_dir(replay_dir, site) / "replay" / "buffer.json"
        stages = json.loads(kept.read_text())
        assert sorted(stages) == ["0", "1"] and all(len(rows) == 3 for rows in stages.values())
    audited(replay_dir)  # the buffer never leaves the site
    # a replayed round trains on its stage's rows plus 3 kept ones (its reply's example count)
    assert sum(replay["rounds"][2]["num_examples"]) == sum(olora_run["rounds"][2]["num_examples"]) + 2 * 3
    assert replay["rounds"][0]["num_examples"] == olora_run["rounds"][0]["num_examples"]
    lwf_run, lwf_dir = federation(tmp_path, "lwf", monkeypatch)
    assert lwf_run["complete"]
    audited(lwf_dir)
    anchor = state_dir(lwf_dir, "factory-a") / "anchor.safetensors"
    assert load_tensors(anchor)[1]["stage"] == 1
