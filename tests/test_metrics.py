"""WER/CER scoring and the continual-learning metrics, checked against numbers worked out by hand."""

import json
import math

import pytest

from cl_fed.metrics import ErrorCounts, cer, continual_metrics, error_counts, intransigence, wer
from cl_fed.results import Evaluation, RunRecord

# ---- scoring -------------------------------------------------------------------------------------

REFS = ["the cat sat", "Hello, World!"]
HYPS = ["The cat SIT down.", ""]


def test_error_counts_by_hand():
    # pair 0: "the cat sat" -> "the cat sit down": 1 substitution (sat/sit), 1 insertion (down)
    # pair 1: "hello world" -> "": 2 deletions
    counts = error_counts(REFS, HYPS)
    assert counts == ErrorCounts(substitutions=1, deletions=2, insertions=1, reference_length=5, unit="word")


def test_wer_by_hand():
    assert wer(REFS, HYPS) == pytest.approx(100.0 * 4 / 5)


def test_cer_by_hand():
    # "the cat sat" (11 chars) -> "the cat sit down": a->i plus 5 inserted chars " down" = 6 edits
    # "hello world" (11 chars) -> "": 11 deletions; total 17 edits over 22 reference characters
    assert cer(REFS, HYPS) == pytest.approx(100.0 * 17 / 22)
    counts = error_counts(REFS, HYPS, unit="char")
    assert counts.reference_length == 22
    assert counts.substitutions + counts.deletions + counts.insertions == 17


def test_normalisation_applies_to_both_sides():
    assert wer(["Hello, World!"], ["hello   world"]) == 0.0
    assert cer(["It's  FINE."], ["it's fine"]) == 0.0


def test_counts_add_up_over_shards():
    whole = error_counts(REFS, HYPS)
    parts = error_counts(REFS[:1], HYPS[:1]) + error_counts(REFS[1:], HYPS[1:])
    assert parts == whole
    assert parts.rate == pytest.approx(wer(REFS, HYPS))
    with pytest.raises(ValueError, match="char"):
        _ = whole + error_counts(REFS, HYPS, unit="char")


def test_empty_reference_is_an_error_naming_the_index():
    with pytest.raises(ValueError, match=r"reference 1 .*'\?!'"):
        wer(["ok", "?!"], ["ok", "x"])


def test_bad_scoring_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no references"):
        wer([], [])
    with pytest.raises(TypeError, match="pair 0"):
        wer(["a"], [None])
    with pytest.raises(ValueError, match="unknown unit 'phone'"):
        error_counts(["a"], ["a"], unit="phone")


# ---- continual metrics ---------------------------------------------------------------------------

# R[i][j]: WER on stage j after training through stage i.
R = [
    [20.0, 60.0, 70.0],
    [15.0, 25.0, 65.0],
    [40.0, 35.0, 30.0],
]
INITIAL = [50.0, 80.0, 90.0]
JOINT = [18.0, 22.0, 28.0]
SINGLE_TASK = [22.0, 24.0, 33.0]


def test_continual_metrics_by_hand():
    m = continual_metrics(R, initial=INITIAL, joint=JOINT)
    assert m["awer"] == pytest.approx((40 + 35 + 30) / 3)  # last row
    assert m["new_stage_wer"] == pytest.approx((20 + 25 + 30) / 3)  # diagonal
    assert m["bwt"] == pytest.approx(((20 - 40) + (25 - 35)) / 2)  # -15: forgetting
    # forgetting: stage 0 best was 15 (after stage 1), now 40 -> 25; stage 1 best 25, now 35 -> 10
    assert m["forgetting"] == pytest.approx((25 + 10) / 2)
    # fwt from the initial base: stage 1 went 80 -> 60 before training on it, stage 2 90 -> 65
    assert m["fwt"] == pytest.approx(((80 - 60) + (90 - 65)) / 2)
    assert m["intransigence"] == pytest.approx(((20 - 18) + (25 - 22) + (30 - 28)) / 3)


def test_fwt_prefers_single_task_reference():
    m = continual_metrics(R, initial=INITIAL, single_task=SINGLE_TASK)
    assert m["fwt"] == pytest.approx(((22 - 20) + (24 - 25) + (33 - 30)) / 3)
    assert m["fwt_definition"] == "single-task"


def test_fwt_definition_says_which_fwt():
    assert continual_metrics(R, initial=INITIAL)["fwt_definition"] == "initial"
    assert continual_metrics(R, single_task=SINGLE_TASK)["fwt_definition"] == "single-task"
    assert continual_metrics(R)["fwt_definition"] is None
    # one stage: FWT from the initial base needs a stage before, so it is undefined, and so is its definition
    one = continual_metrics([[12.5]], initial=[40.0])
    assert one["fwt"] is None and one["fwt_definition"] is None
    assert continual_metrics([[12.5]], single_task=[20.0])["fwt_definition"] == "single-task"


def test_intransigence_on_a_hand_matrix():
    # diagonal 30, 20: stage 0 learnt 30 vs joint 25 (+5 worse), stage 1 20 vs joint 24 (4 better)
    small = [[30.0, 90.0], [45.0, 20.0]]
    assert intransigence(small, [25.0, 24.0]) == pytest.approx((5 + -4) / 2)
    assert continual_metrics(small, joint=[25.0, 24.0])["intransigence"] == pytest.approx(0.5)
    assert intransigence(R, JOINT) == pytest.approx((2 + 3 + 2) / 3)
    with pytest.raises(ValueError, match="joint has 1 entries, expected 2"):
        intransigence(small, [25.0])


