"""Strategies: Flower strategies that honour Flower's contract, so Flower's own can wrap them.

    configure_train(server_round, arrays, config, grid)
        arrays = what the round starts from (the adapter, in the aggregate's key space), config = the
        plan's Train step (cl_fed.protocol.train_config); sites are sampled with a seed from the
        step (fraction-train), and each gets what brings it to the weights it must train on
    aggregate_train(server_round, replies) -> (ArrayRecord aggregate, MetricRecord)
        the replies checked (bad ones dropped with a reason), weighted, and aggregated by the plan's
        rule (cl_fed.aggregation): exact / fedit factors, or the mean of whole weights (fedavg)

Limits on one site (check_origin, aggregate_train; the math in cl_fed/robust.py): a reply must echo
its message's nonce (no replays) and come from the node that holds its site's name; its update
(returned minus sent) must be within max-update-norm and update-norm-ratio x the round's median;
its weight is capped at max-site-weight; `aggregation` swaps the mean for a median / trimmed mean.

The ServerApp applies the returned aggregate to its ContinualState (cl_fed.loop), so whatever
Flower strategy subclasses ours acts on exactly what is applied. `build_strategy` composes Flower's
own (flwr.serverapp.strategy), unchanged but for two small overrides on FedAvgM (`RoundStartFedAvgM`):
`server-optimizer` adam | yogi | adagrad (FedAdam, FedYogi, FedAdagrad: a step from the round's start
towards our aggregate, moments kept) | avgm (FedAvgM: server momentum), and `proximal-mu` > 0
(FedProx: it writes "proximal-mu" into every train config; the sites add the proximal term,
cl_fed.train.add_proximal_grad_).

    centralization  LoRA factors; exact (merge=product) or FedIT (merge=factors) aggregation every
                    round, merged into the base on the schedule
    fedavg          all weights, trained in full, averaged every round (the naive baseline)
    fedavg-lora     LoRA factors FedIT-averaged every round, never merged: the base never changes
    local           every site runs the centralization plan alone; the server only keeps time
    (fedsa)         centralization with lora-aggregation=fedsa: as local, but the sites' A are
                    averaged every round and sent back (FedSA)

Differential privacy (`dp-noise` > 0; the math in cl_fed/privacy.py): every train message carries
the clipping norm under Flower's key and the adapter the site starts from, the site's
`fixedclipping_mod` clips its update to it, the server clips again (a site without the mod cannot
exceed the bound) and replaces the round's updates by their noised mean before aggregation.
Flower's `DifferentialPrivacyClientSideFixedClipping` wrapper is not used: its noise comes from the
unseeded global NumPy RNG (a run must be reproducible under its seed), one failed site makes it skip
the whole round where ours drop that site, and its accountant accepts only FedAvg.aggregate_train.
"""

from __future__ import annotations

import logging
import random
import secrets
import statistics

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cl_fed import protocol as P
from cl_fed import updates
from cl_fed.aggregation import RESIDUAL, aggregate, sent_factors, with_frozen_factors
from cl_fed.centralize import AdapterRejected, example_weights, state_bytes, validate_adapter
from cl_fed.config import RunConfig
from cl_fed.continual import state_checksum
from cl_fed.privacy import clip_update, noise_seed, noise_std, noised_mean, poisson_sample, update_norm
from cl_fed.robust import capped_weights, robust_aggregate

log = logging.getLogger("cl_fed.server")


