"""Flower ClientApp: a factory site trains on its current stage's private data.

Train message (from server/strategies.py) -> this site:
    config:   stage, round, strategy, base-checksum (the base the server assumes afterwards),
              sync ("none" | "full" | "merge"), adapter-seed, merge-* fields
    base:     the full base (sync = "full")          merge: the adapters to merge (sync = "merge")
    adapter:  the adapter to continue from (else a fresh one from adapter-seed)
Reply: arrays = LoRA factors (or all weights for fedavg) in fp32, metrics = num-examples, loss,
audio seconds, rows-skipped (bad manifest rows the site's data left out under bad-rows=skip);
site = the site's name and base checksum. Never audio, features or transcripts.
"""

from __future__ import annotations

import copy
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from cl_fed.adapters import adapter_state, load_adapter_state, reset_adapters
from cl_fed.centralize import AdapterPool, centralize
from cl_fed.config import make_config
from cl_fed.continual import lora_spec, train_config
from cl_fed.evaluate import transcribe
from cl_fed.faults import InjectedCrash, client_fault
from cl_fed.io import atomic_torch_save
from cl_fed.metrics import error_counts
from cl_fed.train import train_local
from clients.audit import audit_messages
from clients.site import Site, StaleBase, load_site


def clip_adapter_update(msg: Message, context: Context, call_next) -> Message:
    """Differential privacy (dp-noise > 0): Flower's fixedclipping_mod clips the site's update (the
    returned factors minus the adapter it received) to the norm the server sends.

    That mod takes the message's only ArrayRecord as the model the update starts from; ours may also
    carry the base or a merge instruction, so it is handed a view holding just the starting adapter
    and the clipping norm, and the app itself still gets the whole message. Other messages (DP off,
    evaluation) pass through untouched."""
    config = msg.content.config_records.get("config") if msg.has_content() else None
    if msg.metadata.message_type != MessageType.TRAIN or config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    if "adapter" not in msg.content.array_records:
        raise ValueError(
            "clip_adapter_update: a DP train message must carry the adapter the site starts from"
        )
    view = Message(
        RecordDict(
            {
                "adapter": msg.content["adapter"],
                "config": ConfigRecord({KEY_CLIPPING_NORM: config[KEY_CLIPPING_NORM]}),
            }
        ),
        metadata=copy.copy(msg.metadata),
    )
    return fixedclipping_mod(view, context, lambda _view, ctx: call_next(msg, ctx))


app = ClientApp(mods=[audit_messages, clip_adapter_update])  # the audit sees what really leaves the site


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _unstack(record: ArrayRecord, count: int) -> list[dict[str, torch.Tensor]]:
    """Merge instructions carry several adapters as '<index>/<key>'."""
    adapters: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, tensor in _tensors(record).items():
        index, name = key.split("/", 1)
        adapters[int(index)][name] = tensor
    return adapters


def sync_base(site: Site, msg: Message) -> None:
    """Bring the site's base to the one the message names; raise StaleBase if it cannot."""
    conf = msg.content["config"]
    sync = str(conf["sync"])
    if sync == "full":
        site.set_base(_tensors(msg.content["base"]))
    elif sync == "merge" and site.checksum == str(conf["base-from"]):
        count = int(conf["merge-count"])
        site.apply_merge(
            _unstack(msg.content["merge"], count),
            list(conf["merge-weights"]),
            float(conf["merge-scale"]),
            str(conf["merge-mode"]),
        )
    if site.checksum != str(conf["base-checksum"]):
        raise StaleBase(
            f"site {site.name}: holds base {site.checksum[:12] or '(none)'}, "
            f"message assumes {str(conf['base-checksum'])[:12]}; the server will send the full base"
        )


