"""`lora-aggregation`: the federated-LoRA rules (exact, fedex, fedit, ffa, fedsa) against hand-computed
values, their place in the plan and the config, and real in-process federations of the tiny scenario
(the ServerApp loop with the real ClientApp handlers, tests/loopback.py)."""

from __future__ import annotations

import json

import pytest
import torch
from loopback import (
    one_thread_and_task_identity,  # noqa: F401  (autouse fixture)
    run_in_process,
)

from cl_fed.adapters import fresh_factors
from cl_fed.aggregation import aggregate, personal, sent_factors, with_frozen_factors
from cl_fed.config import make_config
from cl_fed.io import load_tensors
from cl_fed.plan import Aggregate, Merge, Train, adapter_seed, continual_plan
from cl_fed.run import run_single_site
from cl_fed.state import ContinualState
from clients.site import state_dir
from server.strategies import FedSA, build_strategy, load_optimizer_state, optimizer_state

A = torch.tensor([[1.0, 2.0]])  # rank 1, in 2


def test_ffa_mean_of_b_is_the_exact_mean_update_hand_computed():
    sites = [
        {"l.lora_A": A.clone(), "l.lora_B": torch.tensor([[1.0], [0.0]])},
        {"l.lora_A": A.clone(), "l.lora_B": torch.tensor([[0.0], [2.0]])},
    ]
    out = aggregate("ffa", sites, [0.25, 0.75], scale=2.0)
    assert set(out) == {"l.lora_A", "l.lora_B"}  # no residual: nothing to fold
    assert torch.equal(out["l.lora_A"], A)
    assert torch.equal(out["l.lora_B"], torch.tensor([[0.25], [1.5]]))
    # sum_i p_i B_i A = .25 [[1, 2], [0, 0]] + .75 [[0, 0], [2, 4]] = [[.25, .5], [1.5, 3]] = B_bar A
    assert torch.equal(out["l.lora_B"] @ out["l.lora_A"], torch.tensor([[0.25, 0.5], [1.5, 3.0]]))
    trained_a = [sites[0], {**sites[1], "l.lora_A": A + 1}]
    with pytest.raises(ValueError, match="adapter 1 has another l.lora_A"):
        aggregate("ffa", trained_a, [0.5, 0.5], 2.0)


def test_ffa_sends_b_only_and_completes_it_with_the_frozen_a():
    adapter = {"l.lora_A": A, "l.lora_B": torch.ones(2, 1)}
    assert set(sent_factors("ffa", adapter)) == {"l.lora_B"}
    assert set(sent_factors("exact", adapter)) == {"l.lora_A", "l.lora_B"}
    completed = with_frozen_factors("ffa", {"l.lora_B": torch.zeros(2, 1)}, adapter)
    assert torch.equal(completed["l.lora_A"], A) and not completed["l.lora_B"].any()
    with pytest.raises(ValueError, match="A is frozen and never sent, got l.lora_A"):
        with_frozen_factors("ffa", adapter, adapter)
    with pytest.raises(ValueError, match="no frozen A for l.lora_A"):
        with_frozen_factors("ffa", {"l.lora_B": torch.ones(2, 1)}, {})
    assert with_frozen_factors("ffa", {}, adapter) == {}  # a `local` site sends nothing


def test_fedsa_averages_a_only_and_each_site_keeps_its_b_hand_computed():
    sites = [{"l.lora_A": torch.tensor([[1.0, 2.0]])}, {"l.lora_A": torch.tensor([[3.0, -2.0]])}]
    out = aggregate("fedsa", sites, [0.25, 0.75], scale=2.0)
    assert set(out) == {"l.lora_A"}
    assert torch.equal(out["l.lora_A"], torch.tensor([[2.5, -1.0]]))  # .25 [1, 2] + .75 [3, -2]
    own = {"l.lora_A": torch.tensor([[9.0, 9.0]]), "l.lora_B": torch.tensor([[1.0], [4.0]])}
    mine = personal(out, own)
    assert torch.equal(mine["l.lora_A"], out["l.lora_A"]) and torch.equal(mine["l.lora_B"], own["l.lora_B"])
    assert set(sent_factors("fedsa", own)) == {"l.lora_A"}  # B never leaves the site
    with pytest.raises(ValueError, match="fedsa: adapter 1 sent l.lora_B; B stays at the site"):
        aggregate("fedsa", [sites[0], own], [0.5, 0.5], 2.0)
    with pytest.raises(ValueError, match="the shared A lacks l.lora_A"):
        personal({}, own)


