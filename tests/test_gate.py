"""Merge gates, the merge history and rollback: the pure parts against hand-computed values, then a
3-stage single-site run whose every step rolls back to the checksum the run recorded."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cl_fed.config import make_config
from cl_fed.continual import state_checksum
from cl_fed.data.stream import validation_split
from cl_fed.data.utterance import Utterance
from cl_fed.faults import faulty_rows, parse_drill, shuffle_transcripts
from cl_fed.gate import gate_merge, judge, judge_site
from cl_fed.history import MergeHistory, change, contributions, undo
from cl_fed.state import ContinualState


def rows(n: int, stage: str = "s1") -> list[Utterance]:
    return [
        Utterance(id=f"{stage}-{i}", audio=f"/a/{i}.flac", text=f"text {i}", stage=stage) for i in range(n)
    ]


# ---- the judgement -------------------------------------------------------------------------------
def test_judge_passes_a_gain_and_refuses_too_little_gain_or_a_regression():
    before = {"s2": 40.0, "s1": 20.0}
    ok = judge(before, {"s2": 35.0, "s1": 20.5}, "s2", ["s1"], min_gain=2.0, max_regression=1.0)
    assert ok.passed and ok.gain == 5.0 and ok.worst_regression == 0.5
    small = judge(before, {"s2": 39.0, "s1": 20.0}, "s2", ["s1"], min_gain=2.0, max_regression=1.0)
    assert not small.passed and "gain +1.0 < gate-min-gain 2" in small.reason
    forgets = judge(before, {"s2": 30.0, "s1": 22.0}, "s2", ["s1"], min_gain=2.0, max_regression=1.0)
    assert not forgets.passed and "s1 validation WER 20.0 -> 22.0: rises +2.0" in forgets.reason
    unscored = judge({"s1": float("nan")}, {"s1": 10.0}, "s1", [], 0.0, 1.0)
    assert not unscored.passed and "no validation WER" in unscored.reason


def test_a_site_is_judged_against_the_base_and_its_peers():
    before = {"s1": 40.0, "s0": 20.0}
    peers = {"s1": 35.0, "s0": 30.0}  # every site's model alone forgets s0 (20 -> about 30)
    assert judge_site(before, {"s1": 36.0, "s0": 31.0}, peers, "s1", tolerance=5.0).passed
    broken = judge_site(before, {"s1": 100.0, "s0": 90.0}, peers, "s1", tolerance=5.0)
    assert not broken.passed and "worse than the base by 60.0 > gate-max-regression 5" in broken.reason
    outlier = judge_site(before, {"s1": 38.0, "s0": 45.0}, peers, "s1", tolerance=5.0)
    assert (
        not outlier.passed and "s0 validation WER 45.0 alone, the sites' median 30.0: +15.0" in outlier.reason
    )


def adapter_state(b_value: float) -> ContinualState:
    """One layer: base W = 0 (2x2), adapter A = [[1, 0]], B = [[b], [0]], so s B A = [[s b, 0], [0, 0]]."""
    state = ContinualState.start({"w.weight": torch.zeros(2, 2)})
    state.adapter = {"w.lora_A": torch.tensor([[1.0, 0.0]]), "w.lora_B": torch.tensor([[b_value], [0.0]])}
    return state


def test_the_gate_merges_shrinks_or_skips_by_the_validation_scores():
    # a score that reads the merged weight: WER = 50 - 10 * W[0, 0] on the current stage
    def score(weights, names):
        return {n: 50.0 - 10.0 * float(weights["w.weight"][0, 0]) if n == "s1" else 20.0 for n in names}

    step = SimpleNamespace(stage=0, round=0)
    cfg = make_config({"merge-gate": "validate", "gate-min-gain": 5.0, "gate-fallback": "shrink"})
    decision = gate_merge(cfg, adapter_state(1.0), step, ["s1"], 2.0, score)  # s B A = 2: gain 20
    assert decision["decision"] == "merged" and decision["weight"] == 1.0
    assert decision["validation_wer_before"] == {"s1": 50.0} and decision["tries"][0]["validation_wer"] == {
        "s1": 30.0
    }
    too_much = {**json.loads(json.dumps(cfg.to_dict())), "gate-min-gain": 25.0}
    decision = gate_merge(make_config(too_much), adapter_state(1.0), step, ["s1"], 2.0, score)
    assert decision["decision"] == "skipped" and decision["weight"] == 0.0 and len(decision["tries"]) == 2

    # a merge that forgets s0 at full weight but not at half: shrunk
    def forgetting(weights, names):
        w = float(weights["w.weight"][0, 0])
        return {"s1": 50.0 - 10.0 * w, "s0": 20.0 + w * w}  # s0 rises 4 at w = 2, 1 at w = 1

    cfg = make_config({"merge-gate": "validate", "gate-max-regression": 1.5, "gate-fallback": "shrink"})
    decision = gate_merge(
        cfg, adapter_state(1.0), SimpleNamespace(stage=1, round=0), ["s0", "s1"], 2.0, forgetting
    )
    assert decision["decision"] == "merged-shrunk" and decision["weight"] == 0.5
    assert [t["passed"] for t in decision["tries"]] == [False, True]


def test_a_shrunk_merge_is_half_the_update_and_a_discard_drops_it():
    state = adapter_state(1.0)
    assert float(state.candidate(2.0, "product", 1.0)["w.weight"][0, 0]) == 2.0
    assert state.adapter is not None and float(state.base["w.weight"][0, 0]) == 0.0  # left as it was
    state.merge(2.0, "product", commit=True, weight=0.5)
    assert float(state.base["w.weight"][0, 0]) == 1.0 and state.adapter is None
    state = adapter_state(1.0)
    state.discard()
    assert (
        state.adapter is None
        and state.pool == []
        and torch.equal(state.weights["w.weight"], torch.zeros(2, 2))
    )


# ---- validation rows and drills --------------------------------------------------------------------
def test_validation_rows_are_a_fixed_share_whatever_the_order():
    train, val = validation_split(rows(40), 0.1)
    assert len(val) == 4 and len(train) == 36 and not {u.id for u in val} & {u.id for u in train}
    again_train, again_val = validation_split(list(reversed(rows(40))), 0.1)
    assert {u.id for u in again_val} == {u.id for u in val}
    assert len(validation_split(rows(3), 0.1)[1]) == 1 and validation_split(rows(1), 0.1)[1] == []


def test_shuffled_transcripts_give_every_row_another_rows_text():
    data = rows(6)
    shuffled = shuffle_transcripts(data, seed=3)
    assert sorted(u.text for u in shuffled) == sorted(u.text for u in data)
    assert all(a.text != b.text for a, b in zip(data, shuffled)) and [u.id for u in shuffled] == [
        u.id for u in data
    ]
    assert shuffle_transcripts(data, seed=3) == shuffled  # seeded
    assert faulty_rows("b", 1, data, "shuffle-transcripts:b", 3) == shuffled
    assert faulty_rows("a", 1, data, "shuffle-transcripts:b", 3) == data
    with pytest.raises(ValueError, match="drill='mute:b': expected '<fault>:<site>'"):
        parse_drill("mute:b")


def test_gate_keys_are_checked_naming_the_key():
    with pytest.raises(ValueError, match="merge-gate='always'; choose one of none, validate"):
        make_config({"merge-gate": "always"})
    with pytest.raises(ValueError, match="gate-sites='alone' needs merge-gate='validate'"):
        make_config({"gate-sites": "alone"})
    with pytest.raises(ValueError, match="strategy='fedavg' has none"):
        make_config({"merge-gate": "validate", "strategy": "fedavg"})
    with pytest.raises(ValueError, match="would send them that site's own update"):
        make_config({"merge-gate": "validate", "gate-sites": "alone", "evaluation": "federated"})
    with pytest.raises(ValueError, match="validation-share=0.7"):
        make_config({"merge-gate": "validate", "validation-share": 0.7})
    # gate knobs do not change a run that has no gate (the same name as without them)
    assert make_config({"gate-min-gain": 3.0}).default_run_name() == make_config({}).default_run_name()


# ---- the history ---------------------------------------------------------------------------------------
def test_a_step_undoes_bit_for_bit_and_stores_whole_what_float64_cannot_hold():
    before = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([1e-30, 1.0]), "c": torch.ones(2)}
    after = {"a": torch.tensor([1.5, 2.0, -3.0]), "b": torch.tensor([1.0, 1.0]), "c": before["c"]}
    tensors = change(before, after)
    assert sorted(tensors) == ["after/b", "before/b", "delta/a"]  # c unchanged; b: 1 - 1e-30 is not exact
    assert tensors["delta/a"].dtype == torch.float64 and tensors["delta/a"].tolist() == [0.5, 0.0, -6.0]
    restored = undo(after, tensors)
    assert all(torch.equal(restored[k], before[k]) for k in before)


def test_contributions_are_the_rounds_since_the_last_decision():
    rounds = [
        {"server_round": 1, "clients_used": ["a", "b"], "weights": [0.25, 0.75]},
        {"server_round": 2, "clients_used": ["a"]},
    ]
    assert contributions(rounds, since=1) == [{"server_round": 2, "sites": ["a"], "weights": [1.0]}]
    assert contributions(rounds, since=0)[0]["weights"] == [0.25, 0.75]


def test_the_history_refuses_a_step_that_does_not_follow_it(tmp_path):
    history = MergeHistory(tmp_path)
    w0 = {"w": torch.zeros(2)}
    w1 = {"w": torch.ones(2)}
    history.start(state_checksum(w0))
    history.record(
        w0, w1, (state_checksum(w0), state_checksum(w1)), {"server_round": 1, "stage": 0, "round": 0}
    )
    with pytest.raises(ValueError, match="the merge starts from base"):
        history.record(
            w0, w1, (state_checksum(w0), state_checksum(w1)), {"server_round": 2, "stage": 1, "round": 0}
        )
    # a resumed attempt at the same round replaces the step it made before
    history.record(
        w0, w1, (state_checksum(w0), state_checksum(w1)), {"server_round": 1, "stage": 0, "round": 0}
    )
    assert [s["step"] for s in history.load()["steps"]] == [0, 1]
    assert torch.equal(history.base_at(0, w1, state_checksum(w1), state_checksum)["w"], w0["w"])
