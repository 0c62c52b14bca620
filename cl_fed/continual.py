"""Building blocks of the continual loop, shared by the single-site runner and the Flower apps.

data:      prepare_data(cfg)           scenario -> cached synthetic dataset -> StageStream
model:     starting_model(cfg, ...)    the cached foundation base (embedded model) or a named model
factorize: lora_spec, train_config     LoRA shape and local training settings from the run config
evaluate:  evaluate_all(speech, ...)   WER/CER on every test set -> results.Evaluation
identity:  state_checksum(state)       which base a site holds
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from cl_fed.adapters import (
    LoraSpec,
    adapter_state,
    freeze_lora_a,
    fresh_factors,
    load_adapter_state,
    load_base_state,
)
from cl_fed.aggregation import FROZEN_A_RULES
from cl_fed.config import DEFAULTS, RunConfig
from cl_fed.data.scenario import Scenario, load_scenario
from cl_fed.data.stream import StageStream, validation_split
from cl_fed.data.synth import generate
from cl_fed.data.utterance import Utterance
from cl_fed.devices import amp_mode, enable_gradient_checkpointing, resolve_device
from cl_fed.evaluate import evaluate
from cl_fed.models.base import SpeechModel
from cl_fed.models.registry import build_model, load_model
from cl_fed.models.tiny import NAME as TINY_NAME
from cl_fed.plan import Train, rule_for
from cl_fed.results import Evaluation
from cl_fed.train import TrainConfig, TrainResult, steps_per_call, train_local

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")


def prepare_data(cfg: RunConfig, progress: bool = True) -> tuple[Scenario | None, StageStream]:
    """A scenario (generated once, cached) or a user manifest, as a site x stage stream."""
    if Path(cfg.scenario).suffix.lower() in MANIFEST_SUFFIXES:
        stream = StageStream.from_manifest(
            cfg.scenario, on_error=cfg.bad_rows, max_seconds=cfg.max_seconds or None
        )
        if progress and stream.load_summary is not None and stream.load_summary.num_skipped:
            print(f"[cl-fed] {stream.load_summary.format()}", flush=True)
        return None, first_sites(stream, cfg.sites)
    scenario = load_scenario(cfg.scenario)
    folder = generate(scenario, progress=progress)
    manifest = (folder / "manifest.jsonl").stat()
    return scenario, first_sites(
        _generated_stream(str(folder), manifest.st_mtime_ns, manifest.st_size), cfg.sites
    )


@functools.lru_cache(maxsize=4)
def _generated_stream(folder: str, mtime_ns: int, size: int) -> StageStream:
    """A generated dataset's stream, read once per process: a ClientApp serves a message per round,
    and reading the manifest checks every clip's audio header (~2.5 s for the default scenario).
    Keyed by the manifest's mtime and size, so a regenerated dataset is read again."""
    return StageStream.from_dataset_dir(folder)


def first_sites(stream: StageStream, count: int) -> StageStream:
    """The run config's `sites`: 0 keeps every site, N the data's first N (fewer factories, same stages)."""
    if count == 0 or count == len(stream.sites):
        return stream
    if count > len(stream.sites):
        raise ValueError(
            f"sites={count}, but {stream.source} has only {len(stream.sites)} sites: {stream.sites}"
        )
    return stream.with_sites(stream.sites[:count])


def starting_model(cfg: RunConfig, scenario: Scenario | None, progress: bool = True) -> SpeechModel:
    """The base every site starts from: the embedded model pre-trained on the scenario's
    foundation data (cached), or the model the user named."""
    if cfg.model == TINY_NAME:
        if scenario is None:
            raise ValueError(
                f"model={TINY_NAME!r} is pre-trained on a scenario's foundation data, but "
                f"scenario={cfg.scenario!r} is a manifest; name a pretrained model (a local directory "
                "or, with allow-download=true, a hub id)"
            )
        from cl_fed.models.foundation import foundation_base

        return with_model_options(cfg, load_model(foundation_base(scenario, progress=progress)))
    return with_model_options(cfg, build_model(cfg.model, allow_download=cfg.allow_download, seed=cfg.seed))


