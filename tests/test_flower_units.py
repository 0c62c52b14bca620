"""The Flower apps' functions called directly with real Flower messages (no `flwr run`).

Server side: what `configure_train` sends each node (WeightsSync: nothing, the operations the
server applied since the version it holds, cl_fed/updates.py, or everything), how
`aggregate_train` drops bad replies and aggregates the rest by the plan's rule, fraction-train
sampling, the FedAvg baseline, a Flower server optimiser composed with our strategy and the
checkpoint. Client side: `sync_weights` and the real `train` / `evaluate` handlers on a site of the
tiny scenario. The server's messages go through Flower's own InMemoryGrid (tests/loopback.py);
replies are built as a ClientApp builds them: `Message(content, reply_to=msg)`.
The continual state itself (apply, merge, pool) is tested in tests/test_loop.py.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp.strategy import FedAdam
from flwr.supercore.task_identity import TaskIdentity

from cl_fed import protocol as P
from cl_fed import updates
from cl_fed.adapters import adapter_shapes, attach_lora, fresh_factors
from cl_fed.aggregation import RESIDUAL, aggregate, split, with_zero_residual
from cl_fed.centralize import base_key, example_weights, lora_pairs, state_bytes
from cl_fed.config import DEFAULTS, make_config
from cl_fed.continual import lora_spec, prepare_data, state_checksum
from cl_fed.io import read_tensors_meta
from cl_fed.models.registry import build_model
from cl_fed.models.tiny import NAME as TINY
from cl_fed.plan import Train, continual_plan, rule_for
from cl_fed.privacy import new_secret
from cl_fed.results import Evaluation, RunRecord
from cl_fed.state import ContinualState
from clients import client_app
from clients.site import STATE_FILE, Site, StaleBase, load_site, state_dir
from server.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from server.server_app import federated_evaluation
from server.strategies import ContinualStrategy, FedAvgFull, WeightsSync, build_strategy
from tests.loopback import RUN_ID, LoopbackGrid, in_memory_grid

SITES = ["factory-a", "factory-b"]  # the tiny scenario's sites, partition ids 0 and 1
STAGES = ["en-welding", "de-codeswitch"]


# ---- Flower plumbing ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a running app need the task identity Flower sets in its processes."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(autouse=True)
def no_injected_faults(monkeypatch):
    monkeypatch.delenv("CL_FED_FAULTS_FILE", raising=False)
    monkeypatch.delenv("CL_FED_AUDIT_DIR", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the client handlers set 1 thread for the whole process


# ---- a real model's base and adapter shapes ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """The tiny model's base (perturbed, so that a site only holds it once it was sent) and its
    adapters' names and shapes, prepared as server/server_app.py does."""
    cfg = make_config({"scenario": "tiny"})
    speech = build_model(TINY, seed=0)
    spec = lora_spec(cfg, speech)
    probe = attach_lora(speech.model, spec, seed=0)
    reference = adapter_shapes(probe)
    plain = probe.unload()
    generator = torch.Generator().manual_seed(1)
    base = {}
    for key, value in plain.state_dict().items():
        value = value.detach().clone()
        if value.is_floating_point():
            value += 0.01 * torch.randn(value.shape, generator=generator)
        base[key] = value
    adapted = {k.rsplit(".", 1)[0] + ".weight" for k in reference}  # the weights LoRA adapts
    return {"cfg": cfg, "spec": spec, "reference": reference, "base": base, "adapted": adapted}


