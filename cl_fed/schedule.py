"""When centralization merges adapters into the base.

`centralize-every` takes "round" (merge after every round), "stage" (after every stage, the
default), or an integer K: keep one adapter per stage in a pool and merge the pool's average
every K stages, as in the paper. K = 1 is the same as "stage".
"""

from dataclasses import dataclass

STRATEGIES = ("centralization", "fedavg", "fedavg-lora", "local")
LORA_STRATEGIES = ("centralization", "fedavg-lora", "local")


@dataclass(frozen=True)
class Schedule:
    unit: str  # "round" or "stage"
    every: int  # merge every `every` units (rounds: always 1)

    def merge_after_round(self) -> bool:
        return self.unit == "round"

    def merge_after_stage(self, stage_index: int) -> bool:
        """After finishing stage `stage_index` (0-based), is the pool merged into the base?"""
        return self.unit == "stage" and (stage_index + 1) % self.every == 0

    def to_dict(self) -> dict:
        return {"centralize_every": "round" if self.unit == "round" else self.every}


def parse_schedule(value, num_stages: int) -> Schedule:
    """Read a `centralize-every` value; the error names the value and what is allowed."""
    text = str(value).strip().lower()
    if text == "round":
        return Schedule("round", 1)
    if text == "stage":
        return Schedule("stage", 1)
    try:
        k = int(text)
    except ValueError:
        raise ValueError(
            f"centralize-every={value!r}: expected 'round', 'stage' or a whole number of stages"
        ) from None
    if k < 1:
        raise ValueError(f"centralize-every={value!r}: the number of stages must be >= 1")
    if num_stages % k != 0:
        raise ValueError(
            f"centralize-every={k} does not divide the {num_stages} stages of the scenario: "
            f"adapters left in the pool after the last stage would never be merged; "
            f"use one of {[d for d in range(1, num_stages + 1) if num_stages % d == 0]}"
        )
    return Schedule("stage", k)


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    return name