def test_optional_metrics_are_none_without_references():
    m = continual_metrics(R)
    assert m["fwt"] is None and m["intransigence"] is None
    assert set(m) == {"awer", "new_stage_wer", "bwt", "forgetting", "fwt", "fwt_definition", "intransigence"}


def test_single_stage():
    m = continual_metrics([[12.5]], initial=[40.0], joint=[10.0])
    assert m["awer"] == 12.5 and m["new_stage_wer"] == 12.5
    assert m["bwt"] is None and m["forgetting"] is None and m["fwt"] is None
    assert m["intransigence"] == pytest.approx(2.5)


def test_no_forgetting_gives_zero():
    flat = [[10.0, 50.0], [10.0, 20.0]]
    m = continual_metrics(flat)
    assert m["bwt"] == 0.0 and m["forgetting"] == 0.0


@pytest.mark.parametrize(
    "matrix, message",
    [
        ([], "empty"),
        ([[1.0, 2.0]], r"R\[0\] has 2 entries, expected 1"),
        ([[1.0, 2.0], [3.0]], r"R\[1\] has 1 entries, expected 2"),
        ([[1.0, math.nan], [3.0, 4.0]], r"R\[0\]\[1\] = nan"),
        ([[1.0, 2.0], [3.0, math.inf]], r"R\[1\]\[1\] = inf"),
        ([[1.0, "x"], [3.0, 4.0]], r"R\[0\]\[1\] = 'x' is not a number"),
    ],
)
def test_bad_results_matrix(matrix, message):
    with pytest.raises(ValueError, match=message):
        continual_metrics(matrix)


def test_bad_reference_vectors():
    with pytest.raises(ValueError, match="initial has 2 entries, expected 3"):
        continual_metrics(R, initial=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"joint\[2\] = nan"):
        continual_metrics(R, joint=[1.0, 2.0, math.nan])


# ---- the metrics a RunRecord writes into results.json --------------------------------------------

STAGES = ["s0", "s1", "s2"]


def record(matrix=R, initial=INITIAL, **references) -> RunRecord:
    def evaluation(label, row):
        wers = dict(zip(STAGES, row))
        return Evaluation(label, wers, {k: v / 2 for k, v in wers.items()}, [])

    return RunRecord(
        run_name="toy-centralization-seed0",
        strategy="centralization",
        schedule={"centralize_every": 1},
        config={"scenario": "toy", "seed": 0},
        stages=STAGES,
        initial=evaluation("initial", initial) if initial else None,
        after_stage=[evaluation(stage, row) for stage, row in zip(STAGES, matrix)],
        **references,
    )


def test_results_record_the_fwt_definition_both_ways():
    plain = record().to_json()
    assert plain["metrics"]["fwt_definition"] == "initial"
    assert plain["metrics"]["fwt"] == pytest.approx(((80 - 60) + (90 - 65)) / 2)
    assert plain["single_task_wer"] is None and plain["joint_wer"] is None
    single = record(single_task_wer=SINGLE_TASK).to_json()
    assert single["metrics"]["fwt_definition"] == "single-task"
    assert single["metrics"]["fwt"] == pytest.approx(((22 - 20) + (24 - 25) + (33 - 30)) / 3)
    assert single["single_task_wer"] == SINGLE_TASK
    none = record(initial=None).to_json()
    assert none["metrics"]["fwt"] is None and none["metrics"]["fwt_definition"] is None


def test_results_carry_intransigence_given_a_joint_reference(tmp_path):
    assert record().to_json()["metrics"]["intransigence"] is None
    by_name = dict(zip(STAGES, JOINT))
    for reference in (JOINT, by_name):  # in stage order, or keyed by stage name
        data = record(joint_wer=reference).to_json()
        assert data["metrics"]["intransigence"] == pytest.approx((2 + 3 + 2) / 3)
        assert data["joint_wer"] == JOINT
    path = record(joint_wer=JOINT).write(tmp_path / "run")
    written = json.loads(path.read_text())
    assert written["metrics"] == continual_metrics(R, initial=INITIAL, joint=JOINT)
    assert "Intransigence" in (tmp_path / "run" / "report.md").read_text()


def test_bad_joint_reference():
    with pytest.raises(ValueError, match="joint_wer has 2 entries for 3 stages"):
        record(joint_wer=[1.0, 2.0]).to_json()
    with pytest.raises(ValueError, match=r"joint_wer has no WER for stage\(s\) \['s2'\]"):
        record(joint_wer={"s0": 1.0, "s1": 2.0}).to_json()
    # a joint test set nobody could score: intransigence undefined, the other metrics kept
    m = record(joint_wer=[18.0, math.nan, 28.0]).to_json()["metrics"]
    assert m["intransigence"] is None and m["awer"] == pytest.approx(35.0)


def test_joint_run_metrics_have_every_key():
    joint = RunRecord(
        run_name="toy-joint-seed0",
        strategy="joint",
        schedule={"mode": "joint"},
        config={"scenario": "toy", "seed": 0},
        stages=STAGES,
        after_stage=[Evaluation("joint", dict(zip(STAGES, JOINT)), dict(zip(STAGES, JOINT)), [])],
        joint_wer=JOINT,
    ).to_json()
    assert set(joint["metrics"]) == set(continual_metrics(R))
    assert joint["metrics"]["awer"] == pytest.approx(68 / 3)
    assert joint["metrics"]["fwt_definition"] is None and joint["metrics"]["intransigence"] is None