def with_model_options(cfg: RunConfig, speech: SpeechModel) -> SpeechModel:
    """The run's Whisper keys (language, task, whisper-window) applied; other models refuse them.
    Every site and the server build their model through here, so all hold the same shapes."""
    if speech.family != "whisper":
        changed = {k: v for k, v in (("language", cfg.language), ("task", cfg.task)) if v != DEFAULTS[k]}
        if cfg.whisper_window:
            changed["whisper-window"] = cfg.whisper_window
        if changed:
            keys = ", ".join(f"{k}={v!r}" for k, v in changed.items())
            raise ValueError(f"{keys}: Whisper keys, but model={cfg.model!r} is a {speech.family} model")
        return speech
    try:
        speech.set_language(cfg.language, cfg.task)
        if cfg.whisper_window:
            speech.set_window(cfg.whisper_window)
    except ValueError as error:
        raise ValueError(f"model={cfg.model!r}: {error}") from None
    return speech


def on_device(cfg: RunConfig, speech: SpeechModel, training: bool = False) -> SpeechModel:
    """`speech` moved to the run's device (checked, with its precision, before anything trains);
    with gradient checkpointing when it trains and the run asks for it."""
    device = resolve_device(cfg.device)
    amp_mode(cfg.precision, device)
    if training and cfg.gradient_checkpointing:
        enable_gradient_checkpointing(speech.model)
    return speech.to(device)


def lora_spec(cfg: RunConfig, speech: SpeechModel) -> LoraSpec:
    """The run's LoRA shape; 0 / negative config values take the model family's defaults."""
    return LoraSpec(
        rank=cfg.lora_rank or speech.lora_rank,
        alpha=cfg.lora_alpha or speech.lora_alpha,
        dropout=cfg.lora_dropout if cfg.lora_dropout >= 0 else speech.lora_dropout,
        target_modules=tuple(speech.lora_targets),
    )


def train_config(cfg: RunConfig, step: Train, num_utterances: int, progress: bool = False) -> TrainConfig:
    """Local training for one Train step: LoRA factors, or all weights for the fedavg baseline.

    The LR schedule spans `lr-span`: with "stage" a round trains steps [i * n, (i + 1) * n) of one
    schedule over the stage's rounds (n = the round's optimizer steps), so warm-up happens once per
    stage; the optimizer's moments still restart every round, as in FedAvg's local training."""
    per_round = steps_per_call(num_utterances, cfg.local_epochs, cfg.batch_size, cfg.grad_accumulation)
    return TrainConfig(
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        accumulate=cfg.grad_accumulation,
        amp=amp_mode(cfg.precision, resolve_device(cfg.device)),
        lr=cfg.full_lr if step.start == "full" else cfg.lr,
        schedule=cfg.lr_schedule,
        warmup=cfg.warmup,
        span_steps=per_round * step.span_rounds,
        span_offset=per_round * step.span_index,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        spec_augment=cfg.spec_augment,
        seed=step.seed,
        progress=progress,
        proximal_mu=cfg.proximal_mu,  # FedProx (a site: the mu its message carries, clients/client_app.py)
    )


def train_round(
    speech: SpeechModel,
    data: list[Utterance],
    cfg: RunConfig,
    step: Train,
    weights: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor] | None,
    progress: bool = False,
    extra_loss=None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """One site's Train step: load the weights (and the adapter it starts from), train, return the
    update it sends (LoRA factors, or every weight for full fine-tuning) and the training figures.
    `extra_loss`: a continual-learning method's term (cl_fed.clmethods.regularizer)."""
    if not data:
        raise ValueError(f"no training data in stage {step.stage}")
    if step.start == "full":
        speech.model.load_state_dict(weights)
    else:
        if adapter is None:
            raise ValueError(
                f"round {step.server_round} trains LoRA factors but was given no adapter to start from"
            )
        load_base_state(speech.model, weights)
        load_adapter_state(speech.model, adapter)
        freeze_lora_a(speech.model, rule_for(cfg) in FROZEN_A_RULES)
    config = train_config(cfg, step, len(data), progress=progress)
    result = train_local(speech, data, config, extra_loss=extra_loss)
    if step.start == "full":
        update = {k: v.detach().to("cpu").clone() for k, v in speech.model.state_dict().items()}
    else:
        update = adapter_state(speech.model)
    return update, result


