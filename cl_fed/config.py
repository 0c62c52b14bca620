"""Run configuration: the one list of knobs and their defaults.

The same keys (kebab-case) are Flower run-config keys (`flwr run . --run-config "seed=1"`), hydra
overrides in `simulations/`, and flags of the single-site runner (`--seed 1`). The Flower app's
`[tool.flwr.app.config]` in pyproject.toml mirrors DEFAULTS; a test keeps them equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from cl_fed.devices import DEVICE_PATTERN, PRECISIONS
from cl_fed.paths import runs_root
from cl_fed.schedule import Schedule, check_strategy, parse_schedule

MERGE_MODES = ("product", "factors")
LORA_AGGREGATIONS = ("exact", "fedex", "fedit", "ffa", "fedsa")  # cl_fed/aggregation.py
EVALUATION_MODES = ("server", "federated")
TRACKING_BACKENDS = ("none", "tensorboard", "mlflow")  # cl_fed/tracking.py
CL_METHODS = ("none", "ewc", "lwf", "olora", "replay")  # cl_fed/clmethods
# each method's own keys (the others' are ignored: RunConfig.effective)
CL_METHOD_KEYS = {
    "ewc": ("ewc-lambda", "ewc-samples", "ewc-decay"),
    "lwf": ("lwf-alpha", "lwf-temperature"),
    "olora": ("olora-lambda",),
    "replay": ("replay-per-stage",),
}

DEFAULTS: dict[str, object] = {
    "scenario": "default",  # packaged scenario name or path to a scenario YAML
    "sites": 0,  # 0 = every site of the data; N = only its first N sites
    "model": "tiny-fastconformer-ctc",  # registry name, local model dir, or hub id (needs allow-download)
    "allow-download": False,
    # Whisper only (cl_fed/models/hf.py; other models refuse other values than these defaults)
    "language": "auto",  # a Whisper language code (labels and generate), or auto: each utterance's own
    "task": "transcribe",  # transcribe | translate
    "whisper-window": 0.0,  # encoder window in seconds (0 = Whisper's 30 s); shorter: faster, see README
    "bad-rows": "raise",  # manifest rows with missing/corrupt/empty/too long audio or bad text: raise | skip
    "max-seconds": 30.0,  # longest clip a manifest may hold (0 = no limit)
    "strategy": "centralization",  # centralization | fedavg | fedavg-lora | local
    "merge": "product",  # product (exact mean of B_i A_i) | factors (mean B times mean A)
    # how a round's LoRA factors aggregate (cl_fed/aggregation.py): exact (the sites continue from the
    # exact mean model) | fedex (FedEx-LoRA: residuals into the base at once) | fedit (factor means) |
    # ffa (FFA-LoRA: A frozen, B trained and sent) | fedsa (FedSA-LoRA: A shared, B and the model
    # stay at each site, evaluated there). merge=factors is fedit throughout
    "lora-aggregation": "exact",
    "centralize-every": "stage",  # round | stage | K (stages, through an adapter pool)
    "rounds-per-stage": 2,
    "local-epochs": 3,
    "batch-size": 16,
    # peak learning rates, calibrated on the default scenario's first-stage validation split (issue 11)
    "lr": 1e-2,  # LoRA
    "full-lr": 1e-3,  # full fine-tuning (fedavg)
    # local optimisation (cl_fed/train.py): AdamW, warm-up then decay, one schedule per lr-span
    "lr-schedule": "inverse_sqrt",  # inverse_sqrt (the paper's) | cosine | linear | constant
    "lr-span": "stage",  # stage: one schedule over a stage's rounds | round: a new schedule every round
    "warmup": 0.1,  # warm-up as a fraction of the span's optimizer steps
    "weight-decay": 0.01,
    "grad-clip": 1.0,  # max global gradient norm (0 = off)
    "spec-augment": True,
    "grad-accumulation": 1,  # micro-batches of batch-size per optimizer step
    # hardware (cl_fed/devices.py): where sites train and the server evaluates; merges stay on the CPU
    "device": "auto",  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    "precision": "auto",  # auto (bf16 on CUDA where supported, else fp32) | fp32 | bf16 | fp16
    "gradient-checkpointing": False,  # recompute activations in backward: less memory, slower
    "lora-rank": 0,  # 0 = the model family's default (tiny and Whisper: 32, as in the paper; CTC: 16)
    "lora-alpha": 0.0,  # 0 = the model family's default (tiny and Whisper: 64; CTC: 32)
    "lora-dropout": -1.0,  # < 0 = the model family's default (0.05)
    "weighting": "examples",  # examples | uniform
    # limits on one site (cl_fed/robust.py; server/strategies.py)
    "max-site-weight": 0.5,  # no site's averaging weight above this share (the rest is shared out)
    "max-update-norm": 1000.0,  # reject an update (returned minus sent) whose L2 norm exceeds this
    "update-norm-ratio": 10.0,  # reject an update longer than this x the round's median (>= 3 sites; 0 = off)
    "aggregation": "mean",  # mean | median | trimmed-mean (coordinate-wise, of what each update does)
    "trim-fraction": 0.2,  # trimmed-mean: share of the updates cut at each end (Flower's FedTrimmedAvg beta)
    "evaluation": "server",  # server | federated
    "round-timeout": 900,  # seconds a round waits for client replies
    "fraction-train": 1.0,  # share of the sites sampled each round (seeded by seed and round)
    # Flower's own strategies composed with ours (server/strategies.py build_strategy):
    # a server optimiser on the aggregated LoRA update before it is applied: none | adam | yogi |
    # adagrad (FedAdam, FedYogi, FedAdagrad) | avgm (FedAvgM); fedadam, fedyogi, fedadagrad, fedavgm
    # are read as their short names
    "server-optimizer": "none",
    # its step size: Flower's eta (adam, yogi, adagrad) or server_learning_rate (avgm);
    # 0 = the optimiser's default (SERVER_LR_DEFAULTS: 1e-3 for adam/yogi/adagrad, 1.0 for avgm)
    "server-lr": 0.0,
    "server-momentum": 0.9,  # avgm: FedAvgM's server_momentum (as in Flower's FedAvgM baseline)
    # FedProx (Flower's FedProx sends it; sites add (mu/2) ||w - w_start||^2 to their loss); 0 = off
    "proximal-mu": 0.0,
    "seed": 0,
    "output-dir": "",  # "" = the project's runs/ directory
    "run-name": "",  # "" = derived from scenario, strategy, schedule and seed
    "resume": False,
    # differential privacy (cl_fed/privacy.py): site-level DP-FedAvg on the adapter updates
    "dp-noise": 0.0,  # noise multiplier z; 0 = DP off (no clipping, no noise)
    # L2 norm each site's adapter update is clipped to: the median unclipped update norm of the tiny model
    # in the default scenario's first stage was 2.03 (1.89..2.14 over 4 sites x 2 rounds;
    # tiny scenario 0.10..0.14)
    "dp-clip": 2.0,
    "dp-delta": 1e-5,  # the delta at which epsilon is reported
    # merge gates (cl_fed/gate.py): score a scheduled merge on validation data before it is committed
    "merge-gate": "none",  # none (merge as scheduled) | validate (merge only what helps)
    "gate-sites": "none",  # none | alone: also score each site's update alone, aggregate those that pass
    "gate-min-gain": 0.0,  # the current stage's validation WER must fall by at least this (points)
    "gate-max-regression": 5.0,  # no earlier stage's validation WER may rise by more (points)
    "gate-fallback": "skip",  # skip (a failed merge is dropped) | shrink (retried once at half weight)
    # share of each site's stage rows held out as validation (merge-gate=validate only; never trained on)
    "validation-share": 0.1,
    # with resume=true: roll the base back to this step of the run's merge history first (-1 = no)
    "rollback-to": -1,
    # a drill (cl_fed/faults.py): "shuffle-transcripts:<site>" gives that site mislabelled training data
    "drill": "",
    # experiment tracking (cl_fed/tracking.py): rounds, evaluations and config to <run-dir>/tensorboard/
    # or an MLflow file store <run-dir>/mlruns/, offline: none | tensorboard | mlflow
    "tracking": "none",
    # continual-learning baselines (cl_fed/clmethods), added to the strategy's training:
    # none | ewc (online EWC, the sites' Fisher averaged on the server) | lwf (distil the model the
    # stage started from) | olora (adapters orthogonal to the merged updates' subspaces) |
    # replay (each site keeps some of its own past utterances: not rehearsal-free)
    "cl-method": "none",
    # EWC: the penalty's weight, lambda/2 * sum F (theta - theta*)^2. 5000: an update as large as the
    # default scenario's stage-1 update, in its directions, then costs about 0.55, half the data loss a
    # new stage starts at (training data only: python -m benchmarks.ewc_scale <run>)
    "ewc-lambda": 5000.0,
    "ewc-samples": 64,  # EWC: utterances per site the diagonal Fisher is estimated on, at each stage's end
    "ewc-decay": 1.0,  # EWC: the running Fisher is decay * F + the stage's (online EWC's gamma)
    "lwf-alpha": 1.0,  # LwF: weight of the distillation term
    "lwf-temperature": 2.0,  # LwF: softmax temperature of teacher and student
    "olora-lambda": 0.5,  # O-LoRA: weight of sum |Q A^T| (O-LoRA's lambda_1)
    "replay-per-stage": 50,  # replay: utterances of each stage a site keeps for later stages
}


# Knobs a strategy does not use (see RunConfig.effective).
IGNORED_BY = {
    "centralization": ("full-lr",),
    "local": (
        "full-lr",
        "server-optimizer",
        "server-lr",
        "server-momentum",
        "proximal-mu",
        "aggregation",
        "trim-fraction",
        "max-site-weight",
    ),
    "fedavg-lora": ("full-lr", "merge", "centralize-every", "lora-aggregation"),  # FedIT by definition
    "fedavg": (
        "lr",
        "merge",
        "lora-aggregation",
        "centralize-every",
        "lora-rank",
        "lora-alpha",
        "lora-dropout",
        "server-optimizer",
        "server-lr",
        "server-momentum",
    ),
}
LR_SCHEDULES = ("inverse_sqrt", "cosine", "linear", "constant")
LR_SPANS = ("stage", "round")
SERVER_OPTIMIZERS = ("none", "adam", "yogi", "adagrad", "avgm")  # server/strategies.py SERVER_OPTIMIZERS
SERVER_OPTIMIZER_ALIASES = {"fedadam": "adam", "fedyogi": "yogi", "fedadagrad": "adagrad", "fedavgm": "avgm"}
# server-lr = 0: FedOpt's eta stays this project's 1e-3 (Flower's 0.1 / 0.01 overshoot the scale of a
# LoRA factor); FedAvgM's server_learning_rate is Flower's 1.0 (a step of the whole aggregated update)
SERVER_LR_DEFAULTS = {"adam": 1e-3, "yogi": 1e-3, "adagrad": 1e-3, "avgm": 1.0}
PROXIMAL_STRATEGIES = ("centralization", "fedavg-lora", "fedavg")  # local: no shared model to stay near
AGGREGATIONS = ("mean", "median", "trimmed-mean")  # cl_fed/robust.py
SCHEDULED_STRATEGIES = ("centralization", "local")
MERGE_GATES = ("none", "validate")
GATE_SITES = ("none", "alone")
GATE_FALLBACKS = ("skip", "shrink")
GATE_KEYS = (
    "merge-gate",
    "gate-sites",
    "gate-min-gain",
    "gate-max-regression",
    "gate-fallback",
    "validation-share",
)
NAMED_ELSEWHERE = ("scenario", "strategy", "merge", "centralize-every", "seed")
# do not change what is computed (device: up to the hardware's rounding)
NOT_IN_NAME = (
    "allow-download",
    "round-timeout",
    "output-dir",
    "run-name",
    "resume",
    "device",
    "gradient-checkpointing",
    "rollback-to",  # an operator's action on a resumed run, recorded in its results and history
    "tracking",  # where the same results are also logged
)


def _name_part(value) -> str:
    text = Path(value).stem if isinstance(value, str) and ("/" in value or "." in value) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


@dataclass(frozen=True)
class RunConfig:
    scenario: str
    sites: int
    model: str
    allow_download: bool
    language: str
    task: str
    whisper_window: float
    bad_rows: str
    max_seconds: float
    strategy: str
    merge: str
    lora_aggregation: str
    centralize_every: str
    rounds_per_stage: int
    local_epochs: int
    batch_size: int
    lr: float
    full_lr: float
    lr_schedule: str
    lr_span: str
    warmup: float
    weight_decay: float
    grad_clip: float
    spec_augment: bool
    grad_accumulation: int
    device: str
    precision: str
    gradient_checkpointing: bool
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    weighting: str
    max_site_weight: float
    max_update_norm: float
    update_norm_ratio: float
    aggregation: str
    trim_fraction: float
    evaluation: str
    round_timeout: int
    fraction_train: float
    server_optimizer: str
    server_lr: float
    server_momentum: float
    proximal_mu: float
    seed: int
    output_dir: str
    run_name: str
    resume: bool
    dp_noise: float
    dp_clip: float
    dp_delta: float
    merge_gate: str
    gate_sites: str
    gate_min_gain: float
    gate_max_regression: float
    gate_fallback: str
    validation_share: float
    rollback_to: int
    drill: str
    tracking: str
    cl_method: str
    ewc_lambda: float
    ewc_samples: int
    ewc_decay: float
    lwf_alpha: float
    lwf_temperature: float
    olora_lambda: float
    replay_per_stage: int

    @property
    def site_models(self) -> bool:
        """Each site keeps a model of its own (local; lora-aggregation=fedsa: A shared, B kept), so
        the sites apply the plan's merges themselves and evaluation happens at the sites."""
        return self.strategy == "local" or (
            self.strategy == "centralization" and self.merge == "product" and self.lora_aggregation == "fedsa"
        )

    def schedule(self, num_stages: int) -> Schedule:
        return parse_schedule(self.centralize_every, num_stages)

    def run_dir(self, run_name: str = "") -> Path:
        """Where the run named `run_name` (default: this config's) writes: under `output-dir`, or
        the project's runs/ folder. The server and its sites both derive it from the run config."""
        return Path(self.output_dir or runs_root()) / (run_name or self.default_run_name())

    def default_run_name(self) -> str:
        """`<scenario>-<strategy>[-every-<K>-<merge>][-<key><value>...]-seed<N>`: every knob that changes
        the results and differs from its default is in the name, so runs never overwrite each other and
        a rerun (resume, sweeps) finds its directory again."""
        if self.run_name:
            return self.run_name
        cfg = self.effective()
        name = f"{Path(cfg.scenario).stem}-{cfg.strategy}"
        if cfg.strategy in SCHEDULED_STRATEGIES:
            name += f"-every-{cfg.centralize_every}-{cfg.merge}"
        values = cfg.to_dict()
        for key, default in DEFAULTS.items():
            if key in NAMED_ELSEWHERE or key in NOT_IN_NAME or values[key] == default:
                continue
            name += f"-{key}{_name_part(values[key])}"
        return f"{name}-seed{cfg.seed}"

    def effective(self) -> RunConfig:
        """The same run with the knobs its strategy ignores at their defaults (fedavg has no
        schedule or LoRA; fedavg-lora never merges; LoRA strategies have no full-lr), so that
        configurations that train the same way compare (and deduplicate) as equal."""
        ignored = IGNORED_BY[self.strategy] + (() if self.dp_noise else ("dp-clip", "dp-delta"))  # DP off
        if self.server_optimizer == "none":
            ignored += ("server-lr",)
        if self.server_optimizer != "avgm":
            ignored += ("server-momentum",)
        if self.merge == "factors":
            ignored += ("lora-aggregation",)  # FedIT rounds and merges
        if self.merge_gate == "none" or self.strategy != "centralization":
            ignored += GATE_KEYS
        if self.aggregation != "trimmed-mean":
            ignored += ("trim-fraction",)
        if self.aggregation != "mean" or self.weighting == "uniform":
            ignored += ("max-site-weight",)  # robust statistics and uniform weights count every site once
        for method, keys in CL_METHOD_KEYS.items():
            if method != self.cl_method:
                ignored += keys
        return replace(self, **{key.replace("-", "_"): DEFAULTS[key] for key in ignored})

    def server_step(self) -> float:
        """The server optimiser's step size: server-lr, or (0) the optimiser's default."""
        return self.server_lr or SERVER_LR_DEFAULTS.get(self.server_optimizer, 0.0)

    def to_dict(self) -> dict:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _coerce(key: str, value, default):
    """Flower passes TOML-typed values; CLI and hydra may pass strings. Cast to the default's type."""
    if key == "centralize-every":
        return str(value)
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {type(default).__name__}") from None