def _site(context: Context) -> Site:
    cfg = make_config(dict(context.run_config), source="run config")
    run_key = cfg.default_run_name()
    return load_site(cfg, dict(context.node_config), run_key, context.run_id)


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # several simulated sites share the cores: avoid oversubscription
    site = _site(context)
    conf = msg.content["config"]
    stage, seed = int(conf["stage"]), int(conf["adapter-seed"])
    if site.cfg.strategy != "local" or site.checksum == "":
        sync_base(site, msg)
    data = site.stream.site(site.name).enter(stage)
    if not data:
        raise ValueError(f"site {site.name} has no training data in stage {stage}")
    if site.lora:
        if "adapter" in msg.content:
            load_adapter_state(site.speech.model, _tensors(msg.content["adapter"]))
        elif bool(conf["fresh-adapter"]):
            reset_adapters(site.speech.model, seed)
    fault = client_fault(site.name, int(conf["server-round"]))
    if fault and fault["fault"] == "raise":
        raise InjectedCrash(f"injected fault at site {site.name}")
    if fault and fault["fault"] == "sleep":
        time.sleep(float(fault.get("seconds", 30)))
    start = None if site.lora else {k: v.detach().clone() for k, v in site.base().items()}
    result = train_local(site.speech, data, train_config(site.cfg, full=not site.lora, seed=seed))
    if site.lora:
        arrays = adapter_state(site.speech.model)
    else:
        arrays = {k: v.detach().to(torch.float32).clone() for k, v in site.speech.model.state_dict().items()}
        site.set_base(
            start, persist=False
        )  # the site keeps holding the base it names; its update is in the reply
    if fault and fault["fault"] == "nan":
        arrays = {k: torch.full_like(v, float("nan")) for k, v in arrays.items()}
    if site.cfg.strategy == "local":
        merge_locally(site, arrays, conf)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": float(result.loss),
            "audio-seconds": float(result.audio_seconds),
            "train-seconds": float(result.wall_seconds),
            "rows-skipped": site.stream.load_summary.num_skipped if site.stream.load_summary else 0,
        }
    )
    state = ConfigRecord({"site": site.name, "base-checksum": site.checksum})
    reply = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics, "site": state})
    return Message(content=reply, reply_to=msg)


def merge_locally(site: Site, adapter: dict, conf: ConfigRecord) -> None:
    """`local` strategy: the site runs the centralization schedule on its own."""
    if not bool(conf["merge-now"]) and not bool(conf["pool-now"]):
        return
    spec = lora_spec(site.cfg, site.speech)
    pool = AdapterPool(int(conf["pool-size"]))
    if site.pool_state:
        pool.load_state_dict(site.pool_state)
    pool.add(adapter)
    if bool(conf["merge-now"]):
        site.set_base(centralize(site.base(), *pool.drain(), spec.scale, site.cfg.merge))
    reset_adapters(site.speech.model, int(conf["adapter-seed"]) + 1)
    site.pool_state = pool.state_dict()
    atomic_torch_save(site.state_dir / "pool.pt", site.pool_state)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on the site's share of every stage's test set: error counts only.

    The model evaluated is the server's (base + its pending adapters, sent as a merge
    instruction) or, for `local`, the site's own base + its own pending pool.
    """
    torch.set_num_threads(1)
    site = _site(context)
    conf = msg.content["config"]
    model = site.speech.model
    if site.cfg.strategy != "local" or site.checksum == "":
        sync_base(site, msg)
    base = site.base()
    pending: tuple[list, list] = ([], [])
    if site.cfg.strategy != "local" and int(conf["pending-count"]):
        pending = (
            _unstack(msg.content["pending"], int(conf["pending-count"])),
            list(conf["pending-weights"]),
        )
    elif site.cfg.strategy == "local" and site.pool_state and site.pool_state["groups"]:
        pool = AdapterPool(int(site.pool_state["size"]))
        pool.load_state_dict(site.pool_state)
        pending = pool.pending()
    saved_adapter = adapter_state(model) if site.lora else None
    if site.lora:
        reset_adapters(model, 0)  # B = 0: the adapters to evaluate are merged into the weights below
    if pending[0]:
        spec = lora_spec(site.cfg, site.speech)
        site.set_base(centralize(base, *pending, spec.scale, site.cfg.merge), persist=False)
    metrics: dict[str, float] = {"num-examples": 0}
    model.eval()
    with torch.no_grad():
        for test_set in [str(s) for s in conf["test-sets"]]:
            utterances = site.stream.test(test_set, site=site.name)
            if not utterances:
                continue
            refs, hyps = [u.text for u in utterances], transcribe(site.speech, utterances)
            words, chars = error_counts(refs, hyps, unit="word"), error_counts(refs, hyps, unit="char")
            metrics[f"{test_set}:word-errors"] = words.substitutions + words.deletions + words.insertions
            metrics[f"{test_set}:words"] = words.reference_length
            metrics[f"{test_set}:char-errors"] = chars.substitutions + chars.deletions + chars.insertions
            metrics[f"{test_set}:chars"] = chars.reference_length
            metrics["num-examples"] += len(utterances)
    site.set_base(base, persist=False)
    if saved_adapter is not None:
        load_adapter_state(model, saved_adapter)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
