"""The continual plan: the ordered steps of a run, decided once from the run config.

    continual_plan(cfg, stages) -> [Train, Aggregate, (Merge), ..., Evaluate, Checkpoint, ...]

The single-site runner (cl_fed/run.py), the ServerApp (server/server_app.py) and, for the `local`
strategy, each site (clients/client_app.py) walk this same list; nothing else decides when to
merge, which seed a round uses or what a site starts from. Pure: no model, no Flower.

Per strategy, for stage t and round r of R (K = centralize-every in stages):

    centralization, local  Train(start fresh at r = 0, else continue from the aggregate)
                           Aggregate(lora-aggregation for merge=product, fedit for merge=factors)
                           schedule "round": Merge(commit) after every round, each round fresh
                           else after the stage's last round: Merge, committed every K stages
    fedavg-lora            one adapter for the whole run, FedIT-averaged, never merged
    fedavg                 full fine-tuning, the weights averaged every round

after every stage: Evaluate(stage) and a Checkpoint; a Checkpoint also follows every round.
`local` runs the centralization plan at every site on its own data (its aggregate is itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from cl_fed.config import RunConfig

SPANS = ("stage", "round")


@dataclass(frozen=True)
class Train:
    stage: int
    round: int
    server_round: int  # 1-based, over the whole run (Flower's numbering)
    seed: int  # the round's seed: a fresh adapter's init, batch order, SpecAugment, dropout
    start: str  # "fresh" adapter | "continue" from the last aggregate | "full" (fine-tune all weights)
    span_index: int  # this round's place in its LR schedule span (lr-span) ...
    span_rounds: int  # ... which is this many rounds long


@dataclass(frozen=True)
class Aggregate:
    stage: int
    round: int
    rule: str  # cl_fed.aggregation.RULES


@dataclass(frozen=True)
class Merge:
    """The current adapter (with its folded residuals) becomes one chunk of the pool; `commit`
    merges the pool's average into the base. Either way the next Train starts fresh.
    `residual_to_base` (lora-aggregation=fedex): the folded residuals go into the base at once and
    only the adapter joins the pool."""

    stage: int
    round: int
    commit: bool
    residual_to_base: bool = False


@dataclass(frozen=True)
class Evaluate:
    stage: int
    label: str  # the stage just trained


@dataclass(frozen=True)
class Checkpoint:
    stage: int
    round: int


Step = Train | Aggregate | Merge | Evaluate | Checkpoint


def round_seed(seed: int, stage: int, round_index: int) -> int:
    """One seed per (run seed, stage, round): every site starts the round's adapter identically."""
    return seed * 1_000_003 + stage * 1_009 + round_index


def rule_for(cfg: RunConfig) -> str:
    if cfg.strategy == "fedavg":
        return "weights"
    if cfg.strategy == "fedavg-lora":
        return "fedit"
    return cfg.lora_aggregation if cfg.merge == "product" else "fedit"


def adapter_seed(plan: list[Step], step: Train) -> int:
    """The seed of the fresh adapter that `step` trains on: its own, or that of the Train step that
    started the adapter it continues (an ffa site draws the frozen A it is not sent from it)."""
    index = plan.index(step)
    for earlier in reversed(plan[: index + 1]):
        if isinstance(earlier, Train) and earlier.start == "fresh":
            return earlier.seed
    raise ValueError(f"adapter_seed: round {step.server_round} continues no fresh adapter of the plan")


def continual_plan(cfg: RunConfig, stages: list[str]) -> list[Step]:
    if not stages:
        raise ValueError("continual_plan: no stages")
    schedule = cfg.schedule(len(stages))
    rounds, rule = cfg.rounds_per_stage, rule_for(cfg)
    scheduled = cfg.strategy in ("centralization", "local")
    steps: list[Step] = []
    server_round = 0
    for t, name in enumerate(stages):
        for r in range(rounds):
            server_round += 1
            if cfg.strategy == "fedavg":
                start = "full"
            elif cfg.strategy == "fedavg-lora":
                start = "fresh" if server_round == 1 else "continue"
            else:
                start = "fresh" if r == 0 or schedule.merge_after_round() else "continue"
            index, span = (r, rounds) if cfg.lr_span == "stage" else (0, 1)
            seed = round_seed(cfg.seed, t, r)
            steps.append(Train(t, r, server_round, seed, start, index, span))
            steps.append(Aggregate(t, r, rule))
            to_base = rule == "fedex"
            if scheduled and schedule.merge_after_round():
                steps.append(Merge(t, r, commit=True, residual_to_base=to_base))
            elif scheduled and r == rounds - 1:
                steps.append(Merge(t, r, commit=schedule.merge_after_stage(t), residual_to_base=to_base))
            if r < rounds - 1:
                steps.append(Checkpoint(t, r))
        steps.append(Evaluate(t, name))
        steps.append(Checkpoint(t, rounds - 1))
    return steps


def steps_after(plan: list[Step], train: Train) -> list[Step]:
    """The Aggregate and Merge steps that follow `train` (what a `local` site applies to itself)."""
    index = plan.index(train)
    out = []
    for step in plan[index + 1 :]:
        if not isinstance(step, (Aggregate, Merge)):
            break
        out.append(step)
    return out
