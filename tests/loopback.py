"""Flower plumbing for in-process tests: the real ServerApp loop and ClientApp handlers, no processes.

`LoopbackGrid` hands each message to the real ClientApp handler of its node in this process, through
the mods the real ClientApp installs (`MODS`, in its order), and turns an exception into an error
reply as the ClientApp runtime does; `in_memory_grid` is Flower's
own InMemoryGrid over an in-memory LinkState. `run_in_process(run_config, sites)` drives
server.server_app.run_server over a LoopbackGrid of one context per site (partition ids 0..n-1).
"""

from __future__ import annotations

import secrets

import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
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

from clients import client_app
from clients.audit import audit_messages

RUN_ID = 4242


@pytest.fixture(autouse=True)
def one_thread_and_task_identity(monkeypatch):
    """Import into a test module that runs in process: sites train with 1 thread (clients/client_app.py),
    so the runner must too to compare bits; messages built outside a Flower process need the task
    identity Flower sets in its processes; no faults unless a test injects them."""
    monkeypatch.delenv("CL_FED_FAULTS_FILE", raising=False)
    threads = torch.get_num_threads()
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# what clients/client_app.py installs, outermost first: ClientApp(mods=[audit_messages, clip_adapter_update])
MODS = (audit_messages, client_app.clip_adapter_update)


def with_mods(handler, mods=MODS):
    """`handler` wrapped in `mods` as Flower's ClientApp chains them: mods[0] sees the message first."""

    def wrap(mod, call_next):
        return lambda msg, context: mod(msg, context, call_next)

    for mod in reversed(mods):
        handler = wrap(mod, handler)
    return handler


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
    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.replies: list[Message] = []  # every reply, for the test to inspect
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            handler = with_mods(
                client_app.train if msg.metadata.message_type == MessageType.TRAIN else client_app.evaluate
            )
            self.sent.append(msg)
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


def site_contexts(run_config: dict, sites: int, run_id: int = RUN_ID) -> dict[int, Context]:
    """One ClientApp context per site, as the simulation engine makes them (node ids 101, 102, ...)."""
    return {
        101 + i: Context(
            run_id=run_id,
            node_id=101 + i,
            node_config={"partition-id": i, "num-partitions": sites},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for i in range(sites)
    }


_RUNS = 0


def run_in_process(run_config: dict, sites: int):
    """(run directory, grid) of a federated run through the real ServerApp loop and ClientApp handlers.
    Each call is a new run (its own run id, as Flower gives one), so sites never reuse an earlier
    run's state unless it resumes."""
    from server.server_app import run_server

    global _RUNS
    _RUNS += 1
    grid = LoopbackGrid(site_contexts(run_config, sites, run_id=RUN_ID + _RUNS))
    return run_server(grid, run_config), grid