def two_sites(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"l.lora_A": torch.randn(2, 3, generator=g), "l.lora_B": torch.randn(4, 2, generator=g)}
        for _ in range(2)
    ]


def stage_parts(sites, p, scale):
    """(exact mean update, residual, adapter product) of one stage's round, in float64, by hand."""
    exact = scale * sum(pi * s["l.lora_B"].double() @ s["l.lora_A"].double() for pi, s in zip(p, sites))
    a_bar = sum(pi * s["l.lora_A"] for pi, s in zip(p, sites)).double()
    b_bar = sum(pi * s["l.lora_B"] for pi, s in zip(p, sites)).double()
    product = scale * b_bar @ a_bar
    return exact, exact - product, product


def pooled_base(rule: str, scale=2.0, p=(0.25, 0.75)):
    """Two stages of one round each, pooled and committed at the second (centralize-every=2)."""
    state = ContinualState.start({"l.weight": torch.zeros(4, 3, dtype=torch.float64)})
    for stage, seed in enumerate((1, 2)):
        state.apply(rule, aggregate(rule, two_sites(seed), list(p), scale))
        state.merge(scale, "product", commit=stage == 1, residual_to_base=rule == "fedex")
    return state.base["l.weight"]


def test_fedex_puts_residuals_into_the_base_and_pools_only_the_adapters_hand_computed():
    scale, p = 2.0, [0.25, 0.75]
    (u1, r1, m1), (u2, r2, m2) = (stage_parts(two_sites(s), p, scale) for s in (1, 2))
    # exact: each stage's whole update is a chunk, the pool's average is merged
    assert torch.allclose(pooled_base("exact"), (u1 + u2) / 2, rtol=0, atol=1e-12)
    # fedex: the residuals stay whole, only the adapters' products are averaged (the factor means are
    # kept in float32, as trained, so the product part agrees to float32 rounding)
    assert torch.allclose(pooled_base("fedex"), r1 + r2 + (m1 + m2) / 2, rtol=0, atol=1e-5)
    assert (r1 + r2).abs().max() > 1e-3  # so the two really differ


def test_with_a_pool_of_one_fedex_and_exact_are_the_same_base_bit_for_bit():
    bases = []
    for rule in ("exact", "fedex"):
        state = ContinualState.start({"l.weight": torch.zeros(4, 3)})
        for seed in (1, 2):
            state.apply(rule, aggregate(rule, two_sites(seed), [0.5, 0.5], 2.0))
            state.merge(2.0, "product", commit=True, residual_to_base=rule == "fedex")
        bases.append(state.base["l.weight"])
    assert torch.equal(*bases)


def test_the_plan_carries_the_rule_and_fedex_merges():
    stages = ["s0", "s1", "s2", "s3"]
    for rule in ("exact", "fedex", "fedit", "ffa"):
        plan = continual_plan(make_config({"lora-aggregation": rule, "centralize-every": 2}), stages)
        assert {s.rule for s in plan if isinstance(s, Aggregate)} == {rule}
        assert {m.residual_to_base for m in plan if isinstance(m, Merge)} == {rule == "fedex"}
    factors = continual_plan(make_config({"merge": "factors"}), stages)
    assert {s.rule for s in factors if isinstance(s, Aggregate)} == {"fedit"}
    plan = continual_plan(make_config({"rounds-per-stage": 3}), stages)
    trains = [s for s in plan if isinstance(s, Train)]
    assert [adapter_seed(plan, t) for t in trains[:4]] == [trains[0].seed] * 3 + [trains[3].seed]