def make_config(overrides: dict | None = None, *, source: str = "run config") -> RunConfig:
    """DEFAULTS updated by `overrides` (kebab- or snake-case keys), validated."""
    values = dict(DEFAULTS)
    for key, value in (overrides or {}).items():
        key = key.replace("_", "-")
        if key not in DEFAULTS:
            raise ValueError(f"{source}: unknown key {key!r}; known keys: {', '.join(DEFAULTS)}")
        values[key] = _coerce(key, value, DEFAULTS[key])
    optimizer = values["server-optimizer"] = SERVER_OPTIMIZER_ALIASES.get(
        str(values["server-optimizer"]).strip().lower(), values["server-optimizer"]
    )  # one spelling per optimiser, so that run names stay unique
    if values["server-lr"] == SERVER_LR_DEFAULTS.get(optimizer):
        values["server-lr"] = 0.0  # the optimiser's default, spelled out
    cfg = RunConfig(**{k.replace("-", "_"): v for k, v in values.items()})
    check_strategy(cfg.strategy)
    if cfg.merge not in MERGE_MODES:
        raise ValueError(f"{source}: merge={cfg.merge!r}; choose one of {', '.join(MERGE_MODES)}")
    if cfg.evaluation not in EVALUATION_MODES:
        raise ValueError(
            f"{source}: evaluation={cfg.evaluation!r}; choose one of {', '.join(EVALUATION_MODES)}"
        )
    if cfg.bad_rows not in ("raise", "skip"):
        raise ValueError(f"{source}: bad-rows={cfg.bad_rows!r}; choose raise or skip")
    if cfg.weighting not in ("examples", "uniform"):
        raise ValueError(f"{source}: weighting={cfg.weighting!r}; choose examples or uniform")
    if cfg.sites < 0:
        raise ValueError(f"{source}: sites={cfg.sites!r} must be >= 1 (or 0 for every site of the data)")
    if not DEVICE_PATTERN.fullmatch(cfg.device):
        raise ValueError(f"{source}: device={cfg.device!r}; choose auto, cpu, cuda, cuda:N or mps")
    if cfg.task not in ("transcribe", "translate"):
        raise ValueError(f"{source}: task={cfg.task!r}; choose transcribe or translate")
    if not 0.0 <= cfg.whisper_window <= 30.0:
        raise ValueError(
            f"{source}: whisper-window={cfg.whisper_window!r} is seconds in (0, 30], or 0 for 30"
        )
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"{source}: precision={cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    for key in ("rounds-per-stage", "local-epochs", "batch-size", "grad-accumulation"):
        if values[key] < 1:
            raise ValueError(f"{source}: {key}={values[key]!r} must be >= 1")
    for key in ("lora-rank", "lora-alpha"):
        if values[key] < 0:
            raise ValueError(f"{source}: {key}={values[key]!r} must be >= 1 (or 0 for the model's default)")
    for key, allowed in (
        ("lr-schedule", LR_SCHEDULES),
        ("lr-span", LR_SPANS),
        ("server-optimizer", SERVER_OPTIMIZERS),
    ):
        if values[key] not in allowed:
            raise ValueError(f"{source}: {key}={values[key]!r}; choose one of {', '.join(allowed)}")
    if not 0.0 <= cfg.warmup < 1.0:
        raise ValueError(f"{source}: warmup={cfg.warmup!r} is a fraction of the schedule's steps, in [0, 1)")
    for key in ("weight-decay", "grad-clip"):
        if not values[key] >= 0:
            raise ValueError(f"{source}: {key}={values[key]!r} must be >= 0")
    check_server_options(cfg, source)
    if cfg.server_optimizer != "none" and cfg.dp_noise:
        raise ValueError(
            f"{source}: server-optimizer={cfg.server_optimizer!r} with dp-noise: the optimiser "
            "would act on the noised mean outside the accountant's view; use one of them"
        )
    if cfg.aggregation not in AGGREGATIONS:
        raise ValueError(
            f"{source}: aggregation={cfg.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
        )
    if not 0.0 <= cfg.trim_fraction < 0.5:
        raise ValueError(f"{source}: trim-fraction={cfg.trim_fraction!r} must be in [0, 0.5)")
    if not 0.0 < cfg.max_site_weight <= 1.0:
        raise ValueError(
            f"{source}: max-site-weight={cfg.max_site_weight!r} is the largest share of a site, in (0, 1]"
        )
    if not cfg.max_update_norm > 0:
        raise ValueError(f"{source}: max-update-norm={cfg.max_update_norm!r} must be > 0")
    if not cfg.update_norm_ratio >= 0 or 0 < cfg.update_norm_ratio <= 1:
        raise ValueError(
            f"{source}: update-norm-ratio={cfg.update_norm_ratio!r} must be > 1 (x the round's median "
            "update norm), or 0 for off"
        )
    if cfg.aggregation != "mean" and cfg.dp_noise:
        raise ValueError(
            f"{source}: aggregation={cfg.aggregation!r} with dp-noise: the noise is calibrated to the "
            "mean of the clipped updates; use aggregation='mean' with DP"
        )
    if not 0.0 < cfg.fraction_train <= 1.0:
        raise ValueError(f"{source}: fraction-train={cfg.fraction_train!r} must be in (0, 1]")
    check_privacy(cfg, source)
    check_gate(cfg, source)
    if cfg.tracking not in TRACKING_BACKENDS:
        raise ValueError(f"{source}: tracking={cfg.tracking!r}; choose one of {', '.join(TRACKING_BACKENDS)}")
    check_lora_aggregation(cfg, source)
    check_cl_method(cfg, source)
    every = str(cfg.centralize_every).strip().lower()
    if every not in ("round", "stage"):  # the divisibility check needs the scenario: done in schedule()
        parse_schedule(every, num_stages=max(1, int(every)) if every.isdigit() else 1)
    every = (
        "stage" if every == "1" else str(int(every)) if every.isdigit() else every
    )  # one spelling per schedule
    return replace(cfg, centralize_every=every)