def random_adapter(reference: dict, seed: int, size: float = 0.05) -> dict[str, torch.Tensor]:
    """A trained-looking adapter (B != 0) of the right names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: size * torch.randn(tuple(shape), generator=generator) for k, shape in sorted(reference.items())
    }


def make_strategy(tiny, **overrides) -> ContinualStrategy:
    """build_strategy + bind, as server/server_app.py does (the base is the tiny fixture's)."""
    cfg = make_config({"scenario": "tiny", **overrides})
    strategy = build_strategy(cfg)
    if strategy.lora:
        reference, scale = tiny["reference"], tiny["spec"].scale
    else:
        reference, scale = {k: tuple(v.shape) for k, v in tiny["base"].items()}, 1.0
    secret = new_secret() if cfg.dp_noise else ""  # as the ServerApp draws it at run start
    strategy.bind(cfg, reference, scale, rule_for(cfg), WeightsSync(tiny["base"]), secret=secret)
    return strategy


def train_steps(cfg) -> list[Train]:
    return [s for s in continual_plan(cfg, STAGES) if isinstance(s, Train)]


def send(strategy, grid, step: Train, arrays: dict | None = None) -> list[Message]:
    """configure_train for a plan step, starting from `arrays` (the aggregate's key space)."""
    record = ArrayRecord(arrays) if arrays else ArrayRecord()
    return list(strategy.configure_train(step.server_round, record, ConfigRecord(P.train_config(step)), grid))


def reply(
    msg: Message, arrays: dict, num_examples: int, site: str, checksum: str, loss: float = 1.0
) -> Message:
    """What clients/client_app.py's `train` returns."""
    content = RecordDict(
        {
            P.ARRAYS: ArrayRecord({k: v.clone() for k, v in arrays.items()}),
            P.METRICS: MetricRecord(
                {P.NUM_EXAMPLES: num_examples, P.TRAIN_LOSS: loss, P.AUDIO_SECONDS: 1.0, P.ROWS_SKIPPED: 0}
            ),
            P.SITE: ConfigRecord(
                {P.SITE_NAME: site, P.WEIGHTS_CHECKSUM: checksum, P.NONCE: msg.content[P.CONFIG][P.NONCE]}
            ),
        }
    )
    return Message(content, reply_to=msg)


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def server_after_round(tiny, adapters, examples, merge: bool) -> ContinualState:
    """The server's state after one exact-aggregated round of `adapters` (and a committed merge)."""
    scale = tiny["spec"].scale
    state = ContinualState.start(tiny["base"])
    state.apply("exact", aggregate("exact", adapters, example_weights(examples), scale))
    if merge:
        state.merge(scale, "product", commit=True)
    return state


def kinds(steps: list[dict[str, tuple]]) -> list[set[str]]:
    """The kinds of operation of each step ({"lowrank"}, {"set"}, ...)."""
    return [{op[0] for op in ops.values()} for ops in steps]


def check_lowrank(op: tuple, weight: torch.Tensor, ranks: range) -> int:
    """`op` is W += U V with U (out x k), V (k x in) in the weight's dtype, k in `ranks`, and the two
    factors smaller than the dense weight; returns k."""
    kind, u, v = op
    assert kind == "lowrank"
    k = u.shape[1]
    assert k in ranks, (k, ranks)
    assert tuple(u.shape) == (weight.shape[0], k) and tuple(v.shape) == (k, weight.shape[1])
    assert u.dtype == v.dtype == weight.dtype
    assert u.numel() + v.numel() < weight.numel()
    return k


def same_ops(a: list[dict[str, tuple]], b: list[dict[str, tuple]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys()
        and all(x[k][0] == y[k][0] and all(torch.equal(p, q) for p, q in zip(x[k][1:], y[k][1:])) for k in x)
        for x, y in zip(a, b)
    )


def message_bytes(messages: list[Message]) -> int:
    """Every ArrayRecord of the messages, as they were sent."""
    return sum(state_bytes(tensors(record)) for m in messages for record in m.content.array_records.values())


# ---- 1. WeightsSync: what configure_train sends each node -----------------------------------------
def test_configure_train_sends_nothing_the_operations_since_or_everything(tiny):
    base, reference, rank = tiny["base"], tiny["reference"], tiny["spec"].rank
    strategy = make_strategy(tiny, **{"rounds-per-stage": 3})
    first, second, third = train_steps(strategy.cfg)[:3]
    assert (first.start, second.start, third.start) == ("fresh", "continue", "continue")
    grid, _ = in_memory_grid(3)
    sync, old = strategy.sync, strategy.sync.checksum
    assert old == state_checksum(base)

    # round 1: no node is known yet: everyone gets every tensor, and no adapter (a fresh one, from the seed)
    messages = send(strategy, grid, first)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(grid.get_node_ids())
    for msg in messages:
        conf = msg.content[P.CONFIG]
        assert conf[P.SYNC] == P.SYNC_FULL and conf[P.WEIGHTS_CHECKSUM] == old
        assert (conf[P.SEED], conf[P.START], conf[P.SERVER_ROUND]) == (first.seed, "fresh", 1)
        assert P.ADAPTER not in msg.content
        assert equal_states(tensors(msg.content[P.WEIGHTS]), base)
    assert strategy.round_log["bytes_down"] == 3 * state_bytes(base) == message_bytes(messages)

    # the replies say what each node holds: two nodes the weights they were sent, one other weights
    n0, n1, n2 = (m.metadata.dst_node_id for m in messages)
    adapters = [random_adapter(reference, seed=i) for i in range(3)]
    replies = [
        reply(messages[0], adapters[0], 5, "s0", old),
        reply(messages[1], adapters[1], 7, "s1", old),
        reply(messages[2], adapters[2], 9, "s2", "f" * 64),
    ]
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert sync.nodes == {n0: old, n1: old, n2: "f" * 64}
    state = ContinualState.start(base)
    state.apply("exact", tensors(aggregated))  # the residuals folded into the adapted layers ...
    (ops,) = state.log  # ... as one low-rank factorisation of each layer's residual
    residual = split(tensors(aggregated))[1]
    assert set(ops) == set(residual) == tiny["adapted"]
    for key, op in ops.items():
        # three different adapters: rank between (3 - 1) r (the exact residual) and (3 + 1) r (with
        # the float32 rounding of the mean factors the sites continue from)
        check_lowrank(op, base[key], range(2 * rank, 4 * rank + 1))
        assert not any(torch.equal(op[2][:rank], a[k]) for a in adapters for k in a if k.endswith(".lora_A"))
        torch.testing.assert_close(
            updates.lowrank_product(op[1], op[2]),
            residual[key],
            rtol=0,
            atol=1e-6 * residual[key].abs().max(),
        )
    sync.update(state.weights, state.log)
    state.log.clear()  # as the ServerApp does
    new = sync.checksum
    changed = {k for k in base if not torch.equal(state.weights[k], base[k])}
    assert new == state_checksum(state.weights) != old and changed == tiny["adapted"]

    # round 2: the nodes on the previous weights get just the operations, the third everything;
    # everyone gets the adapter to continue from, without the residuals
    start = with_zero_residual(state.adapter, state.weights)
    round_two = send(strategy, grid, second, start)
    by_node = {m.metadata.dst_node_id: m for m in round_two}
    for node in (n0, n1):
        conf, records = by_node[node].content[P.CONFIG], by_node[node].content
        assert conf[P.SYNC] == P.SYNC_CHANGED and conf[P.SYNC_FROM] == old and conf[P.WEIGHTS_CHECKSUM] == new
        sent = tensors(records[P.WEIGHTS])
        assert set(sent) == {f"0/lowrank/{factor}/{k}" for factor in "UV" for k in tiny["adapted"]}
        assert same_ops(updates.from_tensors(sent), [ops])
        replayed = updates.replay(dict(base), updates.from_tensors(sent))  # what the node does
        assert equal_states(replayed, state.weights) and state_checksum(replayed) == new
    assert by_node[n2].content[P.CONFIG][P.SYNC] == P.SYNC_FULL
    assert equal_states(tensors(by_node[n2].content[P.WEIGHTS]), state.weights)
    assert all(equal_states(tensors(m.content[P.ADAPTER]), state.adapter) for m in by_node.values())
    adapter_bytes, ops_bytes = state_bytes(state.adapter), state_bytes(sent)
    assert (
        ops_bytes < state_bytes({k: base[k] for k in changed}) < state_bytes(base)
    )  # less than the dense layers
    assert strategy.round_log["bytes_down"] == 2 * ops_bytes + state_bytes(base) + 3 * adapter_bytes
    assert strategy.round_log["bytes_down"] == message_bytes(round_two)

    # round 2's replies: n1 now holds the new weights, n0 fails, n2 does not answer
    replies = [
        error_reply(by_node[n0], "Traceback (most recent call last):\nInjectedCrash: injected fault"),
        reply(by_node[n1], adapters[1], 7, "s1", new),
    ]
    strategy.aggregate_train(2, replies)
    assert sync.nodes == {n1: new}  # a failed or silent node is unknown: it gets everything next time
    by_node = {m.metadata.dst_node_id: m for m in send(strategy, grid, third, start)}
    assert by_node[n1].content[P.CONFIG][P.SYNC] == P.SYNC_NONE and P.WEIGHTS not in by_node[n1].content
    assert by_node[n1].content[P.CONFIG][P.WEIGHTS_CHECKSUM] == new
    for node in (n0, n2):
        assert by_node[node].content[P.CONFIG][P.SYNC] == P.SYNC_FULL
        assert equal_states(tensors(by_node[node].content[P.WEIGHTS]), state.weights)

    # the same weights again: no new version, and a node on the previous one still gets its operations
    sync.update(state.weights, [])
    assert (sync.checksum, sync.previous) == (new, old)
    sync.nodes[n1] = old
    conf, records = sync.records(n1)
    assert conf[P.SYNC] == P.SYNC_CHANGED and same_ops(
        updates.from_tensors(tensors(records[P.WEIGHTS])), [ops]
    )
    # dense operations travel as "set" tensors; two versions behind, the last operations are not enough
    bump = {k: ("set", state.weights[k] + 1.0) for k in sorted(tiny["adapted"])}
    newer = updates.apply_ops(state.weights, bump)
    sync.update(newer, [bump])
    conf, records = sync.records(n1)  # n1 holds `old`
    assert conf[P.SYNC] == P.SYNC_FULL and equal_states(tensors(records[P.WEIGHTS]), newer)
    assert equal_states(sync.weights, newer)
    sync.nodes[n1] = new
    conf, records = sync.records(n1)
    sent = tensors(records[P.WEIGHTS])
    assert conf[P.SYNC] == P.SYNC_CHANGED and set(sent) == {f"0/set/{k}" for k in tiny["adapted"]}
    assert kinds(updates.from_tensors(sent)) == [{"set"}]
    assert equal_states(updates.replay(state.weights, updates.from_tensors(sent)), newer)


def site_for(tiny, tmp_path, name: str = "factory-a", cfg=None) -> Site:
    speech = build_model(TINY, seed=0)
    speech.model = attach_lora(speech.model, tiny["spec"], seed=0)
    return Site(name, cfg or tiny["cfg"], stream=None, speech=speech, state_dir=tmp_path / name)


def sync_message(sync: WeightsSync, node: int) -> Message:
    fields, records = sync.records(node)
    return Message(
        RecordDict({**records, P.CONFIG: ConfigRecord(fields)}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def test_sync_weights_replays_the_servers_operations_bit_for_bit_or_raises_stale_base(tiny, tmp_path):
    base, node, reference = tiny["base"], 7, tiny["reference"]
    scale, rank = tiny["spec"].scale, tiny["spec"].rank
    sync = WeightsSync(base)
    site = site_for(tiny, tmp_path)
    full = sync_message(sync, node)
    assert full.content[P.CONFIG][P.SYNC] == P.SYNC_FULL
    client_app.sync_weights(site, full)
    assert site.checksum == sync.checksum == state_checksum(site.state.weights)
    assert equal_states(site.state.weights, base)
    assert read_tensors_meta(tmp_path / "factory-a" / STATE_FILE)["checksum"] == sync.checksum

    sync.nodes[node] = site.checksum  # as its reply reports
    nothing = sync_message(sync, node)
    assert nothing.content[P.CONFIG][P.SYNC] == P.SYNC_NONE and P.WEIGHTS not in nothing.content
    client_app.sync_weights(site, nothing)
    assert site.checksum == sync.checksum

    # a round and a merge (K=1) on the server: the round's residual, then s * B_bar and A_bar, both
    # low-rank on the adapted layers; the site replays them and lands on the server's weights
    adapters = [random_adapter(reference, seed=s) for s in (3, 4)]
    server = server_after_round(tiny, adapters, [2, 6], True)
    residual_ops, merge_ops = server.log
    mean = aggregate("exact", adapters, example_weights([2, 6]), scale)
    assert set(residual_ops) == set(merge_ops) == tiny["adapted"]
    for path, (a, b) in lora_pairs(split(mean)[0]).items():
        key = base_key(path)
        check_lowrank(residual_ops[key], base[key], range(rank, 3 * rank + 1))
        assert check_lowrank(merge_ops[key], base[key], range(rank, rank + 1)) == rank
        assert torch.equal(merge_ops[key][1], (scale * b.double()).float()) and torch.equal(
            merge_ops[key][2], a
        )
    sync.update(server.weights, server.log)
    changed = sync_message(sync, node)
    assert changed.content[P.CONFIG][P.SYNC] == P.SYNC_CHANGED
    sent = tensors(changed.content[P.WEIGHTS])
    assert set(sent) == {f"{i}/lowrank/{f}/{k}" for i in (0, 1) for f in "UV" for k in tiny["adapted"]}
    assert same_ops(updates.from_tensors(sent), server.log)
    assert state_bytes(sent) < state_bytes({k: base[k] for k in tiny["adapted"]})
    client_app.sync_weights(site, changed)
    assert (
        site.checksum == sync.checksum == state_checksum(server.weights) == state_checksum(site.state.weights)
    )
    assert equal_states(site.state.weights, server.weights)
    assert all(site.state.weights[k].dtype == base[k].dtype for k in base)
    # what another worker or process reads from the site's file is the same
    reread = site_for(tiny, tmp_path)
    reread.reload_if_changed()
    assert reread.checksum == sync.checksum and equal_states(reread.state.weights, server.weights)

    # a site on other weights cannot apply the operations: it says so, and keeps what it held
    other = site_for(tiny, tmp_path, name="factory-b")
    other.set_state(ContinualState.start({k: v + 1 if v.is_floating_point() else v for k, v in base.items()}))
    held = other.checksum
    with pytest.raises(StaleBase, match="factory-b"):
        client_app.sync_weights(other, changed)
    assert other.checksum == held == state_checksum(other.state.weights)
    # so does a site that holds nothing yet, and one told it holds weights it does not (sync none)
    with pytest.raises(StaleBase, match="factory-a"):
        client_app.sync_weights(site_for(tiny, tmp_path / "empty"), changed)
    sync.nodes[node] = sync.checksum
    with pytest.raises(StaleBase, match="factory-b"):
        client_app.sync_weights(other, sync_message(sync, node))

    # an adapter pool (K=2): a stage's round, its reset to the base (dense), the next stage's round and
    # the committed pool (dense): four steps in one version, replayed in order
    server.log.clear()
    for seeds, commit in (((5, 6), False), ((7, 8), True)):
        pair = [random_adapter(reference, seed=s) for s in seeds]
        server.apply("exact", aggregate("exact", pair, [0.5, 0.5], scale))
        server.merge(scale, "product", commit=commit)
    assert kinds(server.log) == [{"lowrank"}, {"set"}, {"lowrank"}, {"set"}]
    assert set(server.log[-1]) == tiny["adapted"]
    assert all(torch.equal(op[1], server.weights[k]) for k, op in server.log[-1].items())
    sync.nodes[node] = site.checksum
    sync.update(server.weights, server.log)
    pooled = sync_message(sync, node)
    assert pooled.content[P.CONFIG][P.SYNC] == P.SYNC_CHANGED
    client_app.sync_weights(site, pooled)
    assert site.checksum == sync.checksum == state_checksum(server.weights) != held
    assert equal_states(site.state.weights, server.weights)


# ---- 2. aggregate_train -----------------------------------------------------------------------------
@pytest.mark.parametrize(("merge", "rule"), [("product", "exact"), ("factors", "fedit")])
def test_bad_replies_are_dropped_with_a_reason_and_the_rest_aggregated(tiny, merge, rule):
    reference = tiny["reference"]
    good = [random_adapter(reference, seed=20 + i) for i in range(2)]
    norm = max(torch.linalg.vector_norm(torch.cat([v.flatten() for v in a.values()])) for a in good)
    strategy = make_strategy(
        tiny, merge=merge, **{"max-update-norm": float(2 * norm), "max-site-weight": 1.0}
    )
    assert strategy.rule == rule
    grid, _ = in_memory_grid(9)
    messages = send(strategy, grid, train_steps(strategy.cfg)[0])
    old = strategy.sync.checksum
    nan = {k: torch.full_like(v, float("nan")) for k, v in good[0].items()}
    key = sorted(reference)[0]
    wrong_shape = {**good[0], key: good[0][key][:-1]}
    too_big = {k: 10 * v for k, v in good[1].items()}
    replies = [
        reply(messages[0], good[0], 8, "good-0", old, loss=2.0),
        reply(messages[1], good[1], 5, "good-1", old, loss=4.0),
        error_reply(
            messages[2], "Traceback (most recent call last):\n  ...\nInjectedCrash: injected fault at x"
        ),
        reply(messages[3], nan, 8, "nan", old),
        reply(messages[4], wrong_shape, 8, "shape", old),
        reply(messages[5], good[0], 0, "no-examples", old),
        reply(messages[6], good[1], -3, "negative", old),
        reply(messages[7], too_big, 8, "norm", old),
        # messages[8]: no reply within the round's timeout
    ]
    aggregated, metrics = strategy.aggregate_train(1, replies)
    log = strategy.round_log
    assert log["clients_used"] == ["good-0", "good-1"] and log["num_examples"] == [8, 5]
    reasons = {d.get("site", d["node"]): d["reason"] for d in log["clients_dropped"]}
    node = [m.metadata.dst_node_id for m in messages]
    assert len(log["clients_dropped"]) == 7
    assert reasons[node[2]] == "client error: InjectedCrash: injected fault at x"
    assert reasons[node[8]] == f"no reply within {strategy.cfg.round_timeout} s"
    assert "NaN or Inf" in reasons["nan"] and "has shape" in reasons["shape"]
    assert "num-examples=0" in reasons["no-examples"] and "num-examples=-3" in reasons["negative"]
    assert "norm" in reasons["norm"]
    assert node[2] not in strategy.sync.nodes and node[8] not in strategy.sync.nodes
    assert strategy.sync.nodes[node[0]] == old
    # what was aggregated: exactly the plan's rule over the good replies, weighted by their examples
    expected = aggregate(rule, good, example_weights([8, 5]), tiny["spec"].scale)
    got = tensors(aggregated)
    assert equal_states(got, expected)
    assert any(k.startswith(RESIDUAL) for k in got) == (rule == "exact")
    assert metrics[P.NUM_EXAMPLES] == 13 and metrics[P.TRAIN_LOSS] == pytest.approx((8 * 2 + 5 * 4) / 13)
    received = [good[0], good[1], nan, wrong_shape, good[0], good[1], too_big]
    assert log["bytes_up"] == sum(state_bytes(a) for a in received)


def test_a_node_that_answers_stale_base_gets_its_message_again_with_every_weight(tiny):
    strategy = make_strategy(tiny, **{"proximal-mu": 0.01})
    grid, nodes = in_memory_grid(4)
    for node in nodes:  # every node is known to hold the base: the messages carry no weights
        strategy.sync.nodes[node] = strategy.sync.checksum
    messages = send(strategy, grid, train_steps(strategy.cfg)[1], fresh_factors(tiny["reference"], 3))
    assert all(P.WEIGHTS not in m.content for m in messages)
    down, lost = strategy.round_log["bytes_down"], f"site x {P.STALE_BASE} (0123; it holds none)"
    replies = [
        # the reason as a simulation's Ray worker words it (no class name), then as a SuperNode does
        error_reply(messages[0], f"<class 'ClientAppException'>:<'\nException occurred. Message: {lost}'>"),
        error_reply(messages[1], f"<class 'clients.site.StaleBase'>:<'{lost}'>"),
        error_reply(messages[2], "Traceback (most recent call last):\nInjectedCrash: injected fault"),
        reply(messages[3], {}, 8, "site-3", strategy.sync.checksum),
    ]
    again = strategy.resend_to_stale(replies)
    assert [m.metadata.dst_node_id for m in again] == [m.metadata.dst_node_id for m in messages[:2]]
    for first, second in zip(messages, again):
        config, before = second.content[P.CONFIG], first.content[P.CONFIG]
        assert config[P.SYNC] == P.SYNC_FULL and config[P.WEIGHTS_CHECKSUM] == strategy.sync.checksum
        assert sorted(second.content[P.WEIGHTS].keys()) == sorted(tiny["base"])
        # the rest as first sent: the adapter to continue from, FedProx's mu, the nonce
        assert {k: v for k, v in config.items() if k not in (P.SYNC, P.SYNC_FROM)} == {
            k: v for k, v in before.items() if k not in (P.SYNC, P.SYNC_FROM)
        }
        assert config[P.PROXIMAL_MU] == 0.01
        assert second.content[P.ADAPTER].keys() == first.content[P.ADAPTER].keys()
    assert strategy.round_log["bytes_down"] == down + 2 * state_bytes(tiny["base"])
    assert strategy.resend_to_stale([reply(messages[3], {}, 8, "site-3", strategy.sync.checksum)]) == []


def test_no_usable_update_aggregates_to_none(tiny):
    strategy = make_strategy(tiny)
    grid, _ = in_memory_grid(3)
    messages = send(strategy, grid, train_steps(strategy.cfg)[0])
    adapter = random_adapter(tiny["reference"], seed=1)
    old = strategy.sync.checksum
    nan = {k: torch.full_like(v, float("nan")) for k, v in adapter.items()}
    aggregated, metrics = strategy.aggregate_train(
        1,
        [
            error_reply(messages[0], "boom"),
            reply(messages[1], nan, 8, "a", old),
            reply(messages[2], adapter, 0, "b", old),
        ],
    )
    assert aggregated is None
    assert strategy.round_log["clients_used"] == [] and len(strategy.round_log["clients_dropped"]) == 3
    assert metrics[P.NUM_EXAMPLES] == 0
    assert strategy.aggregate_train(2, [])[0] is None  # nobody answered


def test_fraction_train_samples_reproducibly_for_a_seed_and_differently_across_seeds(tiny):
    grid, nodes = in_memory_grid(6)
    steps = train_steps(make_config({"scenario": "tiny", "rounds-per-stage": 3}))
    samples = []
    for step in steps:
        sent = []
        for _ in range(2):  # two servers with the same config: the same sites, round by round
            strategy = make_strategy(tiny, **{"fraction-train": 0.5, "rounds-per-stage": 3})
            sent.append(sorted(m.metadata.dst_node_id for m in send(strategy, grid, step)))
            assert sorted(strategy.round_log["sent_to"]) == sent[-1]
        assert sent[0] == sent[1] and len(sent[0]) == 3 and set(sent[0]) <= set(nodes)
        samples.append(tuple(sent[0]))
    assert len({step.seed for step in steps}) == len(steps)
    assert len(set(samples)) > 1  # the rounds' seeds draw different sites
    everyone = make_strategy(tiny)  # fraction-train 1: every node, every round
    assert sorted(m.metadata.dst_node_id for m in send(everyone, grid, steps[0])) == sorted(nodes)


# ---- 3. the FedAvg baseline ---------------------------------------------------------------------------
def test_fedavg_full_averages_all_weights_by_examples_and_keeps_integer_buffers_whole(tiny):
    base = tiny["base"]
    # random weights stand in for trained ones: their update is far longer than a real one's
    strategy = make_strategy(tiny, strategy="fedavg", **{"max-update-norm": 1e9, "max-site-weight": 1.0})
    assert isinstance(strategy, FedAvgFull) and strategy.rule == "weights"
    grid, _ = in_memory_grid(2)
    step = train_steps(strategy.cfg)[0]
    assert step.start == "full"
    messages = send(strategy, grid, step)
    assert all(P.ADAPTER not in m.content and m.content[P.CONFIG][P.SYNC] == P.SYNC_FULL for m in messages)
    generator = torch.Generator().manual_seed(3)
    counters = [k for k, v in base.items() if not v.is_floating_point()]
    assert counters  # BatchNorm's num_batches_tracked
    trained = [
        {
            k: (v + torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v + 4 * (i + 1)
            for k, v in base.items()
        }
        for i in range(2)
    ]  # as a site sends them: every weight and buffer, in its own dtype (client_app -> train_round)
    old = strategy.sync.checksum
    aggregated, _ = strategy.aggregate_train(
        1, [reply(messages[0], trained[0], 3, "a", old), reply(messages[1], trained[1], 9, "b", old)]
    )
    assert strategy.round_log["clients_dropped"] == [], strategy.round_log["clients_dropped"]
    got = tensors(aggregated)
    assert set(got) == set(base) and all(got[k].dtype == base[k].dtype for k in base)
    key = sorted(tiny["adapted"])[0]
    by_hand = (3 * trained[0][key].double() + 9 * trained[1][key].double()) / 12
    torch.testing.assert_close(got[key], by_hand.float(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got[key], base[key])
    for k in counters:  # 0.25 * (n + 4) + 0.75 * (n + 8), rounded back to an integer
        assert torch.equal(
            got[k], torch.round(0.25 * trained[0][k].double() + 0.75 * trained[1][k].double()).long()
        )
    state = ContinualState.start(base)
    state.apply("weights", got)
    assert equal_states(state.base, got) and equal_states(state.weights, got)
    (ops,) = state.log  # the averaged model replaces the weights: dense "set" operations
    assert set(ops) == set(base) and kinds(state.log) == [{"set"}]
    assert equal_states(updates.replay(dict(base), state.log), got)


# ---- 4. a Flower server optimiser on our aggregate ----------------------------------------------------
def test_fedadam_steps_from_the_rounds_start_with_the_aggregates_keys(tiny):
    strategy = make_strategy(
        tiny,
        **{"server-optimizer": "fedadam", "server-lr": 0.01, "rounds-per-stage": 2, "max-site-weight": 1.0},
    )
    assert isinstance(strategy, FedAdam) and isinstance(strategy, ContinualStrategy)
    grid, _ = in_memory_grid(2)
    step = train_steps(strategy.cfg)[1]
    assert step.start == "continue"
    adapter = random_adapter(tiny["reference"], seed=5, size=0.01)
    start = with_zero_residual(adapter, tiny["base"])
    messages = send(strategy, grid, step, start)
    assert all(equal_states(tensors(m.content[P.ADAPTER]), adapter) for m in messages)
    updates = [random_adapter(tiny["reference"], seed=s) for s in (6, 7)]
    old = strategy.sync.checksum
    aggregated, _ = strategy.aggregate_train(
        2, [reply(m, u, n, f"s{n}", old) for m, u, n in zip(messages, updates, (4, 12))]
    )
    plain = aggregate("exact", updates, example_weights([4, 12]), tiny["spec"].scale)
    got = tensors(aggregated)
    assert set(got) == set(plain) and any(k.startswith(RESIDUAL) for k in got)
    assert not equal_states(
        {k: v.double() for k, v in got.items()}, {k: v.double() for k, v in plain.items()}
    )
    # Adam's first step moves every entry from the start towards the aggregate, by at most ~ eta
    for key in sorted(plain):
        delta = plain[key].double() - start[key].double()
        moved = got[key].double() - start[key].double()
        moving = delta.abs() > 1e-6
        assert torch.equal(torch.sign(moved[moving]), torch.sign(delta[moving])), key
        assert moved.abs().max() <= 0.01 * 1.001, key
    assert set(strategy.m_t) == set(plain)  # the moments the checkpoint keeps (optimizer_state)


# ---- 5. the ClientApp on a real site of the tiny scenario --------------------------------------------
def site_context(tmp_path, partition: int, node_id: int, **overrides) -> Context:
    """A simulated SuperNode's context; the run name is the test's, so sites never share state on disk."""
    run_config = {
        **DEFAULTS,
        "scenario": "tiny",
        "output-dir": str(tmp_path),
        "rounds-per-stage": 1,
        "run-name": f"unit-{tmp_path.name}",
        **overrides,
    }
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={"partition-id": partition, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )


@pytest.fixture(scope="module")
def stream():
    return prepare_data(make_config({"scenario": "tiny"}), progress=False)[1]


def test_two_runs_of_one_config_side_by_side_keep_their_sites_state_apart(tiny, stream, tmp_path):
    # the same config written to two output directories (parallel test workers, a sweep beside a
    # benchmark): a site of one run must neither read nor wipe the other's state
    cfg, node = make_config({"scenario": "tiny"}), {"partition-id": 0, "num-partitions": 2}
    first, second = tmp_path / "a" / "same-run", tmp_path / "b" / "same-run"
    assert state_dir(first, "factory-a") != state_dir(second, "factory-a")
    site = load_site(cfg, node, first, run_id=1)
    site.set_state(ContinualState.start(tiny["base"]))
    other = load_site(cfg, node, second, run_id=2)  # another run id: a fresh run of its own
    assert other.state is None and other.state_dir != site.state_dir
    again = load_site(cfg, node, first, run_id=1)  # the worker's cache now holds the other run's site
    assert again is not site and again.checksum == site.checksum == state_checksum(tiny["base"])


def test_client_train_sync_stale_weights_and_evaluate(tiny, stream, tmp_path):
    assert stream.sites == SITES and stream.stages == STAGES
    strategy = make_strategy(tiny, **{"rounds-per-stage": 1, "evaluation": "federated"})
    scale = tiny["spec"].scale
    plan = continual_plan(strategy.cfg, STAGES)
    first, second = train_steps(strategy.cfg)
    grid, nodes = in_memory_grid(2)
    contexts = {node: site_context(tmp_path, i, node, evaluation="federated") for i, node in enumerate(nodes)}
    messages = send(strategy, grid, first)
    replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
    for msg, answer in zip(messages, replies):
        site = SITES[nodes.index(msg.metadata.dst_node_id)]
        assert answer.metadata.src_node_id == msg.metadata.dst_node_id and not answer.has_error()
        arrays = tensors(answer.content[P.ARRAYS])
        assert set(arrays) == set(tiny["reference"])
        assert all(k.endswith((".lora_A", ".lora_B")) and v.dtype == torch.float32 for k, v in arrays.items())
        assert any(k.endswith(".lora_B") and v.abs().sum() > 0 for k, v in arrays.items())  # it trained
        assert answer.content[P.METRICS][P.NUM_EXAMPLES] == stream.num_train(site, 0)
        assert answer.content[P.SITE][P.SITE_NAME] == site
        assert answer.content[P.SITE][P.WEIGHTS_CHECKSUM] == strategy.sync.checksum
        assert set(answer.content.config_records) == {P.SITE}  # no transcripts, no audio
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert sorted(strategy.round_log["clients_used"]) == SITES and aggregated is not None

    # the plan's Aggregate and Merge steps on the server's state, as the ServerApp's walk applies them
    state = ContinualState.start(tiny["base"])
    state.apply(strategy.rule, tensors(aggregated))
    assert plan[plan.index(first) + 2].commit  # stage 0 ends with a committed merge
    state.merge(scale, strategy.cfg.merge, commit=True)
    applied = list(state.log)  # the round's residual, then s * B_bar, A_bar (rank r)
    # the round's residual (absent where it is below the fp32 weights' precision: one short step of two
    # close sites), then the merge
    residual_ops, merge_ops = applied[:-1][0] if len(applied) == 2 else {}, applied[-1]
    assert set(residual_ops) <= set(merge_ops) == tiny["adapted"]
    for key, op in residual_ops.items():  # low-rank where that is smaller, else the dense new weight
        weight = tiny["base"][key]
        if op[0] == "set":
            assert op[1].shape == weight.shape and op[1].dtype == weight.dtype
        else:
            check_lowrank(op, weight, range(1, min(weight.shape)))
        assert check_lowrank(merge_ops[key], weight, range(1, min(weight.shape))) == tiny["spec"].rank
    strategy.sync.update(state.weights, state.log)
    state.log.clear()

    # stage 1: a site gets the operations (not everything) and lands on the server's weights;
    # training the other site in between evicted site A from the worker's cache: its state comes from disk
    messages = send(strategy, grid, second)
    to_a = next(m for m in messages if m.metadata.dst_node_id == nodes[0])
    assert to_a.content[P.CONFIG][P.SYNC] == P.SYNC_CHANGED
    sent = tensors(to_a.content[P.WEIGHTS])
    assert same_ops(updates.from_tensors(sent), applied)
    assert strategy.round_log["bytes_down"] == 2 * state_bytes(sent) == message_bytes(messages)  # no adapter
    answer = client_app.train(to_a, contexts[nodes[0]])
    assert (
        answer.content[P.SITE][P.WEIGHTS_CHECKSUM] == strategy.sync.checksum == state_checksum(state.weights)
    )
    assert answer.content[P.METRICS][P.NUM_EXAMPLES] == stream.num_train(SITES[0], 1)
    held = client_app._site(contexts[nodes[0]])
    assert equal_states(held.state.weights, state.weights)

    # a message that assumes weights the site does not hold
    conf = dict(to_a.content[P.CONFIG])
    conf.update({P.SYNC: P.SYNC_NONE, P.WEIGHTS_CHECKSUM: "0" * 64})
    stale = Message(
        RecordDict({P.CONFIG: ConfigRecord(conf)}), dst_node_id=nodes[0], message_type=MessageType.TRAIN
    )
    with pytest.raises(StaleBase, match=f"{SITES[0]} {P.STALE_BASE}"):  # how the server tells it
        client_app.train(stale, contexts[nodes[0]])

    # federated evaluation (server/server_app.py builds the messages) of the weights + a pending adapter:
    # error counts only, and afterwards the site holds the weights it held before
    strategy.aggregate_train(2, [answer])
    state.apply(strategy.rule, aggregate(strategy.rule, [tensors(answer.content[P.ARRAYS])], [1.0], scale))
    evaluated_weights = state.evaluated(scale)
    assert not equal_states(evaluated_weights, state.weights)
    loopback = LoopbackGrid({nodes[0]: contexts[nodes[0]]})
    result = federated_evaluation(loopback, strategy, STAGES[1], STAGES, evaluated_weights, strategy.cfg)
    (evaluated,) = loopback.replies
    assert not evaluated.has_error(), evaluated.error.reason if evaluated.has_error() else ""
    (sent,) = loopback.sent
    assert set(tensors(sent.content[P.EVALUATED])) == tiny["adapted"]
    metrics = evaluated.content[P.METRICS]
    assert set(evaluated.content) == {P.METRICS, P.SITE} and not evaluated.content.array_records
    # the one string is the site's name (as in a train reply): no transcripts leave the site
    assert dict(evaluated.content[P.SITE]) == {P.SITE_NAME: SITES[0]}
    assert set(metrics) == {P.NUM_EXAMPLES} | {
        f"{s}:{k}" for s in STAGES for k in (P.WORD_ERRORS, P.WORDS, P.CHAR_ERRORS, P.CHARS)
    }
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    tests = {s: stream.test(s, site=SITES[0]) for s in STAGES}
    assert metrics[P.NUM_EXAMPLES] == sum(len(t) for t in tests.values()) > 0
    for s, rows in tests.items():
        assert metrics[f"{s}:{P.WORDS}"] == sum(len(u.text.split()) for u in rows)
        assert metrics[f"{s}:{P.CHARS}"] > metrics[f"{s}:{P.WORDS}"]
        assert result.wer[s] == pytest.approx(
            100.0 * metrics[f"{s}:{P.WORD_ERRORS}"] / metrics[f"{s}:{P.WORDS}"]
        )
    assert result.wer[STAGES[0]] > 0.0  # from the site's counts (0.0 would need a perfect model)
    held = client_app._site(contexts[nodes[0]])
    assert held.checksum == strategy.sync.checksum == state_checksum(held.state.weights)
    assert equal_states(held.state.weights, state.weights)


def test_fedavg_site_trains_all_weights_and_its_reply_is_aggregated(tiny, tmp_path):
    strategy = make_strategy(tiny, strategy="fedavg")
    grid, nodes = in_memory_grid(1)
    context = site_context(tmp_path, 0, nodes[0], strategy="fedavg")
    msg = next(
        m for m in send(strategy, grid, train_steps(strategy.cfg)[0]) if m.metadata.dst_node_id == nodes[0]
    )
    answer = client_app.train(msg, context)
    assert answer.content[P.SITE][P.WEIGHTS_CHECKSUM] == strategy.sync.checksum
    arrays = tensors(answer.content[P.ARRAYS])
    assert set(arrays) == set(tiny["base"])
    assert not torch.equal(
        arrays[sorted(tiny["adapted"])[0]], tiny["base"][sorted(tiny["adapted"])[0]]
    )  # trained
    held = client_app._site(context)
    assert state_checksum(held.state.weights) == held.checksum
    aggregated, _ = strategy.aggregate_train(1, [answer])
    assert strategy.round_log["clients_dropped"] == [], strategy.round_log["clients_dropped"]
    assert equal_states(tensors(aggregated), arrays)  # one site: the mean is its model


# ---- 6. checkpoint ---------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_another_config_is_refused(tiny, tmp_path):
    cfg, scale, reference = tiny["cfg"], tiny["spec"].scale, tiny["reference"]
    state = server_after_round(tiny, [random_adapter(reference, seed=s) for s in (1, 2)], [3, 5], merge=False)
    state.merge(scale, "product", commit=False)  # a pooled chunk, not yet merged
    state.apply(
        "exact", aggregate("exact", [random_adapter(reference, seed=s) for s in (3, 4)], [0.5, 0.5], scale)
    )
    assert state.adapter is not None and len(state.pool) == 1
    assert not equal_states(state.weights, state.base)
    initial = Evaluation(
        "initial",
        {"en-welding": 80.0},
        {"en-welding": 40.0},
        [{"test_set": "en-welding", "id": "u1", "reference": "a b", "hypothesis": "a"}],
    )
    record = RunRecord(
        run_name="unit",
        strategy="centralization",
        schedule={"centralize_every": 1},
        config=cfg.to_dict(),
        stages=STAGES,
        initial=initial,
        after_stage=[Evaluation("en-welding", {"x": 1.0}, {"x": 0.5}, [])],
        rounds=[{"stage": 0, "round": 0, "clients_used": ["a"], "site_checksums": {"a": "c" * 64}}],
        wall_seconds=3.5,
    )
    extra = {"m_t/x.lora_A": torch.randn(2, 3, dtype=torch.float64)}
    path = tmp_path / "run" / CHECKPOINT
    key = next(k for k in state.weights if state.weights[k].dim() == 2)
    state.log = [{key: ("set", state.weights[key])}]  # pending operations for the sites
    save_checkpoint(path, state, record, 7, extra, sites_hold="d" * 64)
    fresh = ContinualState.start(tiny["base"])
    loaded, loaded_record, next_step, loaded_extra, _, sites_hold = load_checkpoint(
        path, fresh, cfg.to_dict()
    )
    assert next_step == 7 and loaded_record == record and equal_states(loaded_extra, extra)
    assert sites_hold == "d" * 64 and list(loaded.log[0]) == [key]
    assert torch.equal(loaded.log[0][key][1], state.weights[key])
    assert equal_states(loaded.base, state.base) and equal_states(loaded.weights, state.weights)
    assert equal_states(loaded.adapter, state.adapter)
    assert len(loaded.pool) == 1 and equal_states(loaded.pool[0], state.pool[0])
    assert state_checksum(loaded.weights) == state_checksum(state.weights)
    assert equal_states(loaded.evaluated(scale), state.evaluated(scale))
    # without an adapter (the round after a merge) it comes back without one
    merged = server_after_round(tiny, [random_adapter(reference, seed=9)], [1], merge=True)
    save_checkpoint(path, merged, record, 3)
    back, _, _, no_extra, _, _ = load_checkpoint(path, fresh, cfg.to_dict())
    assert (
        back.adapter is None and back.pool == [] and equal_states(back.base, merged.base) and no_extra == {}
    )
    # a run-config key that does not change results may differ; one that does is refused
    load_checkpoint(path, fresh, {**cfg.to_dict(), "round-timeout": 5, "resume": True})
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors: made with another run config .*seed"):
        load_checkpoint(path, fresh, make_config({"scenario": "tiny", "seed": 1}).to_dict())
    # a checkpoint of another model is refused with the file's name
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors"):
        load_checkpoint(path, ContinualState.start({"w": torch.zeros(1)}), cfg.to_dict())


def test_a_truncated_corrupted_or_edited_checkpoint_is_refused_naming_the_file(tiny, tmp_path):
    """Server checkpoints and site state files (cl_fed.io) carry a checksum over tensors and metadata;
    loading never unpickles, so a damaged or edited file is an error, never code that runs."""
    import struct

    cfg = make_config({"scenario": "tiny"})
    state = server_after_round(tiny, [random_adapter(tiny["reference"], seed=1)], [1], merge=True)
    record = RunRecord(
        run_name="unit", strategy="centralization", schedule={}, config=cfg.to_dict(), stages=STAGES
    )
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, state, record, 3, secret="ab" * 32)
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the DP secret: the owner's only
    fresh = ContinualState.start(tiny["base"])
    assert load_checkpoint(path, fresh, cfg.to_dict()).secret == "ab" * 32
    good = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", good[:8])[0]

    def refused(data: bytes, words: str) -> None:
        path.write_bytes(data)
        with pytest.raises(ValueError, match=words) as caught:
            load_checkpoint(path, fresh, cfg.to_dict())
        assert str(path) in str(caught.value)

    refused(good[: len(good) // 2], "truncated or corrupted")
    flipped = bytearray(good)
    flipped[header_end + 1000] ^= 0x40  # one bit of one weight
    refused(bytes(flipped), "checksum does not match")
    edited = good.replace(b'\\"next_step\\": 3', b'\\"next_step\\": 1')  # the position, in the JSON metadata
    assert edited != good and len(edited) == len(good)
    refused(edited, "checksum does not match")
    # a DP run refuses a checkpoint that lost its secret: its noise could not be redrawn
    dp = make_config({"scenario": "tiny", "merge": "factors", "weighting": "uniform", "dp-noise": 0.5})
    save_checkpoint(path, state, RunRecord("unit", "centralization", {}, dp.to_dict(), STAGES), 3)
    with pytest.raises(ValueError, match="without the server's noise secret"):
        load_checkpoint(path, fresh, dp.to_dict())


def test_robust_aggregation_and_dp_poisson_sampling_through_the_strategy(tiny):
    from cl_fed.privacy import poisson_sample
    from cl_fed.robust import robust_aggregate

    strategy = make_strategy(tiny, aggregation="median", **{"update-norm-ratio": 0.0})
    grid, _ = in_memory_grid(3)
    messages = send(strategy, grid, train_steps(strategy.cfg)[0])
    updates = [random_adapter(tiny["reference"], seed=s) for s in (1, 2)]
    updates.append({k: 10 * v for k, v in updates[0].items()})  # one far-off site
    old = strategy.sync.checksum
    aggregated, _ = strategy.aggregate_train(
        1, [reply(m, u, n, f"s{i}", old) for i, (m, u, n) in enumerate(zip(messages, updates, (1, 1, 100)))]
    )
    expected = robust_aggregate("exact", updates, tiny["spec"].scale, "median")
    assert equal_states(tensors(aggregated), expected)
    assert strategy.round_log["weights"] == [1 / 3] * 3  # robust statistics count every site once
    # DP with fraction-train < 1: Poisson sampling from the server's secret, as the accountant assumes
    dp = make_strategy(tiny, merge="factors", weighting="uniform", **{"dp-noise": 0.5, "fraction-train": 0.5})
    grid, nodes = in_memory_grid(40)
    step = train_steps(dp.cfg)[0]
    sent = sorted(
        m.metadata.dst_node_id for m in send(dp, grid, step, fresh_factors(tiny["reference"], step.seed))
    )
    assert dp.poisson and dp.expected == 20.0
    assert sent == poisson_sample(nodes, 0.5, step.seed, dp.secret) and 8 < len(sent) < 32


def test_a_resumed_sync_sends_the_pending_operations_then_everything_to_a_node_that_lacks_them():
    held = {"w": torch.zeros(2, 2)}
    now = {"w": torch.ones(2, 2)}
    sync = WeightsSync(now, sites_hold=state_checksum(held))  # as a resumed server builds it
    sync.update(now, [{"w": ("set", now["w"])}])  # the operations the checkpoint kept
    config, records = sync.records(7)
    assert config[P.SYNC] == P.SYNC_CHANGED and config[P.SYNC_FROM] == state_checksum(held)
    assert set(records[P.WEIGHTS].to_torch_state_dict()) == {"0/set/w"}
    # the node turned out to hold something else (its reply failed): next time it gets everything
    sync.nodes.pop(7, None)
    config, records = sync.records(7)
    assert config[P.SYNC] == P.SYNC_FULL and set(records[P.WEIGHTS].to_torch_state_dict()) == {"w"}