def test_config_names_the_rule_and_refuses_combinations_that_make_no_sense():
    assert "lora-aggregationffa" in make_config({"lora-aggregation": "ffa"}).default_run_name()
    assert "lora-aggregation" not in make_config({"lora-aggregation": "exact"}).default_run_name()
    # strategies that do not use the key keep their names (and their committed results)
    for strategy in ("fedavg", "fedavg-lora"):
        cfg = make_config({"strategy": strategy, "lora-aggregation": "ffa"})
        assert "lora-aggregation" not in cfg.default_run_name()
    with pytest.raises(ValueError, match="lora-aggregation='nope'; choose one of"):
        make_config({"lora-aggregation": "nope"})
    with pytest.raises(ValueError, match="lora-aggregation='ffa' with merge='factors'"):
        make_config({"lora-aggregation": "ffa", "merge": "factors"})
    with pytest.raises(ValueError, match="lora-aggregation='ffa' with merge='factors'"):  # as DP needs
        make_config({"lora-aggregation": "ffa", "dp-noise": 1.0, "merge": "factors", "weighting": "uniform"})
    with pytest.raises(ValueError, match="aggregation='median'"):
        make_config({"lora-aggregation": "ffa", "aggregation": "median"})
    with pytest.raises(ValueError, match="centralize-every=3"):
        make_config({"lora-aggregation": "fedex", "merge-gate": "validate", "centralize-every": 3})
    assert make_config({"lora-aggregation": "fedsa"}).site_models
    assert not make_config(
        {"lora-aggregation": "fedsa", "merge": "factors", "strategy": "fedavg-lora"}
    ).site_models
    for key, value in (
        ("strategy", "local"),
        ("merge-gate", "validate"),
        ("aggregation", "median"),
        ("server-optimizer", "adam"),
        ("fraction-train", 0.5),
    ):
        with pytest.raises(ValueError, match=f"lora-aggregation='fedsa' with {key}="):
            make_config({"lora-aggregation": "fedsa", key: value})


# ---- real federations of the tiny scenario -----------------------------------------------------
def tiny(tmp_path, rule: str, nodes: int = 2, **overrides) -> tuple[dict, object]:
    run_config = {
        "scenario": "tiny",
        "rounds-per-stage": 2,
        "lora-aggregation": rule,
        "output-dir": str(tmp_path / rule),
        **overrides,
    }
    run_dir, _ = run_in_process(run_config, sites=nodes)
    return json.loads((run_dir / "results.json").read_text()), run_dir


