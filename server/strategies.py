"""Strategies: Flower's FedAvg does the sampling and failure logging; these decide what is sent
to each site and what the server does with the replies.

    centralization  LoRA factors; average round to round, merge into the base on the schedule
    fedavg          all weights, trained in full, averaged every round (the naive baseline)
    fedavg-lora     LoRA factors averaged every round, never merged: the base never changes
    local           every site trains and merges alone; the server only keeps time

Every train message names the base the site must hold (its checksum). A site whose base the
server knows to be one merge behind gets the merge instruction (the adapters and weights);
any other site gets the full base.

Differential privacy (`dp-noise` > 0; the math in cl_fed/privacy.py): every train message carries
the clipping norm under Flower's key and the adapter the site starts from (a fresh one too), the
site's `fixedclipping_mod` clips its update to it, the server clips again (a site without the mod
cannot exceed the bound) and replaces the round's updates by their noised mean before anything
is averaged, pooled or merged. Flower's `DifferentialPrivacyClientSideFixedClipping` wrapper is
not used: it only noises the ArrayRecord a strategy's aggregate_train returns, and ours return
none (they update averages, pools and the base in place); its noise comes from the unseeded global
NumPy RNG (a run must be reproducible under its seed); one failed site makes it skip the whole
round, where ours drop that site; and its accountant accepts only FedAvg.aggregate_train.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cl_fed.centralize import (
    AdapterPool,
    AdapterRejected,
    average_adapters,
    centralize,
    example_weights,
    state_bytes,
    validate_adapter,
)
from cl_fed.config import RunConfig
from cl_fed.continual import round_seed, state_checksum
from cl_fed.privacy import clip_update, noise_seed, noise_std, noised_mean, update_norm
from cl_fed.schedule import Schedule

log = logging.getLogger("cl_fed.server")


@dataclass
class MergeInstruction:
    """How to go from base `source` to base `target`: centralize(base, adapters, weights, ...)."""

    source: str
    target: str
    adapters: list[dict[str, torch.Tensor]]
    weights: list[float]


@dataclass
class ServerState:
    """Everything the server needs to continue a run; checkpointed after every round."""

    base: dict[str, torch.Tensor]
    checksum: str
    adapter: dict[str, torch.Tensor] | None = None  # the adapter sites continue from (None = fresh)
    pool: dict | None = None  # AdapterPool.state_dict()
    instruction: MergeInstruction | None = None
    node_base: dict[int, str] = field(default_factory=dict)  # what each node was last seen holding


def stack(adapters: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{i}/{k}": v for i, a in enumerate(adapters) for k, v in a.items()}


class ContinualStrategy(FedAvg):
    lora = True

    def __init__(
        self,
        cfg: RunConfig,
        schedule: Schedule,
        state: ServerState,
        reference: dict,
        scale: float,
        num_sites: int,
    ):
        # the ServerApp waits for every site before the first round (wait_for_sites); after that a
        # site that is gone (a killed SuperNode) must not stall the run, so rounds go on with those online
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
        )
        self.cfg, self.schedule, self.state = cfg, schedule, state
        self.reference = reference  # expected key -> shape of a reply's arrays
        self.scale = scale
        self.stage = self.round = 0
        self.last_round_of_stage = False
        self.round_log: dict = {}
        self.dp = cfg.dp_noise > 0
        # DP: the adapter a site's reset_adapters(seed) starts from (set by the ServerApp, which has the model)
        self.fresh_adapter: Callable[[int], dict[str, torch.Tensor]] | None = None
        self.round_start: dict[str, torch.Tensor] | None = None  # what this round's sites start from
        self.sent: list[Message] = []  # this round's train messages (their ids are set when pushed)

    # ---- what each site is sent ---------------------------------------------------------------
    def adapter_seed(self) -> int:
        return round_seed(self.cfg, self.stage, self.round)

    def round_config(self) -> dict:
        config = {
            "stage": self.stage,
            "round": self.round,
            "strategy": self.cfg.strategy,
            "adapter-seed": self.adapter_seed(),
            "fresh-adapter": self.state.adapter is None,
            "merge-now": False,
            "pool-now": False,
            "pool-size": 1,
        }
        if self.dp:
            config[KEY_CLIPPING_NORM] = self.cfg.dp_clip  # what Flower's fixedclipping_mod reads
        return config

    def start_adapter(self) -> dict[str, torch.Tensor] | None:
        """The adapter this round's sites start from, when it is sent: the running average, or with
        DP also a fresh one (the clipping mod measures each update from the adapter it received)."""
        if not self.lora:
            return None
        if self.state.adapter is not None:
            return self.state.adapter
        if not self.dp:
            return None  # the sites draw the fresh adapter from adapter-seed themselves
        if self.fresh_adapter is None:
            raise RuntimeError("dp-noise > 0 needs strategy.fresh_adapter (set by server/server_app.py)")
        return self.fresh_adapter(self.adapter_seed())

    def sync_records(self, node: int) -> tuple[dict, dict]:
        """(config fields, array records) that bring `node` to the current base."""
        st = self.state
        config = {
            "base-checksum": st.checksum,
            "sync": "none",
            "base-from": "",
            "merge-count": 0,
            "merge-weights": [0.0],
            "merge-scale": self.scale,
            "merge-mode": self.cfg.merge,
        }
        held = st.node_base.get(node)
        if held == st.checksum:
            return config, {}
        if st.instruction and held == st.instruction.source and st.instruction.target == st.checksum:
            config.update(
                sync="merge",
                **{
                    "base-from": held,
                    "merge-count": len(st.instruction.adapters),
                    "merge-weights": list(st.instruction.weights),
                },
            )
            return config, {"merge": ArrayRecord(stack(st.instruction.adapters))}
        config["sync"] = "full"
        return config, {"base": ArrayRecord(st.base)}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        sampled = super().configure_train(server_round, arrays, config, grid)  # FedAvg's sampling
        messages, down = [], 0
        self.round_start = self.start_adapter()
        for node in [m.metadata.dst_node_id for m in sampled]:
            sync, records = self.sync_records(node)
            if self.round_start is not None:
                records["adapter"] = ArrayRecord(self.round_start)
            content = RecordDict(
                {
                    **records,
                    "config": ConfigRecord({**self.round_config(), **sync, "server-round": server_round}),
                }
            )
            down += sum(state_bytes(r.to_torch_state_dict()) for r in records.values())
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self.round_log = {
            "stage": self.stage,
            "round": self.round,
            "server_round": server_round,
            "sent_to": [m.metadata.dst_node_id for m in messages],
            "bytes_down": down,
        }
        self.sent = messages
        return messages

    def replying_node(self, reply: Message) -> int:
        """The node a reply is about: its sender, except for the error the SuperLink itself returns
        for a node that stopped sending heartbeats (a dead SuperNode), which names the message it answers."""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    # ---- what the server does with the replies -----------------------------------------------
    def check_reply(self, arrays: dict[str, torch.Tensor]) -> None:
        max_norm = self.cfg.max_update_norm if self.lora else None
        validate_adapter(arrays, self.reference, max_norm=max_norm)

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        used, dropped, adapters, examples, losses, up = [], [], [], [], [], 0
        for msg in errors:
            node = self.replying_node(msg)
            self.state.node_base.pop(node, None)  # unknown now: send the full base next time
            dropped.append({"node": node, "reason": f"client error: {last_line(msg.error.reason)}"})
        answered = {self.replying_node(m) for m in replies}
        skipped: dict[str, int] = {}  # site -> manifest rows it skipped (bad-rows=skip)
        for node in self.round_log.get("sent_to", []):
            if node not in answered:
                self.state.node_base.pop(node, None)
                dropped.append({"node": node, "reason": f"no reply within {self.cfg.round_timeout} s"})
        for msg in valid:
            node = msg.metadata.src_node_id
            site = str(msg.content["site"]["site"]) if "site" in msg.content else str(node)
            self.state.node_base[node] = (
                str(msg.content["site"]["base-checksum"]) if "site" in msg.content else ""
            )
            try:
                arrays = {k: v.clone() for k, v in msg.content["arrays"].to_torch_state_dict().items()}
                up += state_bytes(arrays)
                self.check_reply(arrays)
                metrics = msg.content["metrics"]
                n = int(metrics["num-examples"])
                if n <= 0:
                    raise AdapterRejected(f"num-examples={n}")
            except (AdapterRejected, KeyError, ValueError) as error:
                log.warning("round %s: update from site %s rejected: %s", server_round, site, error)
                dropped.append({"node": node, "site": site, "reason": f"rejected: {error}"})
                continue
            used.append(site)
            if int(metrics.get("rows-skipped", 0)):
                skipped[site] = int(metrics["rows-skipped"])
            adapters.append(arrays)
            examples.append(n)
            losses.append(float(metrics["train-loss"]))
        self.round_log.update(
            clients_used=used,
            clients_dropped=dropped,
            rows_skipped=skipped,
            losses=losses,
            num_examples=examples,
            bytes_up=up,
            merged=False,
        )
        self.sent = []
        if adapters:
            weights = example_weights(examples, uniform=self.cfg.weighting == "uniform")
            if self.dp:
                adapters, weights = [self.privatize(adapters, used, server_round)], [1.0]
            self.combine(adapters, weights)
        else:
            log.warning("round %s: no usable update; the model is unchanged", server_round)
            self.no_update()
        loss = (
            sum(l * n for l, n in zip(losses, examples)) / max(sum(examples), 1) if losses else float("nan")
        )
        return None, MetricRecord({"train-loss": loss, "num-examples": sum(examples)})

    def privatize(self, adapters: list[dict], sites: list[str], server_round: int) -> dict[str, torch.Tensor]:
        """DP: each update clipped to dp-clip (again: a site's mod already did), then their mean plus
        N(0, (z C / n)^2), seeded by the run seed and round (and the server's CL_FED_DP_SECRET)."""
        clip, clipped = self.cfg.dp_clip, []
        for site, adapter in zip(sites, adapters):
            norm = update_norm(adapter, self.round_start)
            if norm > clip * (1 + 1e-4):  # more than the float32 rounding of a clipped update
                log.warning(
                    "round %s: site %s sent an update of norm %.6g > dp-clip %.6g (is its clipping mod "
                    "installed?); clipped on the server",
                    server_round,
                    site,
                    norm,
                    clip,
                )
            clipped.append(clip_update(adapter, self.round_start, clip))
        std = noise_std(self.cfg.dp_noise, clip, len(clipped))
        seed = noise_seed(self.adapter_seed(), os.environ.get("CL_FED_DP_SECRET", ""))
        self.round_log["dp_noise_std"] = std
        return noised_mean(clipped, std, seed)

    def combine(self, adapters: list[dict], weights: list[float]) -> None:
        raise NotImplementedError

    def no_update(self) -> None:
        """A round in which no site's update could be used."""

    # ---- merging --------------------------------------------------------------------------------
    def merge(self, adapters: list[dict], weights: list[float]) -> None:
        st = self.state
        new_base = centralize(st.base, adapters, weights, self.scale, self.cfg.merge)
        new_checksum = state_checksum(new_base)
        st.instruction = MergeInstruction(st.checksum, new_checksum, adapters, weights)
        st.base, st.checksum, st.adapter = new_base, new_checksum, None
        self.round_log["merged"] = True

    def pending(self) -> tuple[list[dict], list[float]]:
        """Adapters the evaluated model carries on top of the base."""
        if self.state.pool:
            pool = AdapterPool(self.state.pool["size"])
            pool.load_state_dict(self.state.pool)
            if len(pool):
                return pool.pending()
        return [], []


class Centralization(ContinualStrategy):
    def combine(self, adapters, weights):
        st = self.state
        if self.schedule.merge_after_round():
            self.merge(adapters, weights)
            return
        if not self.last_round_of_stage:
            st.adapter = average_adapters(adapters, weights)  # sites continue from the average
            return
        pool = AdapterPool(self.schedule.every)
        if st.pool:
            pool.load_state_dict(st.pool)
        pool.add(adapters, weights)  # exact: every site's factors, not their average
        st.adapter = None  # the next chunk starts a fresh adapter
        if self.schedule.merge_after_stage(self.stage):
            self.merge(*pool.drain())
        st.pool = pool.state_dict()

    def no_update(self):
        # the stage still ends: what the earlier rounds averaged is pooled like a last round's updates
        if (
            self.last_round_of_stage
            and not self.schedule.merge_after_round()
            and self.state.adapter is not None
        ):
            self.combine([self.state.adapter], [1.0])


class FedAvgLora(ContinualStrategy):
    def combine(self, adapters, weights):
        self.state.adapter = average_adapters(adapters, weights)

    def pending(self):
        return ([self.state.adapter], [1.0]) if self.state.adapter is not None else ([], [])


class FedAvgFull(ContinualStrategy):
    lora = False

    def round_config(self):
        config = super().round_config()
        config["fresh-adapter"] = False
        return config

    def combine(self, adapters, weights):
        st = self.state
        average = {}
        for k, like in st.base.items():
            mean = sum(w * a[k].to(torch.float64) for w, a in zip(weights, adapters))
            average[k] = (mean if like.is_floating_point() else mean.round()).to(
                like.dtype
            )  # counters stay whole
        st.base, st.checksum, st.instruction = average, state_checksum(average), None


class Local(ContinualStrategy):
    """Sites keep their own bases; the server sends the start base once and the schedule."""

    def round_config(self):
        config = super().round_config()
        last = self.last_round_of_stage
        config["fresh-adapter"] = self.round == 0 or self.schedule.merge_after_round()
        config["merge-now"] = self.schedule.merge_after_round() or (
            last and self.schedule.merge_after_stage(self.stage)
        )
        config["pool-now"] = last and not config["merge-now"]
        config["pool-size"] = 1 if self.schedule.merge_after_round() else self.schedule.every
        return config

    def sync_records(self, node):
        config, records = super().sync_records(node)
        if self.state.node_base.get(node):  # the site has a base of its own now
            config.update(sync="none", **{"base-checksum": ""})
            records = {}
        return config, records

    def combine(self, adapters, weights):
        pass


STRATEGY_CLASSES = {
    "centralization": Centralization,
    "fedavg": FedAvgFull,
    "fedavg-lora": FedAvgLora,
    "local": Local,
}


def last_line(text: str) -> str:
    """The last non-empty line of an error reason (a traceback ends with the exception)."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no reason)"