class WeightsSync:
    """Which weights the sites must train on, and what each node needs to get there: nothing (it
    holds them), the operations the server applied since the version it holds (cl_fed/updates.py:
    low-rank factors of aggregates, or dense tensors), or everything."""

    def __init__(self, weights: dict[str, torch.Tensor], sites_hold: str = "") -> None:
        """`sites_hold`: what every node is presumed to hold until it says otherwise (a resumed run:
        the weights the sites were last synced to, the server's pending operations lead on from
        there); a node that turns out not to hold them is sent everything the next time."""
        self.weights, self.checksum = dict(weights), sites_hold or state_checksum(weights)
        self.previous: str | None = None
        self.steps: list[dict[str, tuple]] = []  # the operations from `previous` to `checksum`
        self.assumed = sites_hold or None  # what a node never sent to yet is presumed to hold
        self.asked: set[int] = set()  # the nodes sent to since
        self.nodes: dict[int, str] = {}  # node -> checksum it last reported holding

    def update(self, weights: dict[str, torch.Tensor], steps: list[dict[str, tuple]]) -> None:
        """The weights now, and the operations applied to them since the last update."""
        checksum = state_checksum(weights)
        if checksum == self.checksum:
            return
        self.previous, self.steps = self.checksum, list(steps)
        self.weights, self.checksum = dict(weights), checksum

    def records(self, node: int) -> tuple[dict, dict]:
        """(config fields, array records) that bring `node` to the current weights."""
        config = {P.WEIGHTS_CHECKSUM: self.checksum, P.SYNC: P.SYNC_NONE, P.SYNC_FROM: ""}
        held = self.nodes.get(node, None if node in self.asked else self.assumed)
        self.asked.add(node)
        if held == self.checksum:
            return config, {}
        if held is not None and held == self.previous:
            config.update({P.SYNC: P.SYNC_CHANGED, P.SYNC_FROM: held})
            return config, {P.WEIGHTS: ArrayRecord(updates.to_tensors(self.steps))}
        config[P.SYNC] = P.SYNC_FULL
        return config, {P.WEIGHTS: ArrayRecord(self.weights)}


