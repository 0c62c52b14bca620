"""Flower's own strategies composed with ours (server/strategies.py build_strategy), not re-implemented:
`server-optimizer` adam | yogi | adagrad | avgm (FedAdam, FedYogi, FedAdagrad, FedAvgM) on the
aggregated update before it is applied, and `proximal-mu` (Flower's FedProx sends it; the sites add
the proximal term, cl_fed/train.py).

Pure parts against hand-computed values (the proximal term and its gradient, FedAvgM's momentum on
our aggregate's keys), then each option through a real in-process federation of the tiny scenario
(the real ServerApp loop and ClientApp handlers, tests/loopback.py), and an avgm run resumed after a
server crash ends as an uninterrupted one. The real `flwr run` case is in tests/test_flower_e2e.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedProx, FedYogi
from loopback import (
    one_thread_and_task_identity,  # noqa: F401  (autouse fixture)
    run_in_process,
)

from cl_fed import protocol as P
from cl_fed.adapters import LoraSpec, attach_lora
from cl_fed.aggregation import RESIDUAL, aggregate, with_zero_residual
from cl_fed.centralize import example_weights
from cl_fed.config import make_config
from cl_fed.models.registry import load_model
from cl_fed.models.tiny import build_tiny
from cl_fed.train import add_proximal_grad_, proximal_term, train_local
from server.checkpoint import CHECKPOINT
from server.strategies import (
    ContinualStrategy,
    RoundStartFedAvgM,
    build_strategy,
    load_optimizer_state,
    optimizer_state,
)
from tests.loopback import in_memory_grid
from tests.test_flower_units import make_strategy, random_adapter, reply, send, tiny, train_steps  # noqa: F401
from tests.test_train import SMALL, quick, utterances  # noqa: F401  (fixture)


# ---- configuration ---------------------------------------------------------------------------------
def test_old_spellings_and_default_step_sizes_have_one_spelling():
    assert make_config({"server-optimizer": "fedadam"}).server_optimizer == "adam"
    assert make_config({"server-optimizer": "FedAvgM"}).server_optimizer == "avgm"
    # server-lr 0 = the optimiser's default; that default spelled out is the same run
    adam, spelled = (
        make_config({"server-optimizer": "adam"}),
        make_config({"server-optimizer": "fedadam", "server-lr": 1e-3}),
    )
    assert (
        adam == spelled
        and adam.server_step() == 1e-3
        and adam.default_run_name() == spelled.default_run_name()
    )
    avgm = make_config({"server-optimizer": "avgm"})
    assert avgm.server_step() == 1.0 and make_config({"server-optimizer": "avgm", "server-lr": 1.0}) == avgm
    assert "server-momentum" not in make_config({"server-momentum": 0.5}).default_run_name()  # avgm only
    assert (
        "server-momentum0.5"
        in make_config({"server-optimizer": "avgm", "server-momentum": 0.5}).default_run_name()
    )
    assert "proximal-mu0.01" in make_config({"proximal-mu": 0.01}).default_run_name()


@pytest.mark.parametrize(
    "override, words",
    [
        ({"server-optimizer": "sgd"}, ["server-optimizer", "'sgd'", "avgm"]),
        ({"server-lr": -1}, ["server-lr", "-1"]),
        ({"server-momentum": 1.0}, ["server-momentum", "1.0"]),
        ({"proximal-mu": -0.1}, ["proximal-mu", "-0.1"]),
        ({"proximal-mu": 0.1, "strategy": "local"}, ["proximal-mu", "local"]),
        ({"server-optimizer": "avgm", "strategy": "fedavg"}, ["server-optimizer", "fedavg", "BatchNorm"]),
        ({"server-optimizer": "avgm", "strategy": "local"}, ["server-optimizer", "local"]),
    ],
)
def test_bad_server_options_name_key_and_value(override, words):
    with pytest.raises(ValueError) as err:
        make_config(override)
    for word in words:
        assert word in str(err.value)


def test_flower_classes_are_composed_with_their_settings():
    cases = {"adam": FedAdam, "yogi": FedYogi, "adagrad": FedAdagrad, "avgm": FedAvgM}
    for name, flower in cases.items():
        strategy = build_strategy(make_config({"server-optimizer": name, "proximal-mu": 0.25}))
        assert isinstance(strategy, flower) and isinstance(strategy, FedProx)
        assert isinstance(strategy, ContinualStrategy) and strategy.proximal_mu == 0.25
        mro = type(strategy).__mro__
        assert mro.index(FedProx) < mro.index(flower) < mro.index(ContinualStrategy)
    assert build_strategy(make_config({"server-optimizer": "yogi"})).eta == 1e-3  # not Flower's 1e-2
    assert build_strategy(make_config({"server-optimizer": "adam", "server-lr": 0.02})).eta == 0.02
    assert build_strategy(make_config({"server-optimizer": "adam"})).beta_1 == 0.9  # FedAdam's own default
    avgm = build_strategy(make_config({"server-optimizer": "avgm", "server-momentum": 0.5}))
    assert (avgm.server_learning_rate, avgm.server_momentum, avgm.server_opt) == (1.0, 0.5, True)
    assert not isinstance(build_strategy(make_config({})), (FedProx, FedAvgM, FedAdam))


# ---- the proximal term -----------------------------------------------------------------------------
def test_proximal_term_and_its_gradient_against_hand_computed_values():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    anchors = [torch.tensor([0.0, 0.0]), torch.tensor([[1.0]])]
    # (0.5 / 2) * ((1 - 0)^2 + (2 - 0)^2 + (3 - 1)^2) = 0.25 * 9
    assert proximal_term(params, anchors, 0.5).item() == 2.25
    assert proximal_term(params, params, 0.5).item() == 0.0
    leaves = [p.clone().requires_grad_(True) for p in params]
    leaves[0].grad = torch.tensor([10.0, 20.0])  # a data gradient already there
    add_proximal_grad_(leaves, anchors, 0.5)
    assert torch.equal(leaves[0].grad, torch.tensor([10.5, 21.0]))  # + 0.5 * (p - anchor)
    assert torch.equal(leaves[1].grad, torch.tensor([[1.0]]))
    # the gradient of the term, by autograd
    again = [p.clone().requires_grad_(True) for p in params]
    ((0.5 / 2) * sum(((p - a) ** 2).sum() for p, a in zip(again, anchors))).backward()
    assert torch.equal(again[0].grad, torch.tensor([0.5, 1.0])) and torch.equal(again[1].grad, leaves[1].grad)


def trained_update(utterances, mu: float, lora: bool) -> float:
    """||w - w_start|| over the trainable parameters after a few steps (same seed, same data)."""
    speech = build_tiny(seed=0, **SMALL)
    if lora:
        spec = LoraSpec(speech.lora_rank, speech.lora_alpha, speech.lora_dropout, speech.lora_targets)
        speech.model = attach_lora(speech.model, spec, seed=0)
    names = [n for n, p in speech.model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in speech.model.named_parameters() if p.requires_grad}
    train_local(speech, utterances, quick(max_steps=8, proximal_mu=mu))
    after = dict(speech.model.named_parameters())
    return float(sum(((after[n].detach() - before[n]) ** 2).sum() for n in names) ** 0.5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_proximal_term_keeps_the_update_smaller(utterances, lora):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        free, again = trained_update(utterances, 0.0, lora), trained_update(utterances, 0.0, lora)
        held = trained_update(utterances, 100.0, lora)
    finally:
        torch.set_num_threads(threads)
    assert free == again  # deterministic on the CPU
    assert 0 < held < 0.8 * free


# ---- FedAvgM on our aggregate ----------------------------------------------------------------------
def test_fedavgm_steps_from_each_rounds_start_and_restarts_its_momentum_with_a_fresh_adapter(tiny):
    lr, beta = 0.5, 0.5
    strategy = make_strategy(
        tiny,
        **{
            "server-optimizer": "avgm",
            "server-lr": lr,
            "server-momentum": beta,
            "rounds-per-stage": 2,
            "max-site-weight": 1.0,
        },
    )
    assert isinstance(strategy, RoundStartFedAvgM)
    grid, _ = in_memory_grid(2)
    steps = train_steps(strategy.cfg)
    assert [s.start for s in steps[:3]] == ["fresh", "continue", "fresh"]
    scale = tiny["spec"].scale

    def round_of(step, adapter, seeds):
        start = with_zero_residual(adapter, tiny["base"])
        messages = send(strategy, grid, step, start)
        updates = [random_adapter(tiny["reference"], seed=s) for s in seeds]
        got, _ = strategy.aggregate_train(
            step.server_round,
            [reply(m, u, n, f"s{n}", strategy.sync.checksum) for m, u, n in zip(messages, updates, (4, 12))],
        )
        plain = aggregate("exact", updates, example_weights([4, 12]), scale)
        return start, plain, got.to_torch_state_dict()

    def close(a, b):
        return all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in b)

    # round 1 (a fresh adapter): the momentum starts as the pseudo-gradient g1 = start - aggregate
    start1, plain1, got1 = round_of(steps[0], random_adapter(tiny["reference"], 5, 0.01), (6, 7))
    assert list(got1) == list(start1)  # in the start's key order (InStartOrder)
    assert all(got1[k].dtype == start1[k].dtype for k in got1)  # fp32 factors, fp64 residuals
    assert any(k.startswith(RESIDUAL) and got1[k].dtype == torch.float64 for k in got1)
    g1 = {k: start1[k].double() - plain1[k].double() for k in start1}
    assert close(got1, {k: start1[k].double() - lr * g1[k] for k in g1})
    # round 2 continues from round 1's adapter (a zero residual again): m = beta * g1 + g2
    adapter2 = {k: v for k, v in got1.items() if not k.startswith(RESIDUAL)}
    start2, plain2, got2 = round_of(steps[1], adapter2, (8, 9))
    g2 = {k: start2[k].double() - plain2[k].double() for k in start2}
    assert close(got2, {k: start2[k].double() - lr * (beta * g1[k] + g2[k]) for k in g2})
    # the checkpoint keeps the momentum by key; a resumed strategy goes on with the same vector
    saved = optimizer_state(strategy)
    assert set(saved) == {f"momentum/{k}" for k in start2}
    resumed = make_strategy(tiny, **strategy.cfg.to_dict())
    load_optimizer_state(resumed, saved)
    send(resumed, grid, steps[1], start2)
    assert all(
        torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        for a, b in zip(resumed.momentum_vector, strategy.momentum_vector)
    )
    # a fresh adapter (the next stage, after the merge) starts a new momentum: m = g3
    start3, plain3, got3 = round_of(steps[2], random_adapter(tiny["reference"], 11, 0.01), (12, 13))
    g3 = {k: start3[k].double() - plain3[k].double() for k in start3}
    assert close(got3, {k: start3[k].double() - lr * g3[k] for k in g3})


def test_fedprox_writes_flowers_key_into_every_train_message(tiny):
    strategy = make_strategy(tiny, **{"proximal-mu": 0.01, "server-optimizer": "adam"})
    grid, _ = in_memory_grid(2)
    step = train_steps(strategy.cfg)[0]
    adapter = random_adapter(tiny["reference"], seed=5, size=0.01)
    messages = send(strategy, grid, step, with_zero_residual(adapter, tiny["base"]))
    assert len(messages) == 2 and all(m.content[P.CONFIG][P.PROXIMAL_MU] == 0.01 for m in messages)
    plain = make_strategy(tiny)
    assert all(P.PROXIMAL_MU not in m.content[P.CONFIG] for m in send(plain, grid, step, ArrayRecord()))


# ---- real federations of the tiny scenario ----------------------------------------------------------
# a tiny site's stage is one batch: 2 epochs = 2 optimizer steps a round (the proximal term's gradient is
# zero at the first step, which starts where the round was sent)
COMMON = {"scenario": "tiny", "rounds-per-stage": 2, "local-epochs": 2}
_PLAIN: dict[str, dict] = {}


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def plain_run(tmp_path_factory) -> dict:
    """The run without any Flower option, once per module."""
    if "plain" not in _PLAIN:
        run_dir, _ = run_in_process({**COMMON, "output-dir": str(tmp_path_factory.mktemp("plain"))}, sites=2)
        _PLAIN["plain"] = results(run_dir)
    return _PLAIN["plain"]


@pytest.mark.parametrize("optimizer", ["adam", "yogi", "adagrad", "avgm"])
def test_each_server_optimizer_runs_a_federation(optimizer, tmp_path, tmp_path_factory):
    run_dir, grid = run_in_process(
        {**COMMON, "server-optimizer": optimizer, "output-dir": str(tmp_path)}, sites=2
    )  # the default step sizes: 1e-3 (FedOpt's eta), 1.0 with momentum 0.9 (FedAvgM)
    got, plain = results(run_dir), plain_run(tmp_path_factory)
    assert got["complete"] and got["config"]["server-optimizer"] == optimizer
    assert all(len(r["clients_used"]) == 2 for r in got["rounds"]) and len(got["rounds"]) == 4
    assert got["base_checksum"] != plain["base_checksum"]  # the optimiser's step is not the plain aggregate
    assert (run_dir / CHECKPOINT).is_file()


def test_fedprox_runs_a_federation_and_the_sites_get_mu(tmp_path, tmp_path_factory):
    run_dir, grid = run_in_process({**COMMON, "proximal-mu": 1.0, "output-dir": str(tmp_path)}, sites=2)
    got, plain = results(run_dir), plain_run(tmp_path_factory)
    assert got["complete"] and got["config"]["proximal-mu"] == 1.0
    trains = [m for m in grid.sent if P.PROXIMAL_MU in m.content[P.CONFIG]]
    assert len(trains) == 2 * 4 and {m.content[P.CONFIG][P.PROXIMAL_MU] for m in trains} == {1.0}
    assert got["base_checksum"] != plain["base_checksum"]  # the sites trained differently


def test_avgm_run_resumed_after_a_server_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """fedavg-lora keeps one adapter, so the momentum of round 1 carries into round 2 across the crash."""
    from cl_fed.faults import InjectedCrash
    from cl_fed.io import load_tensors

    common = {**COMMON, "strategy": "fedavg-lora", "rounds-per-stage": 1, "server-optimizer": "avgm"}
    whole, _ = run_in_process(
        {**common, "run-name": "avgm-whole", "output-dir": str(tmp_path / "whole")}, sites=2
    )
    crashed = {**common, "run-name": "avgm-crashed", "output-dir": str(tmp_path / "crashed")}
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"stop-after-round": 1}))
    monkeypatch.setenv("CL_FED_FAULTS_FILE", str(faults))
    with pytest.raises(InjectedCrash):
        run_in_process(crashed, sites=2)
    checkpoint = tmp_path / "crashed" / "avgm-crashed" / CHECKPOINT
    assert any(k.startswith("extra/momentum/") for k in load_tensors(checkpoint)[0])
    monkeypatch.delenv("CL_FED_FAULTS_FILE")
    resumed, grid = run_in_process({**crashed, "resume": True}, sites=2)
    a, b = results(whole), results(resumed)
    assert b["complete"] and len(b["rounds"]) == 2 and a["wer_matrix"] == b["wer_matrix"]
    saved = [load_model(d / "model").model.state_dict() for d in (whole, resumed)]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
