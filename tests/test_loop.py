"""One continual loop: the plan, the exact round aggregate, the state, and the runner == federation.

Fast tier: pure functions against hand-computed values, and in-process runs of the real ServerApp
loop with the real ClientApp handlers (tests/loopback.py), no `flwr run`.
"""

from __future__ import annotations

import json

import pytest
import torch
from loopback import (
    one_thread_and_task_identity,  # noqa: F401  (autouse fixture)
    run_in_process,
)

from cl_fed.aggregation import RESIDUAL, aggregate, fold
from cl_fed.config import make_config
from cl_fed.continual import evaluate_all, prepare_data, starting_model, state_checksum
from cl_fed.continual import test_sets as stage_test_sets
from cl_fed.models.registry import load_model
from cl_fed.plan import Aggregate, Checkpoint, Evaluate, Merge, Train, continual_plan, round_seed
from cl_fed.run import run_single_site
from cl_fed.state import ContinualState

STAGES = ["s0", "s1", "s2", "s3"]


# ---- the plan ----------------------------------------------------------------------------------
def kinds(plan, stage):
    return [
        type(s).__name__[0] + (("C" if s.commit else "p") if isinstance(s, Merge) else "")
        for s in plan
        if s.stage == stage
    ]


def test_plan_decides_merges_starts_and_seeds_once():
    every_stage = continual_plan(make_config({"rounds-per-stage": 2}), STAGES)
    # Train, Aggregate, Checkpoint, Train, Aggregate, Merge(commit), Evaluate, Checkpoint
    assert kinds(every_stage, 0) == ["T", "A", "C", "T", "A", "MC", "E", "C"]
    trains = [s for s in every_stage if isinstance(s, Train)]
    assert [s.start for s in trains[:2]] == ["fresh", "continue"]
    assert [s.server_round for s in trains] == list(range(1, 9))
    assert [s.seed for s in trains[:3]] == [round_seed(0, 0, 0), round_seed(0, 0, 1), round_seed(0, 1, 0)]
    assert len({s.seed for s in trains}) == len(trains)
    assert [(s.span_index, s.span_rounds) for s in trains[:2]] == [(0, 2), (1, 2)]
    assert [s.rule for s in every_stage if isinstance(s, Aggregate)] == ["exact"] * 8

    pooled = continual_plan(
        make_config({"rounds-per-stage": 2, "centralize-every": 2, "merge": "factors"}), STAGES
    )
    assert [m.commit for m in pooled if isinstance(m, Merge)] == [False, True, False, True]
    assert {s.rule for s in pooled if isinstance(s, Aggregate)} == {"fedit"}

    per_round = continual_plan(
        make_config({"rounds-per-stage": 2, "centralize-every": "round", "lr-span": "round"}), STAGES
    )
    assert kinds(per_round, 0) == ["T", "A", "MC", "C", "T", "A", "MC", "E", "C"]
    assert {s.start for s in per_round if isinstance(s, Train)} == {"fresh"}
    assert {(s.span_index, s.span_rounds) for s in per_round if isinstance(s, Train)} == {(0, 1)}

    fedavg = continual_plan(make_config({"strategy": "fedavg"}), STAGES)
    assert not [s for s in fedavg if isinstance(s, Merge)]
    assert {s.start for s in fedavg if isinstance(s, Train)} == {"full"}
    lora = continual_plan(make_config({"strategy": "fedavg-lora"}), STAGES)
    assert [s.start for s in lora if isinstance(s, Train)][:3] == ["fresh", "continue", "continue"]
    assert not [s for s in lora if isinstance(s, Merge)]
    assert [s.label for s in lora if isinstance(s, Evaluate)] == STAGES
    assert isinstance(lora[-1], Checkpoint)


# ---- the exact round aggregate -------------------------------------------------------------------
def adapter(seed: int, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "l.lora_A": torch.randn(2, 3, generator=g, dtype=dtype),
        "l.lora_B": torch.randn(4, 2, generator=g, dtype=dtype),
    }


