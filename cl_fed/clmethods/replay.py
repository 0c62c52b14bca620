"""Experience replay: a reference that breaks the rehearsal-free rule on purpose.

A site keeps up to `replay-per-stage` of each stage's own training utterances in a buffer of its own
(the audio copied into the site's directory, so the buffer outlives the stage's data, as a real
site's would), and mixes all of it into every later stage's training. Nothing of it is ever sent:
only the site's update leaves, as without replay. Which rows a stage keeps is drawn from the run's
seed, the site and the stage, so a resumed or repeated run keeps the same ones.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

from cl_fed.data.utterance import Utterance
from cl_fed.io import atomic_write_json

INDEX = "buffer.json"


def choose(rows: list[Utterance], count: int, seed: int, site: str, stage: int) -> list[Utterance]:
    """`count` of a stage's rows (all if fewer), drawn from (seed, site, stage), in the rows' order."""
    if count >= len(rows):
        return list(rows)
    rng = random.Random(f"replay/{seed}/{site}/{stage}")
    chosen = set(rng.sample(range(len(rows)), count))
    return [u for i, u in enumerate(rows) if i in chosen]


class ReplayBuffer:
    """One site's buffer under `directory`: {stage index: the utterances it keeps}, persisted as JSON
    (atomically) with the audio files beside it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        raw = json.loads(index.read_text()) if index.is_file() else {}
        self.stages = {int(k): [Utterance(**u) for u in rows] for k, rows in raw.items()}

    def keep(self, stage: int, rows: list[Utterance]) -> None:
        """Keep `rows` of `stage` (once per stage: a stage's later rounds keep what its first kept)."""
        if stage in self.stages:
            return
        kept = []
        folder = self.directory / f"stage-{stage}"
        folder.mkdir(parents=True, exist_ok=True)
        for u in rows:
            target = folder / f"{len(kept):05d}{Path(u.audio).suffix}"
            shutil.copyfile(u.audio, target)
            kept.append(replace(u, audio=str(target.resolve())))
        self.stages[stage] = kept
        atomic_write_json(
            self.directory / INDEX, {str(k): [u.to_dict() for u in v] for k, v in sorted(self.stages.items())}
        )

    def before(self, stage: int) -> list[Utterance]:
        """Every kept utterance of the stages before `stage`, in stage order."""
        return [u for t in sorted(self.stages) if t < stage for u in self.stages[t]]