def check_server_options(cfg: RunConfig, source: str) -> None:
    """server-optimizer, server-lr, server-momentum and proximal-mu (server/strategies.py)."""
    if not (cfg.server_lr >= 0 and cfg.server_lr < float("inf")):
        raise ValueError(
            f"{source}: server-lr={cfg.server_lr!r} must be > 0 (or 0 for the optimiser's default)"
        )
    if not 0.0 <= cfg.server_momentum < 1.0:
        raise ValueError(f"{source}: server-momentum={cfg.server_momentum!r} must be in [0, 1)")
    if not (cfg.proximal_mu >= 0 and cfg.proximal_mu < float("inf")):
        raise ValueError(f"{source}: proximal-mu={cfg.proximal_mu!r} must be a finite number >= 0 (0 = off)")
    if cfg.server_optimizer != "none" and cfg.strategy not in ("centralization", "fedavg-lora"):
        why = (
            "its rounds start from the whole model, whose integer BatchNorm counters Flower's "
            "optimisers would turn into floats (not built)"
            if cfg.strategy == "fedavg"
            else "its sites aggregate nothing on the server"
        )
        raise ValueError(
            f"{source}: server-optimizer={cfg.server_optimizer!r} acts on the aggregated LoRA update "
            f"and strategy={cfg.strategy!r} has none: {why}; use centralization or fedavg-lora"
        )
    if cfg.proximal_mu and cfg.strategy not in PROXIMAL_STRATEGIES:
        raise ValueError(
            f"{source}: proximal-mu={cfg.proximal_mu!r} with strategy={cfg.strategy!r}: FedProx keeps "
            "a site near the model the server sent, and a local site is sent none; use "
            f"{', '.join(PROXIMAL_STRATEGIES)}"
        )


