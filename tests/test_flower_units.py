"""The Flower apps' functions called directly with real Flower messages (no `flwr run`).

Server side: what `configure_train` sends, how `aggregate_train` merges or drops replies, the base
sync protocol (`sync_records` -> `clients.client_app.sync_base`), the FedAvg baselines and the
checkpoint. Client side: `train` and `evaluate` on a real site of the tiny scenario.
The server's messages go through Flower's own InMemoryGrid (a real in-memory LinkState with
registered nodes); replies are built as a ClientApp builds them: `Message(content, reply_to=msg)`.
"""

from __future__ import annotations

import secrets

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord as LinkRunRecord
from flwr.serverapp import Grid
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from cl_fed.adapters import adapter_state, attach_lora
from cl_fed.centralize import AdapterPool, average_adapters, centralize, example_weights, state_bytes
from cl_fed.config import DEFAULTS, make_config
from cl_fed.continual import lora_spec, prepare_data, state_checksum
from cl_fed.models.registry import build_model
from cl_fed.models.tiny import NAME as TINY
from cl_fed.results import Evaluation, RunRecord
from clients import client_app
from clients.site import Site, StaleBase
from server.checkpoint import load_checkpoint, save_checkpoint
from server.server_app import federated_evaluation
from server.strategies import STRATEGY_CLASSES, FedAvgFull, MergeInstruction, ServerState

RUN_ID = 4242
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


def in_memory_grid(num_nodes: int) -> tuple[InMemoryGrid, list[int]]:
    """Flower's InMemoryGrid over an in-memory LinkState holding one run and `num_nodes` online nodes."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    link = factory.state()
    run = Run.create_empty(RUN_ID)
    run.primary_task_id, run.federation_id = 17, NOOP_FEDERATION_ID
    link.run_ids[RUN_ID] = LinkRunRecord(run=run)
    link.task_store[17] = Task(task_id=17, run_id=RUN_ID)
    nodes = []
    for _ in range(num_nodes):
        node = link.create_node(
            NOOP_FLWR_AID,
            NOOP_ACCOUNT_NAME,
            secrets.token_bytes(32),
            heartbeat_interval=HEARTBEAT_INTERVAL_INF,
        )
        link.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, nodes


class LoopbackGrid(Grid):
    """Hands each message to the real ClientApp handler of its node, in this process, and turns an
    exception into an error reply as the ClientApp runtime does (used for federated evaluation)."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.replies: list[Message] = []  # every reply, for the test to inspect

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            handler = (
                client_app.train if msg.metadata.message_type == MessageType.TRAIN else client_app.evaluate
            )
            try:
                replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as error:  # noqa: BLE001 - what the runtime sends back
                reason = f"{type(error).__name__}: {error}"
                replies.append(
                    Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
                )
        self.replies += replies
        return replies

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


# ---- a real model's base and adapter shapes ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """The tiny model's base (perturbed, so that a site only holds it once it was sent) and its
    adapters' names and shapes, prepared as server/server_app.py does."""
    cfg = make_config({"scenario": "tiny"})
    speech = build_model(TINY, seed=0)
    spec = lora_spec(cfg, speech)
    probe = attach_lora(speech.model, spec, seed=0)
    reference = {k: v.shape for k, v in adapter_state(probe).items()}
    plain = probe.unload()
    generator = torch.Generator().manual_seed(1)
    base = {}
    for key, value in plain.state_dict().items():
        value = value.detach().clone()
        if value.is_floating_point():
            value += 0.01 * torch.randn(value.shape, generator=generator)
        base[key] = value
    return {"cfg": cfg, "spec": spec, "reference": reference, "base": base}