def test_ffa_federation_trains_b_only_half_the_traffic_and_merges_in_the_frozen_a_row_space(tmp_path):
    exact, _ = tiny(tmp_path, "exact")
    ffa, ffa_dir = tiny(tmp_path, "ffa")
    assert ffa["complete"] and all(len(r["clients_used"]) == 2 for r in ffa["rounds"])
    # up: B only, and the tiny model's A and B hold equally many numbers (so exactly half)
    assert [r["bytes_up"] for r in ffa["rounds"]] == [r["bytes_up"] // 2 for r in exact["rounds"]]
    assert ffa["bytes_up"] * 2 == exact["bytes_up"]
    # down: a continuing round sends B only and nothing else (no residual to sync within a stage)
    continuing = [r for r in ffa["rounds"] if r["round"] > 0]
    assert continuing and all(r["bytes_down"] == r["bytes_up"] for r in continuing)
    assert ffa["bytes_down"] < exact["bytes_down"]
    # every merged delta is s * B_bar A with the frozen A of the stage's first round: its rows lie in
    # A's row space (exact's, the sum of two sites' different adapters, do not)
    cfg = make_config({"scenario": "tiny", "rounds-per-stage": 2, "lora-aggregation": "ffa"})
    plan = continual_plan(cfg, ffa["stages"])
    steps = json.loads((ffa_dir / "history" / "history.json").read_text())["steps"][1:]
    for number, step in enumerate(steps, start=1):
        first = next(t for t in plan if isinstance(t, Train) and t.stage == step["stage"])
        tensors, _ = load_tensors(ffa_dir / "history" / f"step-{number:03d}.safetensors")
        deltas = {k[len("delta/") :]: v for k, v in tensors.items() if k.startswith("delta/")}
        assert deltas, "the merge changed nothing"
        shapes = {k[: -len(".weight")] + ".lora_A": (32, v.shape[1]) for k, v in deltas.items()}
        frozen = fresh_factors(shapes, first.seed)
        for key, delta in deltas.items():
            a = frozen[key[: -len(".weight")] + ".lora_A"].double()
            projector = a.T @ torch.linalg.solve(a @ a.T, a)  # onto A's row space
            leftover = delta - delta @ projector
            assert leftover.abs().max() <= 1e-5 * max(delta.abs().max().item(), 1e-12), key


def test_one_site_federation_equals_the_single_site_runner_for_ffa_and_fedex(tmp_path):
    for rule in ("ffa", "fedex"):
        overrides = {"sites": 1, "centralize-every": "2"}
        fed, _ = tiny(tmp_path, rule, nodes=1, **overrides)
        cfg = make_config(
            {
                "scenario": "tiny",
                "rounds-per-stage": 2,
                "lora-aggregation": rule,
                "output-dir": str(tmp_path / f"{rule}-single"),
                **overrides,
            }
        )
        one = json.loads((run_single_site(cfg, "factory-a", progress=False) / "results.json").read_text())
        assert fed["base_checksum"] == one["base_checksum"]
        assert [r["loss"] for r in fed["rounds"]] == [r["loss"] for r in one["rounds"]]


def test_fedex_and_exact_federations_differ_when_the_pool_averages(tmp_path):
    # (with a pool of one they are the same base bit for bit: tested on the state above)
    exact, fedex = (tiny(tmp_path, rule, **{"centralize-every": "2"})[0] for rule in ("exact", "fedex"))
    assert fedex["complete"] and exact["wer_matrix"] and fedex["wer_matrix"]
    assert exact["base_checksum"] != fedex["base_checksum"]
    steps = json.loads((tmp_path / "fedex").glob("*/history/history.json").__next__().read_text())["steps"]
    assert [s.get("part") for s in steps[1:]] == ["residuals", None]  # stage 1's residuals, then the merge


def test_fedsa_federation_shares_a_keeps_b_and_reports_every_site(tmp_path):
    exact, _ = tiny(tmp_path, "exact", **{"centralize-every": "round"})
    fedsa, fedsa_dir = tiny(tmp_path, "fedsa", **{"centralize-every": "round"})
    assert fedsa["complete"] and all(len(r["clients_used"]) == 2 for r in fedsa["rounds"])
    # up: A only (the tiny model's A and B hold equally many numbers): half of exact's, every round
    assert [r["bytes_up"] for r in fedsa["rounds"]] == [r["bytes_up"] // 2 for r in exact["rounds"]]
    # down: the starting base went out once, with the first evaluation; then the first round sends
    # nothing (A is drawn from the seed), every later one the mean A, never a B or a merged base
    assert fedsa["rounds"][0]["bytes_down"] == 0
    assert all(r["bytes_down"] == r["bytes_up"] for r in fedsa["rounds"][1:])
    # the server merges nothing: the sites hold the models, each scored on its own share
    assert fedsa["base_checksum"] != exact["base_checksum"]
    sites = fedsa["sites"]["by_site"]
    assert sorted(sites) == ["factory-a", "factory-b"]
    assert all(len(part["wer_matrix"]) == len(fedsa["stages"]) for part in sites.values())
    assert fedsa["sites"]["site_mean"] is not None and fedsa["metrics"] is not None
    assert "sites" not in exact  # the server scored its one shared model on the whole test sets
    # each site merged its own B into a base of its own: two different models, neither the start
    bases = []
    for site in ("factory-a", "factory-b"):
        tensors, meta = load_tensors(state_dir(fedsa_dir, site) / "state.safetensors")
        assert not meta["pending"]  # the last round's merge was completed at the last evaluation
        bases.append({k[len("base/") :]: v for k, v in tensors.items() if k.startswith("base/")})
    changed = [k for k in bases[0] if not torch.equal(bases[0][k], bases[1][k])]
    assert changed and all(k.endswith(".weight") for k in changed)


def test_fedsa_strategy_keeps_the_mean_a_in_its_checkpoint_state():
    cfg = make_config({"lora-aggregation": "fedsa"})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FedSA) and not optimizer_state(strategy)
    strategy.shared, strategy.shared_round = {"l.lora_A": torch.ones(2, 3)}, 4
    saved = optimizer_state(strategy)
    again = build_strategy(cfg)
    load_optimizer_state(again, saved)
    assert again.shared_round == 4 and torch.equal(again.shared["l.lora_A"], torch.ones(2, 3))
    assert not isinstance(build_strategy(make_config({})), FedSA)


def test_one_site_fedsa_federation_trains_as_the_single_site_runner(tmp_path):
    overrides = {"sites": 1, "centralize-every": "2"}
    fed, _ = tiny(tmp_path, "fedsa", nodes=1, **overrides)
    cfg = make_config(
        {
            "scenario": "tiny",
            "rounds-per-stage": 2,
            "lora-aggregation": "fedsa",
            "output-dir": str(tmp_path / "fedsa-single"),
            **overrides,
        }
    )
    one = json.loads((run_single_site(cfg, "factory-a", progress=False) / "results.json").read_text())
    assert [r["loss"] for r in fed["rounds"]] == [r["loss"] for r in one["rounds"]]
    # the site's own model is the single-site runner's (scored on the same rows)
    assert fed["sites"]["by_site"]["factory-a"]["wer_matrix"] == one["wer_matrix"]