def start_adapter(step: Train, state_adapter: dict | None, shapes: dict) -> dict[str, torch.Tensor] | None:
    """What a Train step starts from: a fresh adapter drawn from its seed, or the aggregate."""
    if step.start == "full":
        return None
    if step.start == "fresh" or state_adapter is None:
        return fresh_factors(shapes, step.seed)
    return state_adapter


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: which exact base a site holds."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def training_rows(cfg: RunConfig, rows: list[Utterance]) -> list[Utterance]:
    """A site's rows of a stage that it trains on: all of them, or with a merge gate all but its
    validation share (cl_fed.data.stream.validation_split), which is never trained on."""
    return validation_split(rows, cfg.validation_share)[0] if cfg.merge_gate != "none" else rows


def validation_scorer(speech: SpeechModel, stream: StageStream, cfg: RunConfig):
    """A merge gate's Score (cl_fed.gate) on server-held validation rows: every site's validation
    share of each stage. The score of a base is kept by its checksum (a base is judged as the
    "before" of several decisions)."""
    sets = {stage: stream.validation(stage, cfg.validation_share) for stage in stream.stages}
    seen: dict[tuple[str, str], float] = {}

    def score(weights: dict[str, torch.Tensor], stages: list[str]) -> dict[str, float]:
        key = state_checksum(weights)
        todo = {s: sets[s] for s in stages if (key, s) not in seen}
        if todo:
            for stage, value in evaluate_weights(speech, weights, todo, "gate").wer.items():
                seen[(key, stage)] = value
        return {s: seen[(key, s)] for s in stages}

    return score


def test_sets(stream: StageStream) -> dict[str, list[Utterance]]:
    """Every stage's shared test set, plus the foundation domain's when there is one."""
    sets = {stage: stream.test(stage) for stage in stream.stages}
    foundation = stream.foundation("test")  # empty for a user manifest
    if foundation:
        sets["foundation"] = foundation
    return sets


def evaluate_weights(
    speech: SpeechModel, weights: dict[str, torch.Tensor], sets: dict[str, list[Utterance]], label: str
) -> Evaluation:
    """Load `weights` into the plain (un-adapted) model and score it: the server and the runner."""
    speech.model.load_state_dict(weights)
    return evaluate_all(speech, sets, label)


def evaluate_all(speech: SpeechModel, sets: dict[str, list[Utterance]], label: str) -> Evaluation:
    was_training = speech.model.training
    speech.model.eval()
    wers, cers, predictions = {}, {}, []
    with torch.no_grad():
        for name, utterances in sets.items():
            scored = evaluate(speech, utterances)
            wers[name], cers[name] = scored["wer"], scored["cer"]
            predictions += [{"test_set": name, **p} for p in scored["predictions"]]
    speech.model.train(was_training)
    return Evaluation(label=label, wer=wers, cer=cers, predictions=predictions)


def merge_recorder(cfg: RunConfig, stages: list[str], scale: float, record, history, score=None, say=print):
    """The runner's `merged` and `gate` callbacks for cl_fed.loop.walk: every committed merge becomes
    a step of the merge history (cl_fed.history), and with merge-gate=validate every committing
    merge is first judged (cl_fed.gate) on `score`, its decision recorded in results.json and printed."""
    from cl_fed.gate import gate_line, gate_merge
    from cl_fed.history import contributions

    decided: list[dict | None] = [None]

    def gate(step, state) -> float:
        decision = gate_merge(cfg, state, step, stages, scale, score)
        decision["server_round"] = record.rounds[-1]["server_round"]
        record.gate.append(decision)
        say(gate_line(decision))
        if decision["weight"] == 0:
            history.skipped(decision)
        decided[0] = decision
        return decision["weight"]

    def merged(step, before: dict, state) -> None:
        record.rounds[-1]["merged"], record.rounds[-1]["pooled"] = step.commit, True
        residual_only = not step.commit and step.residual_to_base  # fedex: the residuals into the base
        if not step.commit and not (residual_only and state_checksum(before) != state_checksum(state.base)):
            return
        server_round = record.rounds[-1]["server_round"]
        decision, decided[0] = decided[0], None
        meta = {
            "stage": step.stage,
            "stage_name": stages[step.stage],
            "round": step.round,
            "server_round": server_round,
            "contributions": contributions(record.rounds, history.boundary()),
            "weight": decision["weight"] if decision else 1.0,
            "gate": decision,
            **({"part": "residuals"} if residual_only else {}),
        }
        history.record(before, state.base, (state_checksum(before), state_checksum(state.base)), meta)

    return (gate if cfg.merge_gate != "none" else None), merged