def random_adapter(reference: dict, seed: int, size: float = 0.05) -> dict[str, torch.Tensor]:
    """A trained-looking adapter (B != 0) of the right names and shapes."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: size * torch.randn(tuple(shape), generator=generator) for k, shape in sorted(reference.items())
    }


def make_strategy(tiny, kind: str = "centralization", num_sites: int = 3, reference=None, **overrides):
    cfg = make_config({"scenario": "tiny", **overrides})
    state = ServerState(base=dict(tiny["base"]), checksum=state_checksum(tiny["base"]))
    return STRATEGY_CLASSES[kind](
        cfg, cfg.schedule(len(STAGES)), state, reference or tiny["reference"], tiny["spec"].scale, num_sites
    )


def reply(
    msg: Message, arrays: dict, num_examples: int, site: str, checksum: str, loss: float = 1.0
) -> Message:
    """What clients/client_app.py's `train` returns."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.clone() for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss, "audio-seconds": 1.0}),
            "site": ConfigRecord({"site": site, "base-checksum": checksum}),
        }
    )
    return Message(content, reply_to=msg)


def error_reply(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def send_round(strategy, num_nodes: int, server_round: int = 1, grid=None):
    """configure_train over a fresh grid of `num_nodes` nodes (or the one given): one message per node."""
    grid = grid or in_memory_grid(num_nodes)[0]
    messages = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(grid.get_node_ids())
    return messages


def equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def merge_round(tiny, merge: str = "product", examples=(8, 6, 7)):
    """The last round of stage 0 with every site's valid reply: a merge into the base."""
    strategy = make_strategy(tiny, merge=merge)
    strategy.stage, strategy.round, strategy.last_round_of_stage = 0, 1, True
    strategy.state.adapter = random_adapter(tiny["reference"], seed=99)  # round 0's average
    messages = send_round(strategy, 3, server_round=2)
    adapters = [random_adapter(tiny["reference"], seed=i) for i in range(3)]
    old = strategy.state.checksum
    replies = [
        reply(m, a, n, f"site-{i}", old, loss=float(i))
        for i, (m, a, n) in enumerate(zip(messages, adapters, examples))
    ]
    _, metrics = strategy.aggregate_train(2, replies)
    return strategy, messages, adapters, list(examples), metrics


# ---- 1. Centralization: merge, average, faults ---------------------------------------------------
def test_last_round_of_stage_merges_the_exact_product_average(tiny):
    old_base = tiny["base"]
    old = state_checksum(old_base)
    strategy, messages, adapters, examples, metrics = merge_round(tiny)
    # what was sent: the full base (no node known yet) and round 0's average adapter to continue from
    for msg in messages:
        conf = msg.content["config"]
        assert conf["sync"] == "full" and conf["base-checksum"] == old and conf["server-round"] == 2
        assert not conf["fresh-adapter"]
        assert equal_states(msg.content["base"].to_torch_state_dict(), old_base)
        assert set(msg.content["adapter"].to_torch_state_dict()) == set(tiny["reference"])
    st = strategy.state
    expected = centralize(old_base, adapters, example_weights(examples), tiny["spec"].scale, "product")
    assert equal_states(st.base, expected)
    assert not equal_states(st.base, old_base)
    assert st.checksum == state_checksum(expected) != old
    assert st.instruction.source == old and st.instruction.target == st.checksum
    assert st.instruction.weights == example_weights(examples)
    assert all(equal_states(a, b) for a, b in zip(st.instruction.adapters, adapters))
    assert st.adapter is None  # the next stage starts a fresh adapter
    assert strategy.round_log["merged"] and strategy.round_log["clients_dropped"] == []
    assert strategy.round_log["clients_used"] == ["site-0", "site-1", "site-2"]
    assert metrics["num-examples"] == sum(examples)
    assert metrics["train-loss"] == pytest.approx((0 * 8 + 1 * 6 + 2 * 7) / 21)
    assert set(st.node_base.values()) == {old}  # what the sites reported holding

    factors, *_ = merge_round(tiny, merge="factors")
    expected_factors = centralize(
        old_base, adapters, example_weights(examples), tiny["spec"].scale, "factors"
    )
    assert equal_states(factors.state.base, expected_factors)
    assert factors.state.checksum != st.checksum
    lora_weights = {k.rsplit(".", 1)[0] + ".weight" for k in tiny["reference"]}
    assert all(not torch.equal(factors.state.base[k], st.base[k]) for k in lora_weights)


def test_earlier_round_of_a_stage_averages_the_adapters(tiny):
    strategy = make_strategy(tiny)
    strategy.stage, strategy.round, strategy.last_round_of_stage = 0, 0, False
    messages = send_round(strategy, 3)
    assert all(m.content["config"]["fresh-adapter"] and "adapter" not in m.content for m in messages)
    adapters = [random_adapter(tiny["reference"], seed=10 + i) for i in range(3)]
    old = strategy.state.checksum
    strategy.aggregate_train(
        1, [reply(m, a, n, f"s{n}", old) for m, a, n in zip(messages, adapters, (4, 9, 2))]
    )
    st = strategy.state
    assert equal_states(st.adapter, average_adapters(adapters, example_weights([4, 9, 2])))
    assert st.checksum == old and equal_states(st.base, tiny["base"])
    assert st.instruction is None and st.pool is None and not strategy.round_log["merged"]
    # the next round continues from that average
    again = send_round(strategy, 3, server_round=2)
    assert all(equal_states(m.content["adapter"].to_torch_state_dict(), st.adapter) for m in again)


def test_bad_replies_are_dropped_with_a_reason_and_the_rest_is_merged(tiny):
    good = [random_adapter(tiny["reference"], seed=20 + i) for i in range(2)]
    norm = max(torch.linalg.vector_norm(torch.cat([v.flatten() for v in a.values()])) for a in good)
    strategy = make_strategy(tiny, num_sites=7, **{"max-update-norm": float(2 * norm)})
    strategy.stage, strategy.round, strategy.last_round_of_stage = 0, 1, True
    messages = send_round(strategy, 7)
    old = strategy.state.checksum
    nan = {k: torch.full_like(v, float("nan")) for k, v in good[0].items()}
    key = sorted(tiny["reference"])[0]
    wrong_shape = {**good[0], key: good[0][key][:-1]}
    too_big = {k: 10 * v for k, v in good[1].items()}
    n = [m.metadata.dst_node_id for m in messages]
    replies = [
        reply(messages[0], good[0], 8, "good-0", old),
        reply(messages[1], good[1], 5, "good-1", old),
        error_reply(
            messages[2], "Traceback (most recent call last):\n  ...\nInjectedCrash: injected fault at site x"
        ),
        reply(messages[3], nan, 8, "nan", old),
        reply(messages[4], wrong_shape, 8, "shape", old),
        reply(messages[5], too_big, 8, "norm", old),
        # messages[6]: no reply within the round's timeout
    ]
    strategy.aggregate_train(2, replies)
    log = strategy.round_log
    assert log["clients_used"] == ["good-0", "good-1"] and log["num_examples"] == [8, 5]
    reasons = {d["node"]: d["reason"] for d in log["clients_dropped"]}
    assert set(reasons) == set(n[2:])
    assert reasons[n[2]].startswith("client error") and "InjectedCrash" in reasons[n[2]]
    assert "NaN" in reasons[n[3]]
    assert "shape" in reasons[n[4]] and key in reasons[n[4]]
    assert "norm" in reasons[n[5]]
    assert reasons[n[6]] == f"no reply within {strategy.cfg.round_timeout} s"
    st = strategy.state
    expected = centralize(tiny["base"], good, example_weights([8, 5]), tiny["spec"].scale, "product")
    assert equal_states(st.base, expected)
    assert all(torch.isfinite(v).all() for v in st.base.values() if v.is_floating_point())
    assert st.instruction.weights == example_weights([8, 5])
    # a crashed or silent node's base is unknown now: it gets the full base next time
    assert (
        strategy.sync_records(n[2])[0]["sync"] == "full" and strategy.sync_records(n[6])[0]["sync"] == "full"
    )
    assert strategy.sync_records(n[3])[0]["sync"] == "merge"  # it answered: it still holds the old base


def test_no_usable_reply_leaves_the_base_unchanged(tiny):
    strategy = make_strategy(tiny, num_sites=4, **{"max-update-norm": 1.0})
    strategy.stage, strategy.round, strategy.last_round_of_stage = 0, 1, True
    messages = send_round(strategy, 4)
    old = strategy.state.checksum
    adapter = random_adapter(tiny["reference"], seed=5)  # its norm is far above 1.0
    nan = {k: torch.full_like(v, float("nan")) for k, v in adapter.items()}
    _, metrics = strategy.aggregate_train(
        2,
        [
            error_reply(messages[0], "boom"),
            reply(messages[1], nan, 8, "a", old),
            reply(messages[2], adapter, 8, "b", old),
        ],
    )
    st = strategy.state
    assert st.checksum == old and equal_states(st.base, tiny["base"])
    assert st.instruction is None and st.pool is None and not strategy.round_log["merged"]
    assert strategy.round_log["clients_used"] == [] and len(strategy.round_log["clients_dropped"]) == 4
    assert metrics["num-examples"] == 0


# ---- 2. the base sync protocol ---------------------------------------------------------------------
def test_sync_records_full_merge_none_and_the_client_reproduces_the_merge(tiny, tmp_path):
    strategy, messages, adapters, examples, _ = merge_round(tiny)
    st = strategy.state
    merge_node, unknown_node, current_node = [m.metadata.dst_node_id for m in messages]
    st.node_base.pop(unknown_node)
    st.node_base[current_node] = st.checksum

    conf, records = strategy.sync_records(unknown_node)
    assert conf["sync"] == "full" and conf["base-checksum"] == st.checksum and set(records) == {"base"}
    assert equal_states(records["base"].to_torch_state_dict(), st.base)
    full_bytes = state_bytes(records["base"].to_torch_state_dict())

    conf, records = strategy.sync_records(current_node)
    assert conf["sync"] == "none" and conf["base-checksum"] == st.checksum and records == {}

    conf, records = strategy.sync_records(merge_node)
    assert (
        conf["sync"] == "merge"
        and conf["base-from"] == state_checksum(tiny["base"])
        and set(records) == {"merge"}
    )
    assert conf["merge-count"] == 3 and conf["merge-weights"] == example_weights(examples)
    assert conf["merge-scale"] == tiny["spec"].scale and conf["merge-mode"] == "product"
    merge_bytes = state_bytes(records["merge"].to_torch_state_dict())
    assert merge_bytes * 5 < full_bytes
    # the client's own code: a site holding the old base applies the instruction and lands on the new one
    speech = build_model(TINY, seed=0)
    speech.model = attach_lora(speech.model, tiny["spec"], seed=0)
    site = Site("factory-a", strategy.cfg, stream=None, speech=speech, checksum="", state_dir=tmp_path)
    site.set_base(tiny["base"])
    message = Message(
        RecordDict({**records, "config": ConfigRecord(conf)}),
        dst_node_id=merge_node,
        message_type=MessageType.TRAIN,
    )
    client_app.sync_base(site, message)
    assert site.checksum == st.checksum == state_checksum(site.base())
    assert equal_states(site.base(), st.base)
    assert torch.load(tmp_path / "base.pt", weights_only=True)["checksum"] == st.checksum
    # a site on another base cannot use the instruction: it must say so, not train on the wrong base
    other = {k: v + 1 if v.is_floating_point() else v for k, v in tiny["base"].items()}
    site.set_base(other)
    with pytest.raises(StaleBase, match="factory-a"):
        client_app.sync_base(site, message)


# ---- 3. the ClientApp on a real site of the tiny scenario --------------------------------------------
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


def test_client_train_sync_merge_stale_base_and_evaluate(tiny, stream, tmp_path):
    assert stream.sites == SITES and stream.stages == STAGES
    strategy = make_strategy(tiny, num_sites=2, **{"rounds-per-stage": 1})
    strategy.stage, strategy.round, strategy.last_round_of_stage = 0, 0, True
    grid, nodes = in_memory_grid(2)
    contexts = {node: site_context(tmp_path, i, node) for i, node in enumerate(nodes)}
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = [client_app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
    for msg, answer in zip(messages, replies):
        site = SITES[nodes.index(msg.metadata.dst_node_id)]
        assert answer.metadata.src_node_id == msg.metadata.dst_node_id and not answer.has_error()
        arrays = answer.content["arrays"].to_torch_state_dict()
        assert set(arrays) == set(tiny["reference"])
        assert all(k.endswith((".lora_A", ".lora_B")) and v.dtype == torch.float32 for k, v in arrays.items())
        assert any(k.endswith(".lora_B") and v.abs().sum() > 0 for k, v in arrays.items())  # it trained
        assert answer.content["metrics"]["num-examples"] == stream.num_train(site, 0)
        assert answer.content["site"]["site"] == site
        assert answer.content["site"]["base-checksum"] == strategy.state.checksum
        assert set(answer.content.config_records) == {"site"}  # no transcripts, no audio
    strategy.aggregate_train(1, replies)
    assert strategy.round_log["merged"] and sorted(strategy.round_log["clients_used"]) == SITES

    # stage 1: the sites get the merge instruction (not the base) and land on the server's new base;
    # training the other site in between evicted site A from the worker's cache: its base comes from disk
    strategy.stage = 1
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    first = next(m for m in messages if m.metadata.dst_node_id == nodes[0])
    assert first.content["config"]["sync"] == "merge" and "base" not in first.content
    answer = client_app.train(first, contexts[nodes[0]])
    assert answer.content["site"]["base-checksum"] == strategy.state.checksum
    assert answer.content["metrics"]["num-examples"] == stream.num_train(SITES[0], 1)

    # a message that assumes a base the site does not hold
    conf = dict(first.content["config"])
    conf.update(sync="none", **{"base-checksum": "0" * 64})
    stale = Message(
        RecordDict({"config": ConfigRecord(conf)}), dst_node_id=nodes[0], message_type=MessageType.TRAIN
    )
    with pytest.raises(StaleBase, match=SITES[0]):
        client_app.train(stale, contexts[nodes[0]])

    # federated evaluation (server/server_app.py builds the messages) of the base + a pending adapter:
    # error counts only, and afterwards the site holds the base and adapter it held before
    strategy.state.node_base[nodes[0]] = strategy.state.checksum  # as after stage 1's aggregation
    pending = answer.content["arrays"].to_torch_state_dict()
    held = client_app._site(contexts[nodes[0]])
    adapter_before = adapter_state(held.speech.model)
    loopback = LoopbackGrid({nodes[0]: contexts[nodes[0]]})
    result = federated_evaluation(loopback, strategy, STAGES[1], STAGES, [pending], [1.0], strategy.cfg)
    (evaluated,) = loopback.replies
    assert not evaluated.has_error(), evaluated.error.reason if evaluated.has_error() else ""
    metrics = evaluated.content["metrics"]
    assert set(evaluated.content) == {"metrics"} and not evaluated.content.array_records
    assert not evaluated.content.config_records  # no strings: no transcripts leave the site
    assert set(metrics) == {"num-examples"} | {
        f"{s}:{k}" for s in STAGES for k in ("word-errors", "words", "char-errors", "chars")
    }
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    tests = {s: stream.test(s, site=SITES[0]) for s in STAGES}
    assert metrics["num-examples"] == sum(len(t) for t in tests.values()) > 0
    for s, rows in tests.items():
        assert metrics[f"{s}:words"] == sum(len(u.text.split()) for u in rows)
        assert metrics[f"{s}:chars"] > metrics[f"{s}:words"]
        assert result.wer[s] == pytest.approx(100.0 * metrics[f"{s}:word-errors"] / metrics[f"{s}:words"])
    assert held.checksum == strategy.state.checksum == state_checksum(held.base())
    assert equal_states(adapter_state(held.speech.model), adapter_before)


def test_federated_evaluation_right_after_a_merge(tiny, stream, tmp_path):
    strategy = make_strategy(tiny, num_sites=2, evaluation="federated", **{"rounds-per-stage": 1})
    strategy.stage, strategy.round, strategy.last_round_of_stage = 0, 0, True
    contexts = {
        101: site_context(tmp_path, 0, 101, evaluation="federated"),
        102: site_context(tmp_path, 1, 102, evaluation="federated"),
    }
    grid = LoopbackGrid(contexts)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    assert strategy.round_log["merged"] and strategy.round_log["clients_dropped"] == []
    adapters, weights = strategy.pending()
    result = federated_evaluation(grid, strategy, STAGES[0], STAGES, adapters, weights, strategy.cfg)
    # 0.0 for every test set would need a perfect model; these figures must come from the sites' counts
    assert result.wer[STAGES[0]] > 0.0


# ---- 4. the FedAvg baselines ---------------------------------------------------------------------------
def test_fedavg_full_averages_all_weights_by_examples(tiny):
    base = tiny["base"]
    reference = {k: v.shape for k, v in base.items()}
    strategy = make_strategy(tiny, kind="fedavg", num_sites=2, reference=reference, strategy="fedavg")
    assert isinstance(strategy, FedAvgFull)
    messages = send_round(strategy, 2)
    assert all(not m.content["config"]["fresh-adapter"] and "adapter" not in m.content for m in messages)
    generator = torch.Generator().manual_seed(3)
    trained = [
        {
            k: (v + torch.randn(v.shape, generator=generator))
            if v.is_floating_point()
            else v.to(torch.float32)
            for k, v in base.items()
        }
        for _ in range(2)
    ]
    old = strategy.state.checksum
    strategy.aggregate_train(
        1, [reply(messages[0], trained[0], 3, "a", old), reply(messages[1], trained[1], 9, "b", old)]
    )
    st = strategy.state
    key = next(k for k in tiny["reference"]).rsplit(".", 1)[0] + ".weight"
    by_hand = (3 * trained[0][key].double() + 9 * trained[1][key].double()) / 12
    torch.testing.assert_close(st.base[key], by_hand.float(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(st.base[key], base[key])
    assert all(st.base[k].dtype == base[k].dtype for k in base)
    assert st.checksum == state_checksum(st.base) != old and st.instruction is None


def test_fedavg_full_keeps_integer_buffers_whole(tiny):
    base = tiny["base"]
    strategy = make_strategy(
        tiny, kind="fedavg", reference={k: v.shape for k, v in base.items()}, strategy="fedavg"
    )
    messages = send_round(strategy, 3)
    trained = {
        k: torch.full_like(v, 7.0, dtype=torch.float32) if not v.is_floating_point() else v
        for k, v in base.items()
    }
    old = strategy.state.checksum
    strategy.aggregate_train(1, [reply(m, trained, 1, str(i), old) for i, m in enumerate(messages)])
    counters = [k for k, v in base.items() if not v.is_floating_point()]
    assert counters and all(int(strategy.state.base[k]) == 7 for k in counters)


def test_fedavg_site_holds_the_base_it_reports_after_training(tiny, tmp_path):
    strategy = make_strategy(
        tiny,
        kind="fedavg",
        num_sites=2,
        reference={k: v.shape for k, v in tiny["base"].items()},
        strategy="fedavg",
    )
    grid, nodes = in_memory_grid(2)
    context = site_context(tmp_path, 0, nodes[0], strategy="fedavg")
    msg = next(m for m in send_round(strategy, 2, grid=grid) if m.metadata.dst_node_id == nodes[0])
    answer = client_app.train(msg, context)
    assert answer.content["site"]["base-checksum"] == strategy.state.checksum
    assert not equal_states(
        answer.content["arrays"].to_torch_state_dict(), {k: v.float() for k, v in tiny["base"].items()}
    )  # it trained all weights
    held = client_app._site(context)
    assert state_checksum(held.base()) == held.checksum


def test_fedavg_lora_never_changes_the_base(tiny):
    strategy = make_strategy(tiny, kind="fedavg-lora", strategy="fedavg-lora")
    old = strategy.state.checksum
    grid, _ = in_memory_grid(3)
    for server_round, last in ((1, False), (2, True)):  # the last round of a stage does not merge either
        strategy.round, strategy.last_round_of_stage = server_round - 1, last
        messages = send_round(strategy, 3, server_round, grid)
        assert messages[0].content["config"]["sync"] == ("full" if server_round == 1 else "none")
        adapters = [random_adapter(tiny["reference"], seed=40 + 3 * server_round + i) for i in range(3)]
        strategy.aggregate_train(
            server_round,
            [reply(m, a, 4 + i, str(i), old) for i, (m, a) in enumerate(zip(messages, adapters))],
        )
        assert equal_states(strategy.state.adapter, average_adapters(adapters, example_weights([4, 5, 6])))
        assert strategy.state.checksum == old and equal_states(strategy.state.base, tiny["base"])
        assert strategy.state.instruction is None and not strategy.round_log["merged"]
    pending, weights = strategy.pending()
    assert weights == [1.0] and equal_states(pending[0], strategy.state.adapter)
    later = send_round(strategy, 3, 3, grid)  # every site holds the unchanged base: nothing to sync
    assert all(m.content["config"]["sync"] == "none" and "base" not in m.content for m in later)
    assert all(
        equal_states(m.content["adapter"].to_torch_state_dict(), strategy.state.adapter) for m in later
    )


# ---- 5. checkpoint ---------------------------------------------------------------------------------
def test_checkpoint_round_trip(tiny, tmp_path):
    strategy, *_ = merge_round(tiny)
    st = strategy.state
    st.adapter = random_adapter(tiny["reference"], seed=7)
    pool = AdapterPool(2)
    pool.add([random_adapter(tiny["reference"], seed=8)], [1.0])
    st.pool = pool.state_dict()
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
        config={"seed": 0},
        stages=STAGES,
        initial=initial,
        after_stage=[Evaluation("en-welding", {"x": 1.0}, {"x": 0.5}, [])],
        rounds=[{"stage": 0, "round": 0, "clients_used": ["a"]}],
        wall_seconds=3.5,
    )
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, st, record, (1, 0))
    fresh = ServerState(base=dict(tiny["base"]), checksum=state_checksum(tiny["base"]))
    loaded, loaded_record, position = load_checkpoint(path, fresh)
    assert position == (1, 0)
    assert equal_states(loaded.base, st.base) and loaded.checksum == st.checksum == state_checksum(
        loaded.base
    )
    assert equal_states(loaded.adapter, st.adapter)
    restored = AdapterPool(2)
    restored.load_state_dict(loaded.pool)
    (got,), (want,) = restored.drain()[0], pool.drain()[0]
    assert equal_states(got, want)
    assert isinstance(loaded.instruction, MergeInstruction)
    assert (loaded.instruction.source, loaded.instruction.target) == (
        st.instruction.source,
        st.instruction.target,
    )
    assert loaded.instruction.weights == st.instruction.weights
    assert all(equal_states(a, b) for a, b in zip(loaded.instruction.adapters, st.instruction.adapters))
    assert loaded_record == record
    # a checkpoint of another model is refused with the file's name
    other = ServerState(base={"w": torch.zeros(1)}, checksum="x")
    with pytest.raises(ValueError, match="checkpoint.pt"):
        load_checkpoint(path, other)
