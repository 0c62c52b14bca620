"""Differential privacy: the math of cl_fed/privacy.py against hand-computed values and the Opacus
accountant, the DP config rules, and the Flower glue on real messages: the ClientApp's clipping mod
(Flower's fixedclipping_mod) on a real site's trained adapter, and the server's noised aggregate.
A whole `flwr run` with DP on is in tests/test_flower_e2e.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import RDPAccountant
from test_flower_units import (
    in_memory_grid,
    make_strategy,
    reply,
    send,
    site_context,
    task_identity,  # noqa: F401  (pytest fixtures: autouse, and the tiny model's base)
    tiny,  # noqa: F401
    train_steps,
)

from cl_fed import protocol as P
from cl_fed.adapters import adapter_state, attach_lora, fresh_factors
from cl_fed.config import make_config
from cl_fed.models.registry import build_model
from cl_fed.models.tiny import NAME as TINY
from cl_fed.privacy import (
    clip_update,
    epsilon,
    new_secret,
    noise_seed,
    noise_std,
    noised_mean,
    poisson_sample,
    privacy_report,
    update_norm,
)
from cl_fed.results import RunRecord, render_report
from clients import client_app
from server.server_app import privacy_now

DP = {"merge": "factors", "weighting": "uniform", "dp-noise": 0.7}


# ---- the math ----------------------------------------------------------------------------------
def test_clipping_scales_a_long_update_to_exactly_the_norm_and_leaves_a_short_one():
    start = {"m.lora_A": torch.tensor([[1.0, 2.0]]), "m.lora_B": torch.tensor([[0.5], [0.0]])}
    long = {
        "m.lora_A": torch.tensor([[4.0, 2.0]]),
        "m.lora_B": torch.tensor([[0.5], [4.0]]),
    }  # update (3, 0), (0, 4)
    assert update_norm(long, start) == 5.0
    clipped = clip_update(long, start, 1.0)
    assert torch.allclose(clipped["m.lora_A"], torch.tensor([[1.6, 2.0]]))  # 1 + 3/5
    assert torch.allclose(clipped["m.lora_B"], torch.tensor([[0.5], [0.8]]))  # 0 + 4/5
    assert update_norm(clipped, start) == pytest.approx(1.0, rel=1e-7)
    short = {"m.lora_A": torch.tensor([[1.3, 2.0]]), "m.lora_B": torch.tensor([[0.5], [0.4]])}  # norm 0.5
    kept = clip_update(short, start, 1.0)
    assert all(torch.equal(kept[k], short[k]) for k in short)
    with pytest.raises(ValueError, match="clipping norm 0"):
        clip_update(short, start, 0)
    with pytest.raises(ValueError, match="keys"):
        update_norm({"x.lora_A": torch.zeros(1, 1)}, start)


def test_noise_std_and_the_seeded_noised_mean():
    assert noise_std(2.0, 1.5, 3) == 1.0  # z C / n
    with pytest.raises(ValueError, match="num_updates"):
        noise_std(1.0, 1.0, 0)
    adapters = [
        {"a.lora_A": torch.full((300, 400), float(i)), "a.lora_B": torch.full((2, 3), 2.0 * i)}
        for i in (1, 2, 6)
    ]
    exact = noised_mean(adapters, 0.0, seed=1)
    assert torch.equal(exact["a.lora_A"], torch.full((300, 400), 3.0))
    assert torch.equal(exact["a.lora_B"], torch.full((2, 3), 6.0))
    noised = noised_mean(adapters, 0.25, seed=7)
    noise = (noised["a.lora_A"] - 3.0).to(torch.float64)
    assert abs(float(noise.std()) - 0.25) < 0.25 * 0.01 and abs(float(noise.mean())) < 0.005  # 120 000 draws
    assert all(v.dtype == torch.float32 for v in noised.values()) and list(noised) == sorted(noised)
    again, other = noised_mean(adapters, 0.25, seed=7), noised_mean(adapters, 0.25, seed=8)
    assert all(torch.equal(noised[k], again[k]) for k in noised)
    assert not torch.equal(noised["a.lora_A"], other["a.lora_A"])
    secret, other_secret = new_secret(), new_secret()
    assert len(secret) == 64 and secret != other_secret  # 256 bits from the OS, new every run
    assert noise_seed(5, secret) == noise_seed(5, secret) != noise_seed(6, secret)
    assert noise_seed(5, other_secret) != noise_seed(5, secret)
    for weak in ("", "s3cret"):  # a noise anyone can redraw can be subtracted: refused
        with pytest.raises(ValueError, match="secret is missing or short"):
            noise_seed(5, weak)
    # Poisson sampling (DP with fraction-train < 1): a fixed denominator, start + noise when nobody came
    start = {"a.lora_A": torch.zeros(2, 2), "a.lora_B": torch.ones(3, 2)}
    one = {"a.lora_A": torch.full((2, 2), 3.0), "a.lora_B": torch.full((3, 2), 4.0)}
    fixed = noised_mean([one], 0.0, 1, start=start, denominator=1.5)
    assert torch.equal(fixed["a.lora_A"], torch.full((2, 2), 2.0)) and torch.equal(
        fixed["a.lora_B"], torch.full((3, 2), 3.0)
    )
    alone = noised_mean([], 0.5, 3, start=start, denominator=1.5)
    assert not torch.equal(alone["a.lora_B"], start["a.lora_B"]) and alone.keys() == start.keys()
    # each node independently at the rate, from the secret: reproducible for the server only
    nodes = list(range(1000))
    picked = poisson_sample(nodes, 0.3, 7, secret)
    assert picked == poisson_sample(nodes, 0.3, 7, secret) != poisson_sample(nodes, 0.3, 7, other_secret)
    assert 240 < len(picked) < 360 and picked != poisson_sample(nodes, 0.3, 8, secret)


def test_epsilon_against_the_accountant_and_by_hand():
    delta = 1e-5
    # monotone: more noise -> less epsilon; more rounds -> more; sampling a fraction of the sites amplifies
    by_noise = [epsilon(z, 1.0, 6, delta) for z in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    by_rounds = [epsilon(1.0, 1.0, r, delta) for r in (1, 2, 6, 20)]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert epsilon(1.0, 0.5, 6, delta) < epsilon(1.0, 1.0, 6, delta)
    assert epsilon(1.0, 1.0, 0, delta) == 0.0 and epsilon(0.0, 1.0, 3, delta) == math.inf
    # the accountant called directly
    accountant = RDPAccountant()
    for _ in range(6):
        accountant.step(noise_multiplier=1.3, sample_rate=1.0)
    assert epsilon(1.3, 1.0, 6, delta) == accountant.get_epsilon(delta)
    # by hand: R Gaussian releases have RDP R a / (2 z^2) at order a (Mironov 2017), converted to
    # (epsilon, delta) by Balle et al. 2020, Thm 21, minimised over the accountant's orders
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = 6 * orders / (2 * 1.3**2)
    by_hand = np.min(rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1))
    assert epsilon(1.3, 1.0, 6, delta) == pytest.approx(by_hand, rel=1e-12)
    # and below the classic conversion eps <= RDP + log(1/delta) / (a - 1)
    assert epsilon(1.3, 1.0, 6, delta) < np.min(rdp + np.log(1 / delta) / (orders - 1))
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 1.0, 3, 0.0)


# ---- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, words",
    [
        ({"dp-noise": 1.0, "weighting": "uniform"}, ["dp-noise=1.0", "merge='product'", "merge='factors'"]),
        (
            {"dp-noise": 1.0, "merge": "factors"},
            ["dp-noise=1.0", "weighting='examples'", "weighting='uniform'"],
        ),
        ({**DP, "strategy": "fedavg"}, ["dp-noise=0.7", "strategy='fedavg'"]),
        ({**DP, "strategy": "local"}, ["dp-noise=0.7", "strategy='local'"]),
        ({"dp-noise": -1.0}, ["dp-noise=-1.0", ">= 0"]),
        ({"dp-clip": 0.0}, ["dp-clip=0.0", "> 0"]),
        ({"dp-delta": 1.0}, ["dp-delta=1.0", "(0, 1)"]),
    ],
)
def test_dp_config_errors_name_the_keys(override, words):
    with pytest.raises(ValueError) as err:
        make_config(override)
    for word in words:
        assert word in str(err.value)


def test_dp_config_and_run_names():
    assert (
        make_config({**DP, "strategy": "fedavg-lora", "merge": "product"}).dp_noise == 0.7
    )  # no merge there
    name = make_config({**DP, "scenario": "tiny"}).default_run_name()
    assert name == "tiny-centralization-every-stage-factors-weightinguniform-dp-noise0.7-seed0"
    # with DP off the clipping norm and delta change nothing, so they do not split runs
    assert (
        make_config({"dp-clip": 5.0, "dp-delta": 1e-3}).default_run_name() == make_config().default_run_name()
    )


# ---- the client mod and the server's aggregate on real messages ----------------------------------
def dp_strategy(tiny, clip: float):
    return make_strategy(tiny, **DP, **{"dp-clip": clip, "rounds-per-stage": 2})


def test_the_clipping_mod_clips_a_real_site_update_and_the_server_noises_the_mean(tiny, tmp_path):
    clip = 0.02  # the tiny scenario's updates measure 0.10..0.14: every one is clipped
    strategy = dp_strategy(tiny, clip)
    first, second = train_steps(strategy.cfg)[:2]
    grid, nodes = in_memory_grid(2)
    start = fresh_factors(tiny["reference"], first.seed)  # what the ServerApp passes for a fresh round
    messages = send(strategy, grid, first, start)
    # with DP every site gets the adapter it starts from (the mod measures the update from it), and the
    # clipping norm under Flower's key
    drawn = adapter_state(attach_lora(build_model(TINY, seed=0).model, tiny["spec"], seed=first.seed))
    sent = messages[0].content[P.ADAPTER].to_torch_state_dict()
    assert all(torch.equal(sent[k], drawn[k]) for k in drawn) and list(sent) == list(drawn)
    assert all(m.content[P.CONFIG][KEY_CLIPPING_NORM] == clip for m in messages)
    assert all(m.content[P.CONFIG][P.SYNC] == P.SYNC_FULL for m in messages)  # the mod copes with two records

    raw, replies = [], []
    for i, msg in enumerate(messages):

        def train_and_keep(m, ctx):
            out = client_app.train(m, ctx)
            raw.append({k: v.clone() for k, v in out.content[P.ARRAYS].to_torch_state_dict().items()})
            return out

        context = site_context(tmp_path, i, nodes[i], **DP, **{"dp-clip": clip})
        replies.append(client_app.clip_adapter_update(msg, context, train_and_keep))
    for before, answer in zip(raw, replies):
        assert not answer.has_error()
        after = answer.content[P.ARRAYS].to_torch_state_dict()
        assert update_norm(before, start) > 3 * clip  # it trained, far beyond the norm
        assert update_norm(after, start) == pytest.approx(clip, rel=1e-4)
        factor = clip / update_norm(before, start)  # the direction is kept
        assert all(
            torch.allclose(after[k] - start[k], (before[k] - start[k]) * factor, atol=1e-7) for k in after
        )
        assert set(answer.content.config_records) == {P.SITE} and P.METRICS in answer.content

    # the server: the mean of the clipped updates plus N(0, (z C / n)^2), seeded by the round
    aggregated, _ = strategy.aggregate_train(1, replies)
    noised = aggregated.to_torch_state_dict()
    std = 0.7 * clip / 2
    assert strategy.round_log["dp_noise_std"] == std
    clipped = [clip_update(r.content[P.ARRAYS].to_torch_state_dict(), start, clip) for r in replies]
    expected = noised_mean(clipped, std, noise_seed(first.seed, strategy.secret))
    assert set(noised) == set(expected) and all(torch.equal(noised[k], expected[k]) for k in expected)
    plain = noised_mean(clipped, 0.0, 0)
    noise = torch.cat([(noised[k] - plain[k]).flatten() for k in plain]).to(torch.float64)
    assert abs(float(noise.std()) - std) < 0.05 * std

    # a site without the mod: the server clips its update itself, to the same aggregate (up to float32)
    unclipped = dp_strategy(tiny, clip)
    unclipped.secret = strategy.secret  # the same run's server
    again = send(unclipped, grid, first, start)
    old = unclipped.sync.checksum
    answers = [reply(m, a, 8, f"s{i}", old) for i, (m, a) in enumerate(zip(again, raw))]
    by_server = unclipped.aggregate_train(1, answers)[0].to_torch_state_dict()
    assert all(torch.allclose(by_server[k], expected[k], atol=1e-6) for k in expected)

    # the next round continues from the noised mean, and measures the updates from it
    for msg in send(strategy, grid, second, expected):
        assert all(
            torch.equal(msg.content[P.ADAPTER].to_torch_state_dict()[k], expected[k]) for k in expected
        )


def test_the_mod_passes_other_messages_through(tiny, tmp_path):
    msg = Message(
        RecordDict({P.CONFIG: ConfigRecord({P.STAGE: 0})}), dst_node_id=1, message_type=MessageType.EVALUATE
    )
    answer = Message(RecordDict({P.METRICS: ConfigRecord({"x": 1})}), reply_to=msg)
    assert client_app.clip_adapter_update(msg, site_context(tmp_path, 0, 1), lambda m, c: answer) is answer
    train = Message(
        RecordDict({P.CONFIG: ConfigRecord({P.STAGE: 0})}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    assert client_app.clip_adapter_update(train, site_context(tmp_path, 0, 1), lambda m, c: answer) is answer


def test_epsilon_derives_from_the_round_log_so_resume_keeps_it(tmp_path):
    cfg = make_config({**DP, "scenario": "tiny"})
    rounds = [{"dp_noise_std": 0.1}, {"dp_noise_std": 0.1}, {"clients_used": []}, {"dp_noise_std": 0.1}]
    privacy = privacy_now(cfg, rounds)
    assert privacy["rounds"] == 3 and privacy["epsilon"] == epsilon(0.7, 1.0, 3, 1e-5) > 0
    assert privacy_now(cfg, rounds[:2])["epsilon"] < privacy["epsilon"]
    assert privacy == privacy_report(0.7, 2.0, 1e-5, 1.0, 3)
    assert "secret" in privacy["noise_seed"] and "never sent" in privacy["noise_seed"]
    assert privacy["accountant"].startswith("opacus.accountants.RDPAccountant (opacus 1.6.0")
    record = RunRecord(
        run_name="r",
        strategy="centralization",
        schedule={},
        config=cfg.to_dict(),
        stages=["a"],
        rounds=rounds,
        privacy=privacy,
    )
    data = record.to_json()
    assert data["privacy"] == privacy
    report = render_report(data)
    assert "## Differential privacy" in report and f"({privacy['epsilon']:.3g}, 1e-05)-DP" in report
    assert (
        "privacy"
        not in RunRecord(run_name="r", strategy="fedavg", schedule={}, config={}, stages=["a"]).to_json()
    )