def test_exact_aggregate_against_hand_computed_values():
    a1 = {"l.lora_A": torch.tensor([[1.0, 0.0]]), "l.lora_B": torch.tensor([[2.0], [0.0]])}
    a2 = {"l.lora_A": torch.tensor([[0.0, 1.0]]), "l.lora_B": torch.tensor([[0.0], [4.0]])}
    out = aggregate("exact", [a1, a2], [0.25, 0.75], scale=2.0)
    # means: A = [[.25, .75]], B = [[.5], [3]];  sum p B A = [[.5, 0], [0, 3]];
    # B_bar A_bar = [[.125, .375], [.75, 2.25]]
    assert torch.allclose(out["l.lora_A"], torch.tensor([[0.25, 0.75]]))
    assert torch.allclose(out["l.lora_B"], torch.tensor([[0.5], [3.0]]))
    expected = 2.0 * (torch.tensor([[0.5, 0.0], [0.0, 3.0]]) - torch.tensor([[0.125, 0.375], [0.75, 2.25]]))
    assert torch.equal(out[RESIDUAL + "l.weight"], expected.double())
    assert set(aggregate("fedit", [a1, a2], [0.25, 0.75], 2.0)) == {"l.lora_A", "l.lora_B"}  # no residual
    one = aggregate("exact", [a1], [1.0], 2.0)
    assert not one[RESIDUAL + "l.weight"].any()  # one site: exactly zero, the base stays bit for bit


def test_after_every_round_the_sites_continue_from_the_exact_mean_update_fp64():
    scale = 1.5
    w0 = {
        "l.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64),
        "other": torch.ones(2, dtype=torch.float64),
    }
    state = ContinualState.start(w0)
    start = adapter(100)
    for round_index in range(3):  # sites start from the state's adapter (round 0: a shared one)
        frozen = dict(state.weights)
        begin = state.adapter or start
        sites = [
            {k: v + 0.1 * (i + 1) * adapter(10 * round_index + i)[k] for k, v in begin.items()}
            for i in range(3)
        ]
        p = [0.2, 0.3, 0.5]
        state.apply("exact", aggregate("exact", sites, p, scale))
        # the model the sites continue from: the folded weights plus the mean adapter (kept in fp32, as
        # trained; the residual is taken against those fp32 means, so the sum is exact)
        a_bar, b_bar = state.adapter["l.lora_A"].double(), state.adapter["l.lora_B"].double()
        model = state.weights["l.weight"] + scale * b_bar @ a_bar
        want = frozen["l.weight"] + scale * sum(pi * s["l.lora_B"] @ s["l.lora_A"] for pi, s in zip(p, sites))
        assert torch.allclose(model, want, rtol=0, atol=1e-10)
        assert torch.equal(state.weights["other"], w0["other"])  # layers without adapters never change
        # FedIT's model misses the cross-site covariance term
        fedit = aggregate("fedit", sites, p, scale)
        fedit_model = frozen["l.weight"] + scale * fedit["l.lora_B"].double() @ fedit["l.lora_A"].double()
        assert (fedit_model - want).abs().max() > 1e-3


def test_merge_pools_chunks_and_evaluates_as_if_merged_now():
    scale = 2.0
    base = {"l.weight": torch.zeros(4, 3, dtype=torch.float64)}
    state = ContinualState.start(base)
    chunks = []
    for seed in (1, 2):
        state.apply("exact", aggregate("exact", [adapter(seed), adapter(seed + 10)], [0.5, 0.5], scale))
        chunks.append(
            0.5
            * scale
            * (
                adapter(seed)["l.lora_B"] @ adapter(seed)["l.lora_A"]
                + adapter(seed + 10)["l.lora_B"] @ adapter(seed + 10)["l.lora_A"]
            )
        )
        commit = seed == 2
        if not commit:  # one chunk pooled: the evaluated model is base + that chunk
            state.merge(scale, "product", commit=False)
            assert torch.allclose(state.evaluated(scale)["l.weight"], chunks[0], atol=1e-10)
            assert torch.equal(state.weights["l.weight"], base["l.weight"]) and state.adapter is None
            restored = ContinualState.from_tensors(state.to_tensors(), has_adapter=False)
            assert torch.equal(restored.evaluated(scale)["l.weight"], state.evaluated(scale)["l.weight"])
        else:
            state.merge(scale, "product", commit=True)
    assert torch.allclose(state.base["l.weight"], (chunks[0] + chunks[1]) / 2, atol=1e-10)  # each chunk 1/K
    assert state.pool == [] and torch.equal(state.evaluated(scale)["l.weight"], state.base["l.weight"])
    with pytest.raises(ValueError, match="no adapter to merge"):
        state.merge(scale, "product", commit=True)