class ContinualStrategy(FedAvg):
    """Construct like Flower's FedAvg, then `bind` the run (so Flower subclasses compose)."""

    lora = True
    sends_adapter = True  # the adapter sites continue from comes from the server
    site_gate = None  # gate-sites: {site: update} -> {site: {"passed", "reason", ...}} (the ServerApp's)
    broadcast: dict = {}  # cl-method: {record name: tensors} every train message carries (the ServerApp's)
    fishers: list = []  # cl-method=ewc: this round's (site Fisher, examples) of the sites used

    def bind(
        self, cfg: RunConfig, reference: dict, scale: float, rule: str, sync: WeightsSync, secret: str = ""
    ) -> None:
        """`secret`: the server's DP noise secret (cl_fed.privacy.new_secret; kept in its checkpoint)."""
        self.cfg, self.reference, self.scale, self.rule, self.sync = cfg, reference, scale, rule, sync
        self.dp = cfg.dp_noise > 0
        self.secret = secret
        # DP with fraction-train < 1 samples as its accountant assumes: Poisson, over a fixed denominator
        self.poisson = self.dp and cfg.fraction_train < 1
        self.expected = 0.0  # the expected number of sampled sites (Poisson)
        self.online: set[int] = set()
        self.nonces: dict[int, str] = {}  # node -> the nonce of this round's message to it
        self.site_of: dict[int, str] = {}  # node -> the site it answered as (bound for the run)
        self.node_of: dict[str, int] = {}  # site -> the node that holds its name
        self.round_log: dict = {}
        self.sent: list[Message] = []  # this round's train messages (their ids are set when pushed)
        self.round_start: dict[str, torch.Tensor] = {}
        self.round_seed = 0

    # ---- what each site is sent ---------------------------------------------------------------
    def sample(self, grid: Grid, seed: int) -> list[int]:
        """fraction-train of the online nodes, drawn with the round's seed (reproducible); with DP, each
        node independently with that probability, from the server's secret (Poisson sampling)."""
        nodes = sorted(grid.get_node_ids())
        self.online = set(nodes)
        if self.poisson:
            self.expected = self.cfg.fraction_train * len(nodes)
            return poisson_sample(nodes, self.cfg.fraction_train, seed, self.secret)
        count = max(1, int(len(nodes) * self.cfg.fraction_train))
        return sorted(random.Random(seed).sample(nodes, count)) if count < len(nodes) else nodes

    def sync_records(self, node: int) -> tuple[dict, dict]:
        return self.sync.records(node)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.round_seed = int(config[P.SEED])
        start = {k: v for k, v in arrays.to_torch_state_dict().items() if not k.startswith(RESIDUAL)}
        self.round_start = start
        send_adapter = self.lora and self.sends_adapter and (str(config[P.START]) == "continue" or self.dp)
        messages, down = [], 0
        self.nonces = {}
        for node in self.sample(grid, self.round_seed):
            fields, records = self.sync_records(node)
            if send_adapter:
                records[P.ADAPTER] = ArrayRecord(sent_factors(self.rule, start))  # ffa: B only
            for name, tensors in self.broadcast.items():  # cl-method state (cl_fed.clmethods.Carried)
                records[name] = ArrayRecord(tensors)
            self.nonces[node] = secrets.token_hex(16)  # decides nothing: it only tells this round's replies
            round_config = {**dict(config), **fields, P.NONCE: self.nonces[node]}
            if self.dp:
                round_config[KEY_CLIPPING_NORM] = self.cfg.dp_clip  # what Flower's fixedclipping_mod reads
            content = RecordDict({**records, P.CONFIG: ConfigRecord(round_config)})
            down += sum(state_bytes(r.to_torch_state_dict()) for r in records.values())
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self.round_log = {
            "server_round": server_round,
            "sent_to": [m.metadata.dst_node_id for m in messages],
            "bytes_down": down,
        }
        self.sent = messages
        return messages

    def resend_to_stale(self, replies: list[Message]) -> list[Message]:
        """This round's messages again, with every weight, for the nodes that answered StaleBase
        (they lack the weights the round assumed: a site's lost state, a run resumed from a copied
        directory), so that the round is not lost to it. The rest of each message is kept as sent
        (adapter, cl-method records, FedProx's mu, the nonce); the extra bytes count as sent down."""
        stale = {
            self.replying_node(r) for r in replies if r.has_error() and P.STALE_BASE in str(r.error.reason)
        }
        again = []
        for sent in [m for m in self.sent if m.metadata.dst_node_id in stale]:
            node = sent.metadata.dst_node_id
            self.sync.nodes.pop(node, None)  # sent to before and unknown now: everything
            fields, records = self.sync.records(node)
            config = ConfigRecord({**dict(sent.content[P.CONFIG]), **fields})
            content = RecordDict({**dict(sent.content), **records, P.CONFIG: config})
            down = sum(state_bytes(r.to_torch_state_dict()) for r in records.values())
            self.round_log["bytes_down"] += down
            again.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            log.info("node %s lacks the round's weights: sent again with every weight", node)
        self.sent = self.sent + again
        return again

    def replying_node(self, reply: Message) -> int:
        """The node a reply is about: its sender, except for the error the SuperLink itself returns
        for a node that stopped sending heartbeats (a dead SuperNode), which names the message it answers."""
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent if m.metadata.message_id}
        return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    # ---- what the server does with the replies -----------------------------------------------
    def check_reply(self, arrays: dict[str, torch.Tensor]) -> None:
        validate_adapter(arrays, self.reference)

    def update_start(self, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a reply's update is measured from: the adapter the round started from (LoRA), or the
        weights the sites trained on (fedavg); zeros where the round sent no start."""
        begin = self.round_start if self.lora else self.sync.weights
        return {k: begin[k] if k in begin else torch.zeros_like(v) for k, v in arrays.items()}

    def check_origin(self, node: int, site: str, about) -> None:
        """A reply must answer this round's message (its nonce) and come from the node that holds its
        site's name: the first node to answer as a site holds the name while it is online."""
        if str(about.get(P.NONCE, "")) != self.nonces.get(node):
            raise AdapterRejected(
                f"the reply does not carry the nonce of this round's message to node {node} "
                "(a replay of an earlier reply?)"
            )
        if self.site_of.get(node, site) != site:
            raise AdapterRejected(
                f"node {node} answered as site {self.site_of[node]!r} before, now as {site!r}"
            )
        holder = self.node_of.get(site)
        if holder is not None and holder != node and holder in self.online:
            raise AdapterRejected(
                f"site {site!r} is held by node {holder}, which is online; node {node} claims it"
            )
        if holder is not None and holder != node:
            log.warning("site %s: node %s is gone, node %s holds its name now", site, holder, node)
            self.site_of.pop(holder, None)
        self.site_of[node], self.node_of[site] = site, node

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        dropped, candidates, up = [], [], 0
        fisher_of: dict[str, dict] = {}
        holds: dict[str, str] = {}  # site -> checksum of the weights it reports holding
        for msg in errors:
            node = self.replying_node(msg)
            self.sync.nodes.pop(node, None)  # unknown now: send everything next time
            dropped.append({"node": node, "reason": f"client error: {last_line(msg.error.reason)}"})
        answered = {self.replying_node(m) for m in replies}
        skipped: dict[str, int] = {}  # site -> manifest rows it skipped (bad-rows=skip)
        for node in self.round_log.get("sent_to", []):
            if node not in answered:
                self.sync.nodes.pop(node, None)
                dropped.append({"node": node, "reason": f"no reply within {self.cfg.round_timeout} s"})

        def reject(node, site, error) -> None:
            log.warning(
                "round %s: update from site %s (node %s) rejected: %s", server_round, site, node, error
            )
            dropped.append({"node": node, "site": site, "reason": f"rejected: {error}"})

        for msg in valid:
            node = msg.metadata.src_node_id
            about = msg.content[P.SITE] if P.SITE in msg.content else {}
            site = str(about.get(P.SITE_NAME, node))
            try:
                self.check_origin(node, site, about)
            except AdapterRejected as error:
                self.sync.nodes.pop(node, None)
                reject(node, site, error)
                continue
            self.sync.nodes[node] = holds[site] = str(about.get(P.WEIGHTS_CHECKSUM, ""))
            try:
                arrays = {k: v.clone() for k, v in msg.content[P.ARRAYS].to_torch_state_dict().items()}
                up += state_bytes(arrays)
                if self.lora:  # ffa: the site sent B only; A is the round's frozen one
                    arrays = with_frozen_factors(self.rule, arrays, self.round_start)
                self.check_reply(arrays)
                if P.FISHER in msg.content:  # cl-method=ewc: the site's Fisher at the stage's end
                    fisher_of[site] = check_fisher(
                        msg.content[P.FISHER].to_torch_state_dict(), self.sync.weights
                    )
                    up += state_bytes(fisher_of[site])
                metrics = msg.content[P.METRICS]
                n = int(metrics[P.NUM_EXAMPLES])
                if n <= 0:
                    raise AdapterRejected(f"num-examples={n}")
                norm = update_norm(arrays, self.update_start(arrays)) if arrays else 0.0
                if norm > self.cfg.max_update_norm:
                    raise AdapterRejected(
                        f"update norm {norm:.6g} > max-update-norm {self.cfg.max_update_norm:g}"
                    )
            except (AdapterRejected, KeyError, ValueError) as error:
                reject(node, site, error)
                continue
            candidates.append((node, site, arrays, n, metrics, norm))
        ratio = self.cfg.update_norm_ratio
        if ratio and len(candidates) >= 3:  # one long update against the others' median
            median = statistics.median(c[5] for c in candidates)
            kept = [c for c in candidates if c[5] <= ratio * median]
            for node, site, _, _, _, norm in (c for c in candidates if c[5] > ratio * median):
                reject(
                    node,
                    site,
                    f"update norm {norm:.6g} > update-norm-ratio {ratio:g} x the round's median {median:.6g}",
                )
            candidates = kept
        if self.site_gate is not None and candidates:  # merge only the good ones (cl_fed/gate.py)
            verdicts = self.site_gate({c[1]: c[2] for c in candidates})
            self.round_log["gate_sites"] = verdicts
            for node, site, *_ in (c for c in candidates if not verdicts[c[1]]["passed"]):
                reject(node, site, f"merge gate: {verdicts[site]['reason']}")
            candidates = [c for c in candidates if verdicts[c[1]]["passed"]]
        used = [c[1] for c in candidates]
        self.fishers = [(fisher_of[c[1]], c[3]) for c in candidates if c[1] in fisher_of]
        updates = [c[2] for c in candidates]
        examples = [c[3] for c in candidates]
        losses = [float(c[4][P.TRAIN_LOSS]) for c in candidates]
        lrs = [float(c[4].get(P.LR_MEAN, float("nan"))) for c in candidates]
        for site, c in zip(used, candidates):
            if int(c[4].get(P.ROWS_SKIPPED, 0)):
                skipped[site] = int(c[4][P.ROWS_SKIPPED])
        weights, capped = self.site_weights(examples)
        for index in capped:
            log.warning(
                "round %s: site %s claims %s of %s examples; its weight is held at max-site-weight %g",
                server_round,
                used[index],
                examples[index],
                sum(examples),
                self.cfg.max_site_weight,
            )
        self.round_log.update(
            lr_mean=sum(lrs) / len(lrs) if lrs else None,
            clients_used=used,
            clients_dropped=dropped,
            rows_skipped=skipped,
            losses=losses,
            num_examples=examples,
            weights=weights,
            weight_capped=[used[i] for i in capped],
            update_norms={c[1]: c[5] for c in candidates},
            bytes_up=up,
            site_checksums=holds,
        )
        self.sent = []
        loss = (
            sum(x * n for x, n in zip(losses, examples)) / max(sum(examples), 1) if losses else float("nan")
        )
        metrics = MetricRecord({P.TRAIN_LOSS: loss, P.NUM_EXAMPLES: sum(examples)})
        if not updates and not self.poisson:
            log.warning("round %s: no usable update; the model is unchanged", server_round)
            return None, metrics
        if self.dp:
            updates, weights = [self.privatize(updates, used, server_round)], [1.0]
        elif self.cfg.aggregation != "mean":
            robust = robust_aggregate(
                self.rule, updates, self.scale, self.cfg.aggregation, self.cfg.trim_fraction
            )
            return ArrayRecord(robust), metrics
        return ArrayRecord(aggregate(self.rule, updates, weights, self.scale)), metrics

    def site_weights(self, examples: list[int]) -> tuple[list[float], list[int]]:
        """Averaging weights (and the indices held at max-site-weight): uniform, or by examples capped."""
        if not examples:
            return [], []
        if self.cfg.weighting == "uniform" or self.cfg.aggregation != "mean":
            return example_weights(examples, uniform=True), []
        return capped_weights(examples, self.cfg.max_site_weight)

    def privatize(self, adapters: list[dict], sites: list[str], server_round: int) -> dict[str, torch.Tensor]:
        """DP: each update clipped to dp-clip (again: a site's mod already did), then their mean plus
        N(0, (z C / n)^2), seeded by the round's seed and the server's secret. With Poisson sampling
        n is the expected number of sites (a fixed denominator), and a round nobody was sampled in
        still releases its noise, as the accountant counts it."""
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
        seed = noise_seed(self.round_seed, self.secret)
        if self.poisson:
            std = noise_std(self.cfg.dp_noise, clip, self.expected)
            noised = noised_mean(clipped, std, seed, start=self.round_start, denominator=self.expected)
        else:
            std = noise_std(self.cfg.dp_noise, clip, len(clipped))
            noised = noised_mean(clipped, std, seed)
        self.round_log["dp_noise_std"] = std
        return noised


class Centralization(ContinualStrategy):
    pass


class FedAvgLora(ContinualStrategy):
    pass


class FedAvgFull(ContinualStrategy):
    lora = False

    def check_reply(self, arrays):
        # integer buffers (BatchNorm's step counters): checked for keys, shapes and finiteness like the rest
        super().check_reply(
            {k: v if v.is_floating_point() else v.to(torch.float64) for k, v in arrays.items()}
        )


class Local(ContinualStrategy):
    """Sites keep their own state; the server sends the starting base once and the plan's steps."""

    sends_adapter = False  # each site continues from its own

    def sync_records(self, node):
        if node in self.sync.nodes:  # the site runs its own state now
            return {P.WEIGHTS_CHECKSUM: "", P.SYNC: P.SYNC_NONE, P.SYNC_FROM: ""}, {}
        return super().sync_records(node)

    def check_reply(self, arrays):
        if arrays:
            raise AdapterRejected("a local site sends no update")

    def aggregate_train(self, server_round, replies):
        _, metrics = super().aggregate_train(server_round, replies)
        return None, metrics  # nothing to aggregate: every site merged on its own

    def privatize(self, adapters, sites, server_round):  # never called: local refuses DP (config)
        raise RuntimeError("local strategy has no shared update to privatize")


class FedSA(Local):
    """lora-aggregation=fedsa (FedSA-LoRA): every site keeps its own B, base and merges, as a `local`
    site does; the server averages the A factors the sites send and sends the mean back with every
    later message (train and evaluate), with the round it averages (P.ADAPTER_ROUND). Flower's
    contract is kept as `Local` keeps it: aggregate_train returns no model, since there is no
    shared one; the mean A is the strategy's own state (checkpointed, `optimizer_state`)."""

    shared: dict[str, torch.Tensor] = {}
    shared_round = 0

    def sync_records(self, node):
        fields, records = super().sync_records(node)
        if self.shared:
            records[P.ADAPTER] = ArrayRecord(self.shared)
            fields[P.ADAPTER_ROUND] = self.shared_round
        return fields, records

    def configure_train(self, server_round, arrays, config, grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        if str(config[P.START]) == "continue" and self.shared:  # the sites start from the mean A
            self.round_start = {**self.round_start, **self.shared}
        return messages

    def check_reply(self, arrays):
        validate_adapter(arrays, {k: v for k, v in self.reference.items() if k.endswith(".lora_A")})

    def aggregate_train(self, server_round, replies):
        arrays, metrics = ContinualStrategy.aggregate_train(self, server_round, replies)
        if arrays is not None:
            self.shared, self.shared_round = arrays.to_torch_state_dict(), server_round
        return None, metrics  # every site merges its own B with the mean A (clients.client_app)


STRATEGY_CLASSES = {
    "centralization": Centralization,
    "fedavg": FedAvgFull,
    "fedavg-lora": FedAvgLora,
    "local": Local,
}


class InStartOrder(FedAvg):
    """Placed between Flower's FedAvgM and our strategy: the aggregate with the keys (and in the order)
    of the round's start arrays. FedAvgM pairs `current_arrays` and the aggregate by position
    (`to_numpy_ndarrays`, zip), and our aggregate lists its keys in its own order (factors, then
    `residual/` keys); a key or shape that is not in both is an error, not a silent misstep."""

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        start = self.current_arrays
        if arrays is None or start is None:
            return arrays, metrics
        if set(arrays) != set(start):
            raise AggregationError(
                f"round {server_round}: the aggregate's keys differ from the round's start arrays: "
                f"{sorted(set(arrays) ^ set(start))[:3]}"
            )
        for key in start:
            if tuple(arrays[key].shape) != tuple(start[key].shape):
                raise AggregationError(
                    f"round {server_round}: {key} has shape {tuple(arrays[key].shape)} in the aggregate, "
                    f"{tuple(start[key].shape)} at the round's start"
                )
        return ArrayRecord({key: arrays[key] for key in start}), metrics


class RoundStartFedAvgM(FedAvgM):
    """Flower's FedAvgM, stepping from each round's start (as FedOpt does) instead of its own last aggregate.

    Flower's FedAvgM keeps `current_arrays` from its first configure_train and then its own output:
    it assumes every round starts from its last aggregate. Ours starts from what the ServerApp sends,
    which after a merge is a fresh adapter and always has a zero residual (cl_fed.aggregation.
    start_arrays), so `current_arrays` is refreshed every round, as Flower's FedOpt refreshes its own.

    The momentum (Flower's `momentum_vector`, sum_k beta^k of past pseudo-gradients) belongs to one
    adapter's trajectory: a round that starts from a fresh adapter (START "fresh": after a merge, and
    the run's first round) starts a new one. A fresh adapter's A is a new random draw, so the old
    factors' momentum means nothing in its coordinates, and the residual's would add the update
    just merged into the base a second time. fedavg-lora, one adapter for the whole run, keeps its
    momentum throughout; centralize-every=round resets it every round (momentum then does nothing).
    Flower's momentum math itself is unchanged; `InStartOrder` gives it the start's key order, and
    float64 residuals stay float64 (factors float32) through its numpy arithmetic."""

    pending_momentum: dict | None = None  # a resumed run's momentum by key (load_optimizer_state)

    def configure_train(self, server_round, arrays, config, grid):
        self.current_arrays = arrays  # refreshed each round: see the class docstring
        if str(config.get(P.START, "")) == "fresh":
            self.momentum_vector, self.pending_momentum = None, None
        if self.pending_momentum is not None:
            saved, self.pending_momentum = self.pending_momentum, None
            if set(saved) != set(arrays):
                raise AggregationError(
                    "the checkpoint's FedAvgM momentum does not match the round's start arrays"
                )
            self.momentum_vector = [saved[key] for key in arrays]
        return super().configure_train(server_round, arrays, config, grid)


# `server-optimizer` -> the Flower classes composed in front of our strategy (in MRO order)
SERVER_OPTIMIZERS = {
    "adam": (FedAdam,),
    "yogi": (FedYogi,),
    "adagrad": (FedAdagrad,),
    "avgm": (RoundStartFedAvgM, InStartOrder),
}


def build_strategy(cfg: RunConfig) -> ContinualStrategy:
    """The run's strategy, with Flower's own composed in front of it by subclassing: FedProx
    (`proximal-mu` > 0), then the `server-optimizer`'s class. Their configure_train and
    aggregate_train reach ours through super(): the optimiser steps from the round's start arrays
    towards our aggregate, and FedProx adds "proximal-mu" to the config every site is sent.

    Flower's __init__s chain through super() with FedAvg's arguments only, so in a composition only
    the first class gets its own: the optimiser's are set here after construction."""
    cls = FedSA if cfg.site_models and cfg.strategy != "local" else STRATEGY_CLASSES[cfg.strategy]
    # the ServerApp waits for every site before the first round (wait_for_sites); after that a
    # site that is gone (a killed SuperNode) must not stall the run, so rounds go on with those online
    kwargs = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    flower = (FedProx,) if cfg.proximal_mu else ()
    flower += SERVER_OPTIMIZERS.get(cfg.server_optimizer, ())
    if not flower:
        return cls(**kwargs)
    name = "".join(c.__name__ for c in flower if c is not InStartOrder) + cls.__name__
    first = {"proximal_mu": cfg.proximal_mu} if cfg.proximal_mu else {}  # FedProx comes first
    strategy = type(name, (*flower, cls), {})(**kwargs, **first)
    if isinstance(strategy, FedOpt):
        strategy.eta = cfg.server_step()  # beta_1, beta_2, tau: Flower's defaults of the class
    if isinstance(strategy, FedAvgM):
        strategy.server_learning_rate, strategy.server_momentum = cfg.server_step(), cfg.server_momentum
        strategy.server_opt = True  # FedAvgM's own test (lr != 1 or momentum != 0) ran on the defaults
    return strategy


MOMENTUM = "momentum"  # checkpoint prefix of FedAvgM's momentum_vector, by key
SHARED = "fedsa-shared"  # checkpoint prefix of FedSA's mean A; SHARED_ROUND: the round it averages
SHARED_ROUND = "fedsa-shared-round"


def optimizer_state(strategy) -> dict[str, torch.Tensor]:
    """A strategy's own state, for the checkpoint: FedOpt's moments m_t, v_t; FedAvgM's momentum (a
    list in the order of its current arrays, kept by key); FedSA's mean A and its round."""
    out = {}
    if getattr(strategy, "shared", None):
        out.update({f"{SHARED}/{k}": v for k, v in strategy.shared.items()})
        out[SHARED_ROUND] = torch.tensor(strategy.shared_round, dtype=torch.int64)
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            out[f"{name}/{key}"] = torch.as_tensor(value)
    momentum = getattr(strategy, "momentum_vector", None)
    if momentum is not None:
        keys = list(strategy.current_arrays.keys())
        for key, value in zip(keys, momentum, strict=True):
            out[f"{MOMENTUM}/{key}"] = torch.as_tensor(value)
    elif getattr(strategy, "pending_momentum", None):  # loaded, not used yet: kept as it was
        out.update({f"{MOMENTUM}/{k}": torch.as_tensor(v) for k, v in strategy.pending_momentum.items()})
    return out


def load_optimizer_state(strategy, tensors: dict[str, torch.Tensor]) -> None:
    shared = {k[len(SHARED) + 1 :]: v for k, v in tensors.items() if k.startswith(SHARED + "/")}
    if shared and isinstance(strategy, FedSA):
        strategy.shared, strategy.shared_round = shared, int(tensors[SHARED_ROUND])
    for name in ("m_t", "v_t"):
        part = {k[len(name) + 1 :]: v.numpy() for k, v in tensors.items() if k.startswith(name + "/")}
        if part:
            setattr(strategy, name, part)
    momentum = {k[len(MOMENTUM) + 1 :]: v.numpy() for k, v in tensors.items() if k.startswith(MOMENTUM + "/")}
    if momentum and isinstance(strategy, RoundStartFedAvgM):  # ordered by the next round's start arrays
        strategy.pending_momentum = momentum


def check_fisher(fisher: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> dict:
    """A site's Fisher estimate: weight keys with their shapes, finite and >= 0 (else rejected)."""
    if not fisher:
        raise AdapterRejected("an empty Fisher estimate")
    for key, value in fisher.items():
        if key not in weights or tuple(value.shape) != tuple(weights[key].shape):
            raise AdapterRejected(f"Fisher tensor {key!r} {tuple(value.shape)} is not a weight of the model")
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise AdapterRejected(f"Fisher tensor {key!r} has negative or non-finite values")
    return {k: v.to(torch.float32) for k, v in fisher.items()}


def last_line(text: str) -> str:
    """The last non-empty line of an error reason (a traceback ends with the exception)."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no reason)"