DP_STRATEGIES = ("centralization", "fedavg-lora")


def check_privacy(cfg: RunConfig, source: str) -> None:
    """The DP keys' ranges, and the settings DP-FedAvg's guarantee needs (see cl_fed/privacy.py)."""
    if not (cfg.dp_noise >= 0 and cfg.dp_noise < float("inf")):
        raise ValueError(f"{source}: dp-noise={cfg.dp_noise!r} must be a finite number >= 0 (0 = DP off)")
    if not (cfg.dp_clip > 0 and cfg.dp_clip < float("inf")):
        raise ValueError(f"{source}: dp-clip={cfg.dp_clip!r} must be a finite number > 0")
    if not 0 < cfg.dp_delta < 1:
        raise ValueError(f"{source}: dp-delta={cfg.dp_delta!r} must be in (0, 1)")
    if not cfg.dp_noise:
        return
    if cfg.strategy not in DP_STRATEGIES:
        raise ValueError(
            f"{source}: dp-noise={cfg.dp_noise!r} with strategy={cfg.strategy!r}: differential privacy "
            f"covers shared adapter updates; use strategy {' or '.join(map(repr, DP_STRATEGIES))}"
        )
    if cfg.strategy == "centralization" and cfg.merge == "product":
        raise ValueError(
            f"{source}: dp-noise={cfg.dp_noise!r} with merge='product': the exact product merge uses "
            "every site's own factors, which carry no noise; use merge='factors' (it merges the "
            "noised mean) or dp-noise=0"
        )
    if cfg.weighting != "uniform":
        raise ValueError(
            f"{source}: dp-noise={cfg.dp_noise!r} with weighting={cfg.weighting!r}: the noise is "
            "calibrated to a mean in which each site weighs 1/n (example counts are private and "
            "would set the sensitivity); use weighting='uniform'"
        )


