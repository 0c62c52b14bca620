"""Flower ClientApp: a factory site executes the continual plan's Train steps on its private data.

The message fields are defined in cl_fed/protocol.py. A site syncs to the weights the message
names, starts from the adapter it is sent (or a fresh one from the step's seed), trains, and replies
with its update; for `local` it then applies the plan's Aggregate and Merge steps to its own state,
and for fedsa (A shared, B kept) it does so with the round's mean A, which the next message brings.
Its state lives in one file under its cache directory (clients/site.py), so a message may land on
any worker or process.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cl_fed import protocol as P
from cl_fed import updates
from cl_fed.adapters import fresh_factors
from cl_fed.aggregation import (
    FROZEN_A_RULES,
    SHARED_A_RULES,
    aggregate,
    personal,
    sent_factors,
    with_frozen_factors,
)
from cl_fed.clmethods import Anchors, ends_stage_with_fisher, round_loss, site_fisher, training_data
from cl_fed.config import make_config
from cl_fed.continual import start_adapter, train_round, training_rows
from cl_fed.evaluate import transcribe
from cl_fed.faults import InjectedCrash, client_fault, faulty_rows
from cl_fed.gate import VALIDATION
from cl_fed.loop import apply_step
from cl_fed.metrics import error_counts
from cl_fed.plan import Aggregate, Train, adapter_seed, continual_plan, rule_for, steps_after
from cl_fed.state import ContinualState
from clients.audit import audit_messages
from clients.site import Site, StaleBase, evaluation_model, load_site


def clip_adapter_update(msg: Message, context: Context, call_next) -> Message:
    """Differential privacy (dp-noise > 0): Flower's fixedclipping_mod clips the site's update (the
    returned factors minus the adapter it received) to the norm the server sends.

    That mod takes the message's only ArrayRecord as the model the update starts from; ours may also
    carry the weights or their update operations, so it is handed a view holding just the starting adapter
    and the clipping norm, and the app itself still gets the whole message. Other messages (DP off,
    evaluation) pass through untouched."""
    config = msg.content.config_records.get(P.CONFIG) if msg.has_content() else None
    if msg.metadata.message_type != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    if P.ADAPTER not in msg.content.array_records:
        raise ValueError(
            "clip_adapter_update: a DP train message must carry the adapter the site starts from"
        )
    view = Message(
        RecordDict(
            {
                P.ADAPTER: msg.content[P.ADAPTER],
                P.CONFIG: ConfigRecord({KEY_CLIPPING_NORM: config[KEY_CLIPPING_NORM]}),
            }
        ),
        metadata=copy.copy(msg.metadata),
    )
    return fixedclipping_mod(view, context, lambda _view, ctx: call_next(msg, ctx))


app = ClientApp(mods=[audit_messages, clip_adapter_update])  # the audit sees what really leaves the site


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def sync_weights(site: Site, msg: Message) -> None:
    """Bring the site to the weights the message names; raise StaleBase if it cannot."""
    conf = msg.content[P.CONFIG]
    sync, target = str(conf[P.SYNC]), str(conf[P.WEIGHTS_CHECKSUM])
    if sync == P.SYNC_FULL:
        site.set_state(ContinualState.start(_tensors(msg.content[P.WEIGHTS])))
    elif sync == P.SYNC_CHANGED and site.state is not None and site.checksum == str(conf[P.SYNC_FROM]):
        steps = updates.from_tensors(_tensors(msg.content[P.WEIGHTS]))
        site.set_state(ContinualState.start(updates.replay(site.state.weights, steps)))
    if site.checksum != target:
        raise StaleBase(
            f"site {site.name} {P.STALE_BASE} ({target[:12]}; it holds "
            f"{site.checksum[:12] or 'none'}): the server sends them in full"
        )


def _site(context: Context) -> Site:
    cfg = make_config(dict(context.run_config), source="run config")
    return load_site(cfg, dict(context.node_config), cfg.run_dir(), context.run_id)


def _own_state(site: Site) -> bool:
    """Sites with models of their own (`local`, fedsa) run their own state once the server has sent
    the starting base."""
    return site.cfg.site_models and site.state is not None


def apply_own_steps(site: Site, plan: list, step, adapter: dict) -> None:
    """A site with a model of its own applies the plan's steps after `step` itself: its Aggregate
    (a federation of one, whose aggregate is `adapter`) and, on the schedule, its Merge."""
    state = site.state
    for later in steps_after(plan, step):
        apply_step(
            state, later, adapter if isinstance(later, Aggregate) else None, site.scale, site.cfg.merge
        )
    site.set_state(state, position=step.server_round)


def complete_round(site: Site, msg: Message) -> None:
    """fedsa: the steps after the site's last round, which waited for that round's mean A; the
    site's own B goes with it. A message without it (the site's reply was not aggregated) leaves the
    site its own A."""
    if not site.pending:
        return
    plan = continual_plan(site.cfg, site.stream.stages)
    step = next(s for s in plan if isinstance(s, Train) and s.server_round == site.position)
    own, conf = site.state.adapter, msg.content[P.CONFIG]
    if P.ADAPTER in msg.content and int(conf.get(P.ADAPTER_ROUND, 0)) == site.position:
        own = personal(_tensors(msg.content[P.ADAPTER]), own)
    apply_own_steps(site, plan, step, own)


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # several simulated sites share the cores: avoid oversubscription
    site = _site(context)
    conf = msg.content[P.CONFIG]
    step = P.train_step(conf)
    if not _own_state(site):
        sync_weights(site, msg)
    complete_round(site, msg)
    rows = training_rows(site.cfg, site.stream.site(site.name).enter(step.stage))
    rows = faulty_rows(site.name, step.server_round, rows, site.cfg.drill, step.seed)  # drills only
    if not rows:
        raise ValueError(f"site {site.name} has no training data in stage {step.stage}")
    # replay: plus the site's own buffer of earlier stages (kept here, never sent)
    data = training_data(site.cfg, rows, site.state_dir / "replay", site.name, step.stage)
    if site.cfg.site_models and site.position >= step.server_round:
        raise ValueError(
            f"site {site.name} (its own model) already holds round {site.position}, the server asks "
            f"for round {step.server_round}: it resumes only from its last round"
        )
    rule = rule_for(site.cfg)
    if P.ADAPTER in msg.content and not site.cfg.site_models:
        adapter = _tensors(msg.content[P.ADAPTER])
        if rule in FROZEN_A_RULES:  # ffa: B was sent; A is the frozen init the site draws itself
            seed = adapter_seed(continual_plan(site.cfg, site.stream.stages), step)
            adapter = with_frozen_factors(rule, adapter, fresh_factors(site.shapes(), seed))
    elif step.start == "continue" and not site.cfg.site_models:
        raise ValueError(
            f"site {site.name}: round {step.server_round} continues from an adapter the message lacks"
        )
    else:  # fresh, or a site's own: `local`'s, fedsa's shared A with its own B (complete_round)
        adapter = start_adapter(step, site.state.adapter, site.shapes())
    fault = client_fault(site.name, step.server_round)
    if fault and fault["fault"] == "raise":
        raise InjectedCrash(f"injected fault at site {site.name}")
    if fault and fault["fault"] == "sleep":
        time.sleep(float(fault.get("seconds", 30)))
    # a line per epoch in the run's log, named so that the sites' interleaved lines can be told apart
    label = f"[{site.name}] stage {step.stage + 1} round {step.round + 1}"
    # FedProx: the mu the server's FedProx put in the message (Flower's contract; absent = off)
    cfg = dataclasses.replace(site.cfg, proximal_mu=float(conf.get(P.PROXIMAL_MU, 0.0)))
    received = {name: _tensors(msg.content[name]) for name in (P.FISHER, P.SUBSPACES) if name in msg.content}
    anchors = Anchors(site.state_dir / "anchor.safetensors")  # ewc's theta*, lwf's teacher: kept here
    extra = round_loss(cfg, site.speech, step, site.state.weights, adapter, site.scale, anchors, received)
    update, result = train_round(
        site.speech, data, cfg, step, site.state.weights, adapter, progress=label, extra_loss=extra
    )
    fisher = None
    if ends_stage_with_fisher(cfg, step):
        fisher = site_fisher(cfg, site.speech, rows, step.seed)
    if fault and fault["fault"] == "nan":
        update = {k: torch.full_like(v, float("nan")) for k, v in update.items()}
    if rule in SHARED_A_RULES:  # fedsa: keep the adapter; its steps wait for the round's mean A
        state = site.state
        state.adapter = update
        site.set_state(state, position=step.server_round, pending=True)
    elif site.cfg.strategy == "local":  # the site is its own federation: apply the plan's next steps
        plan = continual_plan(site.cfg, site.stream.stages)
        apply_own_steps(site, plan, step, aggregate(rule, [update], [1.0], site.scale))
        update = {}  # nothing leaves the site but its figures
    update = sent_factors(rule, update) if step.start != "full" else update  # ffa: B only; fedsa: A only
    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: result.num_examples,
            P.TRAIN_LOSS: float(result.loss),
            P.AUDIO_SECONDS: float(result.audio_seconds),
            P.TRAIN_SECONDS: float(result.wall_seconds),
            P.LR_MEAN: float(result.lr_mean),
            P.ROWS_SKIPPED: site.stream.load_summary.num_skipped if site.stream.load_summary else 0,
        }
    )
    about = {P.SITE_NAME: site.name, P.WEIGHTS_CHECKSUM: site.checksum, P.NONCE: str(conf.get(P.NONCE, ""))}
    if fault:  # a scripted attacker (cl_fed/faults.py): what a misbehaving site could send
        update, metrics, about = attack(fault, site, adapter, update, metrics, about)
    reply = RecordDict({P.ARRAYS: ArrayRecord(update), P.METRICS: metrics, P.SITE: ConfigRecord(about)})
    if fisher is not None:
        reply[P.FISHER] = ArrayRecord(fisher)
    return Message(content=reply, reply_to=msg)


REPLAY_FILE = "last-reply.safetensors"  # faults only: a site's previous reply, for the `replay` attack


def attack(fault: dict, site: Site, start: dict, update: dict, metrics: MetricRecord, about: dict):
    """The reply a misbehaving site sends instead of its own (cl_fed/faults.py names the faults)."""
    from cl_fed.io import atomic_save_tensors, load_tensors

    kind, replay = fault["fault"], site.state_dir / REPLAY_FILE
    if kind == "claim-examples":
        metrics[P.NUM_EXAMPLES] = int(fault.get("examples", 10**9))
    elif kind == "scale-update":  # start + factor * (update - start)
        factor = float(fault.get("factor", 100.0))
        update = {
            k: start[k] + factor * (v - start[k]) if k in start else factor * v for k, v in update.items()
        }
    elif kind == "claim-site":
        about[P.SITE_NAME] = str(fault["as"])
    elif kind == "replay" and replay.is_file():  # the previous reply, nonce and all
        tensors, meta = load_tensors(replay)
        update, about = tensors, meta["about"]
    if kind == "record" or fault.get("record"):  # keep this reply for a later `replay`
        atomic_save_tensors(replay, update, {"about": about})
    return update, metrics, about


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on the site's share of every stage's test set: error counts only.

    The model is the server's evaluated model (its weights plus the EVALUATED tensors) or, for a
    site with a model of its own (`local`, fedsa), that model after completing its last round."""
    torch.set_num_threads(1)
    site = _site(context)
    conf = msg.content[P.CONFIG]
    if _own_state(site):
        complete_round(site, msg)
        weights = site.state.evaluated(site.scale)
    else:
        sync_weights(site, msg)
        extra = _tensors(msg.content[P.EVALUATED]) if P.EVALUATED in msg.content else {}
        weights = {**site.state.weights, **extra}
    speech = evaluation_model(site, weights)
    metrics: dict[str, float] = {P.NUM_EXAMPLES: 0}
    speech.model.eval()
    with torch.no_grad():
        for test_set in [str(s) for s in conf[P.TEST_SETS]]:
            if test_set.startswith(VALIDATION):  # a merge gate's: the site's own validation rows
                stage = test_set[len(VALIDATION) :]
                utterances = site.stream.validation(stage, site.cfg.validation_share, site=site.name)
            else:
                utterances = site.stream.test(test_set, site=site.name)
            if not utterances:
                continue
            refs, hyps = [u.text for u in utterances], transcribe(speech, utterances)
            words, chars = error_counts(refs, hyps, unit="word"), error_counts(refs, hyps, unit="char")
            metrics[f"{test_set}:{P.WORD_ERRORS}"] = words.substitutions + words.deletions + words.insertions
            metrics[f"{test_set}:{P.WORDS}"] = words.reference_length
            metrics[f"{test_set}:{P.CHAR_ERRORS}"] = chars.substitutions + chars.deletions + chars.insertions
            metrics[f"{test_set}:{P.CHARS}"] = chars.reference_length
            metrics[P.NUM_EXAMPLES] += len(utterances)
    about = ConfigRecord({P.SITE_NAME: site.name})  # for the per-site WER (results.json "sites")
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics), P.SITE: about}), reply_to=msg)
