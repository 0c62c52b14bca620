"""Continual-learning baselines beside centralization: `cl-method` = ewc | lwf | olora | replay.

The math of each is one small module (ewc.py, lwf.py, olora.py, replay.py). This module puts them
into the continual loop in one way for the single-site runner and the Flower apps:

    Carried           what the server (or the single-site runner) keeps and sends with every train
                      round: the running Fisher (ewc), the merged updates' subspaces (olora);
                      checkpointed as tensors
    Anchors           the model a site started the current stage from (EWC's theta*, LwF's teacher),
                      kept at the site (never sent)
    regularizer(...)  the term a site adds to its training loss (cl_fed.train.train_local extra_loss)
    site_fisher(...)  a site's diagonal Fisher at the end of a stage (ewc), sent with its last reply
    training_data()   the stage's rows plus the site's replay buffer (replay)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cl_fed.adapters import live_factors
from cl_fed.aggregation import fold
from cl_fed.centralize import base_key
from cl_fed.clmethods import ewc, lwf, olora
from cl_fed.clmethods.replay import ReplayBuffer, choose
from cl_fed.config import RunConfig
from cl_fed.data.utterance import Utterance
from cl_fed.io import atomic_save_tensors, load_tensors
from cl_fed.models.base import SpeechModel
from cl_fed.protocol import FISHER, SUBSPACES  # the records Carried's tensors travel in
from cl_fed.state import adapter_update

NOT_REHEARSAL_FREE = ("replay",)  # methods that keep past data (marked so in reports)


@dataclass
class Carried:
    """The server's (or single-site runner's) state of a method, sent to the sites every round."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    bases: dict[str, torch.Tensor] = field(default_factory=dict)

    def broadcast(self, cfg: RunConfig) -> dict[str, dict[str, torch.Tensor]]:
        """{record name: tensors} every train message of the round carries (nothing before there is any)."""
        if cfg.cl_method == "ewc" and self.fisher:
            return {FISHER: self.fisher}
        if cfg.cl_method == "olora" and self.bases:
            return {SUBSPACES: self.bases}
        return {}

    def add_fisher(self, cfg: RunConfig, fishers: list[dict], examples: list[int]) -> None:
        """A stage ended: its sites' Fisher estimates (example-weighted) join the running Fisher."""
        if fishers:
            self.fisher = ewc.accumulate(self.fisher or None, fishers, examples, cfg.ewc_decay)

    def merged(self, cfg: RunConfig, before: dict, after: dict, adapter_keys, rank: int) -> None:
        """A committing merge (olora): each adapted layer's update before -> after adds its top-`rank`
        input directions to the layer's basis (`adapter_keys`: "<module path>.lora_A" / ".lora_B")."""
        if cfg.cl_method != "olora":
            return
        for path in sorted({key.rsplit(".", 1)[0] for key in adapter_keys}):
            key = base_key(path)
            delta = after[key].to(torch.float64) - before[key].to(torch.float64)
            rows = olora.subspace(delta, rank)
            if rows.numel():
                self.bases[path] = olora.extend(self.bases.get(path), rows)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{FISHER}/{k}": v for k, v in self.fisher.items()}
        out.update({f"{SUBSPACES}/{k}": v for k, v in self.bases.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Carried:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}

        return cls(fisher=part(FISHER), bases=part(SUBSPACES))


class Anchors:
    """The model a site started a stage from, one stage at a time, persisted at `path` (atomically);
    a site's later rounds of the stage (and a restarted process) find it again."""

    def __init__(self, path: Path | None = None) -> None:
        self.path, self.stage, self.weights = path, -1, None
        if path is not None and Path(path).is_file():
            tensors, meta = load_tensors(path)
            self.stage, self.weights = int(meta["stage"]), tensors

    def of(self, stage: int, starting: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The anchor of `stage`: kept, or (the stage's first round here) `starting()`, kept from now on."""
        if self.stage != stage or self.weights is None:
            self.stage, self.weights = stage, {k: v.detach().clone() for k, v in starting().items()}
            if self.path is not None:
                atomic_save_tensors(self.path, self.weights, {"stage": stage})
        return self.weights


def needs_anchor(cfg: RunConfig) -> bool:
    return cfg.cl_method in ("ewc", "lwf")


def ends_stage_with_fisher(cfg: RunConfig, step) -> bool:
    """ewc: a site estimates its Fisher after the stage's last round (and the server adds it up)."""
    return cfg.cl_method == "ewc" and step.round == cfg.rounds_per_stage - 1


def round_loss(
    cfg: RunConfig,
    speech: SpeechModel,
    step,
    weights: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor] | None,
    scale: float,
    anchors: Anchors,
    received: dict[str, dict[str, torch.Tensor]],
) -> Callable[[dict, object], torch.Tensor] | None:
    """The extra loss of a Train step (`regularizer`), with the stage's anchor taken from `anchors`
    (the model this round starts from, on the stage's first round here)."""
    anchor = None
    if needs_anchor(cfg):
        anchor = anchors.of(step.stage, lambda: round_start(weights, adapter, scale))
    return regularizer(cfg, speech, weights, anchor, received, scale)


def round_start(weights: dict, adapter: dict | None, scale: float) -> dict[str, torch.Tensor]:
    """The whole model a round starts from: the weights plus the starting adapter's s * B A."""
    return fold(weights, adapter_update(adapter, scale)) if adapter else dict(weights)


def _lora(module: torch.nn.Module) -> bool:
    return callable(getattr(module, "merge_and_unload", None))


def plain_model(module: torch.nn.Module) -> torch.nn.Module:
    """A copy without peft wrappers (a LoRA adapter merged into its weights)."""
    return copy.deepcopy(module).merge_and_unload() if _lora(module) else copy.deepcopy(module)


def regularizer(
    cfg: RunConfig,
    speech: SpeechModel,
    weights: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor] | None,
    received: dict[str, dict[str, torch.Tensor]],
    scale: float,
) -> Callable[[dict, object], torch.Tensor] | None:
    """The extra loss of the run's method for a round that trains `speech` (its weights and adapter
    loaded) on top of `weights`, or None (no method, or nothing to hold on to yet: the first stage)."""
    device = speech.device
    if cfg.cl_method == "ewc" and received.get(FISHER):
        fisher = {k: v.to(device) for k, v in received[FISHER].items()}
        if _lora(speech.model):  # the merged weight's change: (weights - theta*) + s B A
            factors = {base_key(p): ab for p, ab in live_factors(speech.model).items()}
            fixed = {
                k: (weights[k].to(torch.float32) - anchor[k].to(torch.float32)).to(device) for k in fisher
            }

            def deltas() -> dict:
                return {k: fixed[k] + scale * factors[k][1] @ factors[k][0] for k in fisher}
        else:
            params = dict(speech.model.named_parameters())
            theta = {k: anchor[k].to(device, params[k].dtype) for k in fisher}

            def deltas() -> dict:
                return {k: params[k] - theta[k] for k in fisher}

        return lambda batch, outputs: ewc.penalty(deltas(), fisher, cfg.ewc_lambda)
    if cfg.cl_method == "lwf":
        teacher = copy.copy(speech)
        teacher.model = plain_model(speech.model)
        teacher.model.load_state_dict(anchor)
        teacher.model.eval().requires_grad_(False)

        def distil(batch: dict, outputs) -> torch.Tensor:
            with torch.no_grad():
                target = teacher.outputs(batch).logits
            mask = speech.output_mask(batch, outputs.logits)
            return cfg.lwf_alpha * lwf.distillation(outputs.logits, target, mask, cfg.lwf_temperature)

        return distil
    if cfg.cl_method == "olora" and received.get(SUBSPACES):
        bases = {k: v.to(device) for k, v in received[SUBSPACES].items()}
        factors = live_factors(speech.model)
        return lambda batch, outputs: olora.penalty(
            bases, {p: factors[p][0] for p in bases}, cfg.olora_lambda
        )
    return None


def site_fisher(
    cfg: RunConfig, speech: SpeechModel, rows: list[Utterance], seed: int
) -> dict[str, torch.Tensor]:
    """A site's diagonal Fisher at the end of a stage, on up to ewc-samples of the stage's rows: of
    the adapted layers' merged weights (LoRA) or of every weight (full fine-tuning)."""
    from cl_fed.train import FEATURE_CACHE

    model = plain_model(speech.model)
    named = dict(model.named_parameters())
    if _lora(speech.model):
        keys = [base_key(p) for p in live_factors(speech.model)]
    else:
        keys = [k for k, p in named.items() if p.is_floating_point()]
    probe = copy.copy(speech)
    probe.model = model

    def loss_of(u: Utterance) -> torch.Tensor:
        features, _ = FEATURE_CACHE.get(speech, u)
        return probe.loss(speech.collate([features], [u.text], augment=False, languages=[u.language]))

    return ewc.diagonal_fisher(
        model, {k: named[k] for k in keys}, loss_of, ewc.fisher_sample(rows, cfg.ewc_samples, seed)
    )


def training_data(
    cfg: RunConfig, rows: list[Utterance], buffer_dir: Path | None, site: str, stage: int
) -> list[Utterance]:
    """What a round trains on: the stage's rows, and with replay the site's buffer of earlier stages
    (the buffer keeps replay-per-stage of this stage's rows for the stages after it)."""
    if cfg.cl_method != "replay":
        return rows
    if buffer_dir is None:
        raise ValueError("replay needs a directory for the site's buffer")
    buffer = ReplayBuffer(buffer_dir)
    buffer.keep(stage, choose(rows, cfg.replay_per_stage, cfg.seed, site, stage))
    return rows + buffer.before(stage)