def check_gate(cfg: RunConfig, source: str) -> None:
    """The merge-gate keys (cl_fed/gate.py) and the drill (cl_fed/faults.py)."""
    for key, allowed in (
        ("merge-gate", MERGE_GATES),
        ("gate-sites", GATE_SITES),
        ("gate-fallback", GATE_FALLBACKS),
    ):
        value = getattr(cfg, key.replace("-", "_"))
        if value not in allowed:
            raise ValueError(f"{source}: {key}={value!r}; choose one of {', '.join(allowed)}")
    if not 0.0 < cfg.validation_share < 0.5:
        raise ValueError(
            f"{source}: validation-share={cfg.validation_share!r} is the share of each site's stage rows "
            "held out for the gate, in (0, 0.5)"
        )
    if not cfg.gate_max_regression >= 0:
        raise ValueError(
            f"{source}: gate-max-regression={cfg.gate_max_regression!r} must be >= 0 (WER points)"
        )
    if cfg.gate_min_gain != cfg.gate_min_gain:
        raise ValueError(f"{source}: gate-min-gain={cfg.gate_min_gain!r} is not a number")
    if cfg.merge_gate != "none" and cfg.strategy != "centralization":
        raise ValueError(
            f"{source}: merge-gate={cfg.merge_gate!r} gates the server's scheduled merges; "
            f"strategy={cfg.strategy!r} has none (a local site merges on its own): use centralization"
        )
    if cfg.merge_gate == "none" and cfg.gate_sites != "none":
        raise ValueError(f"{source}: gate-sites={cfg.gate_sites!r} needs merge-gate='validate'")
    if cfg.gate_sites != "none" and cfg.evaluation == "federated":
        raise ValueError(
            f"{source}: gate-sites={cfg.gate_sites!r} with evaluation='federated': scoring one site's "
            "update at the other sites would send them that site's own update; use evaluation='server'"
        )
    if cfg.gate_sites != "none" and cfg.dp_noise:
        raise ValueError(
            f"{source}: gate-sites={cfg.gate_sites!r} with dp-noise: scoring each site's own update "
            "looks at what DP hides; use one of them"
        )
    if cfg.rollback_to < -1 or (cfg.rollback_to >= 0 and not cfg.resume):
        raise ValueError(
            f"{source}: rollback-to={cfg.rollback_to!r} rolls a resumed run back to a step of its merge "
            "history: give a step >= 0 with resume=true (or -1 for none)"
        )
    if cfg.drill:
        from cl_fed.faults import parse_drill

        try:
            parse_drill(cfg.drill)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def check_lora_aggregation(cfg: RunConfig, source: str) -> None:
    """`lora-aggregation` and the keys it combines with (cl_fed/aggregation.py)."""
    rule = cfg.lora_aggregation
    if rule not in LORA_AGGREGATIONS:
        raise ValueError(f"{source}: lora-aggregation={rule!r}; choose one of {', '.join(LORA_AGGREGATIONS)}")
    if rule == "exact" or cfg.strategy not in SCHEDULED_STRATEGIES:
        return  # fedavg and fedavg-lora ignore the key (full weights; FedIT by definition)
    if cfg.merge == "factors" and rule != "fedit":
        raise ValueError(
            f"{source}: lora-aggregation={rule!r} with merge='factors': merge=factors averages factors "
            "(FedIT) in rounds and merges; use merge='product' with this rule"
        )
    if rule == "fedsa":
        check_fedsa(cfg, source)
    if rule == "ffa" and cfg.aggregation != "mean":
        raise ValueError(
            f"{source}: lora-aggregation='ffa' with aggregation={cfg.aggregation!r}: a coordinate-wise "
            "median of the B_i is not one of the updates B_i A; use aggregation='mean'"
        )
    if rule == "fedex" and cfg.merge_gate != "none" and str(cfg.centralize_every).isdigit():
        raise ValueError(
            f"{source}: lora-aggregation='fedex' with merge-gate={cfg.merge_gate!r} and "
            f"centralize-every={cfg.centralize_every}: fedex puts each stage's residuals into the base "
            "without a committing merge, so the gate would not see them; use centralize-every=stage or round"
        )