def test_fold_checks_keys_and_shapes():
    with pytest.raises(ValueError, match="'x'"):
        fold({"w": torch.zeros(2)}, {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        fold({"w": torch.zeros(2)}, {"w": torch.zeros(3)})


# ---- one loop: the runner is a federation of one ------------------------------------------------
def federated_and_single(tmp_path, **overrides):
    run_config = {"scenario": "tiny", "sites": 1, "output-dir": str(tmp_path), **overrides}
    federated, _ = run_in_process(run_config, sites=1)
    single = run_single_site(make_config(run_config), site="factory-a", progress=False)
    return (
        json.loads((federated / "results.json").read_text()),
        json.loads((single / "results.json").read_text()),
        federated,
        single,
    )


def assert_same_run(fed, one):
    assert fed["complete"] and one["complete"]
    assert all(
        r["clients_used"] and not r["clients_dropped"] for r in fed["rounds"]
    )  # the site's update was used
    assert fed["wer_matrix"] == one["wer_matrix"] and fed["cer_matrix"] == one["cer_matrix"]
    assert fed["base_checksum"] == one["base_checksum"]
    assert [r["loss"] for r in fed["rounds"]] == [r["loss"] for r in one["rounds"]]
    assert [r["merged"] for r in fed["rounds"]] == [r["merged"] for r in one["rounds"]]


def test_one_site_federation_equals_the_single_site_runner(tmp_path):
    fed, one, _, single_dir = federated_and_single(tmp_path)
    assert_same_run(fed, one)
    cfg = make_config({"scenario": "tiny", "sites": 1})
    scenario, stream = prepare_data(cfg, progress=False)
    start = starting_model(cfg, scenario, progress=False).model.state_dict()
    assert fed["base_checksum"] != state_checksum(start)  # the merges changed the base
    # model/ is what the last evaluation scored: reloading it reproduces the last row exactly
    row = evaluate_all(load_model(single_dir / "model"), stage_test_sets(stream), "reload").wer
    assert [row[s] for s in one["stages"]] == one["wer_matrix"][-1]


@pytest.mark.parametrize(
    "overrides",
    [
        {"centralize-every": "round"},
        {"centralize-every": "2"},
        {"merge": "factors"},
        {"strategy": "fedavg-lora"},
        {"strategy": "fedavg"},
    ],
)
def test_one_site_federation_equals_the_runner_for_every_schedule(tmp_path, overrides):
    fed, one, _, _ = federated_and_single(tmp_path, **overrides)
    assert_same_run(fed, one)


def test_saved_model_includes_the_live_adapter_of_fedavg_lora(tmp_path):
    run_config = {
        "scenario": "tiny",
        "strategy": "fedavg-lora",
        "rounds-per-stage": 1,
        "output-dir": str(tmp_path),
        "lr": 0.02,
    }
    run_dir, _ = run_in_process(run_config, sites=2)
    results = json.loads((run_dir / "results.json").read_text())
    _, stream = prepare_data(make_config(run_config), progress=False)
    sets = stage_test_sets(stream)
    saved = evaluate_all(load_model(run_dir / "model"), sets, "reload")
    assert [saved.wer[s] for s in results["stages"]] == results["wer_matrix"][-1]
    assert [saved.cer[s] for s in results["stages"]] == results["cer_matrix"][-1]


def test_fedadam_server_optimizer_runs_end_to_end(tmp_path):
    base = {"scenario": "tiny", "rounds-per-stage": 2, "output-dir": str(tmp_path)}
    plain, _ = run_in_process(base, sites=2)
    adam, grid = run_in_process({**base, "server-optimizer": "fedadam", "server-lr": 1e-3}, sites=2)
    a, b = (json.loads((d / "results.json").read_text()) for d in (plain, adam))
    assert b["complete"] and b["config"]["server-optimizer"] == "adam"  # the old spelling, read as adam
    assert all(len(r["clients_used"]) == 2 for r in b["rounds"])
    assert a["base_checksum"] != b["base_checksum"]  # FedAdam's step is not the plain aggregate
    assert (adam / "checkpoint.safetensors").is_file()


# ---- what travels: replayable weight updates ---------------------------------------------------
def test_updates_are_low_rank_when_smaller_exact_and_replay_bit_for_bit():
    from cl_fed import updates

    g = torch.Generator().manual_seed(3)
    weights = {"w": torch.randn(64, 48, generator=g), "b": torch.randn(64, generator=g)}
    delta = torch.randn(64, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 48, generator=g, dtype=torch.float64
    )
    ops = updates.fold_ops(weights, {"w": delta, "b": torch.ones(64, dtype=torch.float64)})
    assert ops["w"][0] == "lowrank" and ops["w"][1].shape == (64, 5)  # rank 5: 560 numbers instead of 3,072
    assert ops["b"][0] == "set"  # a vector has no smaller factorisation
    assert ops["w"][1].dtype == torch.float32  # what travels is what is applied
    new = updates.apply_ops(weights, ops)
    assert torch.allclose(new["w"].double(), weights["w"].double() + delta, atol=1e-5)
    assert updates.fold_ops(weights, {"w": torch.zeros(64, 48, dtype=torch.float64)}) == {}
    full = torch.randn(64, 48, generator=g, dtype=torch.float64)
    assert updates.fold_ops(weights, {"w": full})["w"][0] == "set"  # full rank: dense is smaller
    # a site replays the serialized operations onto the weights it holds: the same bits
    steps = updates.from_tensors(updates.to_tensors([ops, updates.fold_ops(new, {"w": delta})]))
    assert torch.equal(
        updates.replay(weights, steps)["w"], updates.apply_ops(new, updates.fold_ops(new, {"w": delta}))["w"]
    )
    threads = torch.get_num_threads()
    one = updates.lowrank_product(ops["w"][1], ops["w"][2])
    torch.set_num_threads(2)
    assert torch.equal(
        updates.lowrank_product(ops["w"][1], ops["w"][2]), one
    )  # thread count does not change bits
    torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="'x'"):
        updates.apply_ops(weights, {"x": ("set", torch.zeros(1))})


def test_the_round_residual_travels_as_a_low_rank_factorisation_of_the_aggregate():
    scale = 2.0
    w0 = {"l.weight": torch.randn(40, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)}
    state = ContinualState.start(w0)
    sites = [
        {
            "l.lora_A": torch.randn(2, 30, dtype=torch.float64),
            "l.lora_B": torch.randn(40, 2, dtype=torch.float64),
        }
        for _ in range(3)
    ]
    state.apply("exact", aggregate("exact", sites, [0.2, 0.3, 0.5], scale))
    (op,) = state.log[0].values()
    assert op[0] == "lowrank" and op[1].shape[1] <= 2 * 4  # rank <= (sites + 1) * r, below the dense 40 x 30
    assert not any(torch.equal(op[1][:, :2], s["l.lora_B"]) for s in sites)  # not a site's own factor
    state.merge(scale, "product", commit=True)
    (merge_op,) = state.log[1].values()
    assert merge_op[0] == "lowrank" and merge_op[1].shape == (40, 2)  # s * B_bar, A_bar