def check_fedsa(cfg: RunConfig, source: str) -> None:
    """fedsa: every site keeps its own B and model; what needs one shared model or every site's B refuses."""
    why = {
        "strategy": (cfg.strategy == "local", "a local site shares nothing; fedsa shares A between sites"),
        "merge-gate": (
            cfg.merge_gate != "none",
            "the gate judges one shared base, and fedsa sites merge into bases of their own",
        ),
        "aggregation": (
            cfg.aggregation != "mean",
            "the robust rules judge whole updates, fedsa sends A only",
        ),
        "server-optimizer": (
            cfg.server_optimizer != "none",
            "the server holds no shared model to step (only the mean A)",
        ),
        "fraction-train": (
            cfg.fraction_train < 1,
            "every site must take part in every round to complete its own merges with the shared A",
        ),
    }
    for key, (refused, reason) in why.items():
        if refused:
            value = getattr(cfg, key.replace("-", "_"))
            raise ValueError(f"{source}: lora-aggregation='fedsa' with {key}={value!r}: {reason}")


def check_cl_method(cfg: RunConfig, source: str) -> None:
    """`cl-method` and its keys (cl_fed/clmethods), and the strategies each applies to."""
    method = cfg.cl_method
    if method not in CL_METHODS:
        raise ValueError(f"{source}: cl-method={method!r}; choose one of {', '.join(CL_METHODS)}")
    for key in ("ewc-lambda", "lwf-alpha", "olora-lambda"):
        value = getattr(cfg, key.replace("-", "_"))
        if not (value >= 0 and value < float("inf")):
            raise ValueError(f"{source}: {key}={value!r} must be a finite number >= 0")
    if not (cfg.lwf_temperature > 0 and cfg.lwf_temperature < float("inf")):
        raise ValueError(f"{source}: lwf-temperature={cfg.lwf_temperature!r} must be > 0")
    if not 0.0 <= cfg.ewc_decay <= 1.0:
        raise ValueError(f"{source}: ewc-decay={cfg.ewc_decay!r} must be in [0, 1]")
    for key in ("ewc-samples", "replay-per-stage"):
        if getattr(cfg, key.replace("-", "_")) < 1:
            raise ValueError(f"{source}: {key}={getattr(cfg, key.replace('-', '_'))!r} must be >= 1")
    if method == "ewc" and cfg.site_models:
        raise ValueError(
            f"{source}: cl-method='ewc' with strategy={cfg.strategy!r}"
            f"{' and lora-aggregation=' + repr(cfg.lora_aggregation) if cfg.strategy != 'local' else ''}: "
            "EWC's Fisher is averaged on the server and anchors one shared model, and these sites keep "
            "models of their own; use centralization (exact, fedex, fedit, ffa), fedavg or fedavg-lora"
        )
    if method == "ewc" and cfg.dp_noise:
        raise ValueError(
            f"{source}: cl-method='ewc' with dp-noise: the sites' Fisher estimates would leave them "
            "outside the accountant's view; use one of them"
        )
    if method == "olora" and cfg.lora_aggregation == "ffa" and cfg.merge == "product":
        raise ValueError(
            f"{source}: cl-method='olora' with lora-aggregation='ffa': ffa freezes every A at its random "
            "init, and O-LoRA's penalty acts on A, so it would do nothing; use another rule"
        )
    if method == "olora" and (cfg.strategy != "centralization" or cfg.site_models):
        why = (
            "it trains no adapter"
            if cfg.strategy == "fedavg"
            else "the sites merge on their own, so the server has no merged subspaces to send"
            if cfg.site_models
            else "its one adapter is never merged, so there are no earlier merged subspaces"
        )
        raise ValueError(
            f"{source}: cl-method='olora' keeps each stage's adapter orthogonal to the merged updates "
            f"of earlier stages, and strategy={cfg.strategy!r}"
            f"{' with lora-aggregation=' + repr(cfg.lora_aggregation) if cfg.site_models else ''}: "
            f"{why}; use strategy=centralization"
        )
