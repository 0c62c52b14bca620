"""The site x stage stream: which site trains on what at each stage, without ever seeing old stages again.

Each site (a federated client) receives one chunk of new training data per stage. The setting is
rehearsal-free: `SiteStream.enter(t)` hands a site its stage-t train rows only, drops its earlier
stages' rows, and refuses to go back. Test sets of every stage stay available through
`StageStream.test`, because forgetting is measured on all of them after each stage.

Rows of the stage named `foundation` are pre-training data: kept out of the stream and reachable
through `StageStream.foundation(split)`. A site with no rows in some stage trains on nothing there
(`enter` returns []); every site must have train rows in at least one stage, every stage test rows.

Validation rows (merge gates, cl_fed/gate.py) are the one exception to "no old data": a small share of
each site's rows of every stage, `validation_split`, held out of its training and never trained on,
kept to score merges on; `StageStream.validation` serves them for any stage.
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cl_fed.data.manifest import LoadSummary, load_manifest
from cl_fed.data.utterance import Utterance

FOUNDATION = "foundation"


class StreamError(ValueError):
    """A stream that cannot be built as asked, or a rehearsal-free access that is not allowed."""


class SiteStream:
    """One site's view of the stream: its train rows, one stage at a time, never backwards.

    Entering the current stage again returns the same rows (several federated rounds per stage);
    entering a later stage releases the rows of every stage before it.
    """

    def __init__(self, site: str, stages: list[str], train_by_stage: dict[str, list[Utterance]]):
        self.site = site
        self.stages = list(stages)
        self._train = {stage: list(train_by_stage.get(stage, [])) for stage in self.stages}
        self.current: int | None = None  # index of the stage entered last, None before the first

    def enter(self, stage_index: int) -> list[Utterance]:
        """This site's train rows for stage `stage_index` (0-based); [] if it has none there."""
        if not 0 <= stage_index < len(self.stages):
            raise StreamError(
                f"site {self.site!r}: stage index {stage_index} out of range 0..{len(self.stages) - 1}"
            )
        if self.current is not None and stage_index < self.current:
            raise StreamError(
                f"site {self.site!r} is at stage {self.current} ({self.stages[self.current]!r}) "
                f"and cannot go back to stage {stage_index} ({self.stages[stage_index]!r}): "
                "the stream is rehearsal-free"
            )
        for stage in self.stages[:stage_index]:
            self._train.pop(stage, None)  # released: a site never gets old stage data back
        self.current = stage_index
        return list(self._train[self.stages[stage_index]])


def validation_split(rows: list[Utterance], share: float) -> tuple[list[Utterance], list[Utterance]]:
    """(train rows, validation rows) of one site's stage: the `share` of the rows whose ids hash lowest
    (at least one of two or more rows), so server and site carve the same rows, whatever their order."""
    count = max(1, round(share * len(rows))) if len(rows) >= 2 else 0
    ranked = sorted(rows, key=lambda u: hashlib.sha256(u.id.encode("utf-8")).hexdigest())
    held = {u.id for u in ranked[:count]}
    return [u for u in rows if u.id not in held], [u for u in rows if u.id in held]


class StageStream:
    """All sites' train rows and every stage's test rows, in stage order."""

    def __init__(
        self,
        utterances: Iterable[Utterance],
        stages: list[str] | None = None,
        sites: list[str] | None = None,
        *,
        source: str = "utterances",
        load_summary: LoadSummary | None = None,
    ):
        """`stages`: order of the stream (default: order of first appearance); `sites` (default: all
        sites with train rows, sorted). Rows of stages or sites not listed are left out."""
        rows = list(utterances)
        self._rows = rows
        self.source = source
        self.load_summary = load_summary
        self._foundation = [u for u in rows if u.stage == FOUNDATION]
        rows = [u for u in rows if u.stage != FOUNDATION]
        unstaged = [u.id for u in rows if not u.stage]
        if unstaged:
            raise StreamError(
                f"{source}: {len(unstaged)} row(s) have no stage (first: {unstaged[0]!r}); "
                "give every row a stage, e.g. defaults={'stage': 'stage1'}"
            )
        present = list(dict.fromkeys(u.stage for u in rows))
        self.stages = self._pick_stages(stages, present)
        rows = [u for u in rows if u.stage in self.stages]

        train = [u for u in rows if u.split == "train"]
        sites_in_data = sorted({u.site for u in train})
        if sites is None:
            if "" in sites_in_data:
                raise StreamError(
                    f"{source}: train rows without a site "
                    f"(e.g. {next(u.id for u in train if not u.site)!r}); "
                    "give every train row a site, e.g. defaults={'site': 'site0'}"
                )
            sites = sites_in_data
        self.sites = list(sites)
        if not self.sites:
            raise StreamError(f"{source}: no train rows in stages {self.stages}")
        idle = [site for site in self.sites if site not in sites_in_data]
        if idle:
            raise StreamError(f"{source}: site(s) {idle} have no train rows in any stage {self.stages}")

        self._train = {(site, stage): [] for site in self.sites for stage in self.stages}
        for u in train:
            if u.site in self.sites:
                self._train[(u.site, u.stage)].append(u)
        self._test = {
            stage: [u for u in rows if u.split == "test" and u.stage == stage] for stage in self.stages
        }
        untested = [stage for stage, test in self._test.items() if not test]
        if untested:
            raise StreamError(
                f"{source}: stage(s) {untested} have no test rows; every stage needs a test set"
            )

    def with_sites(self, sites: list[str]) -> "StageStream":
        """The same stream restricted to these sites (test sets unchanged)."""
        return StageStream(self._rows, self.stages, sites, source=self.source, load_summary=self.load_summary)

    def _pick_stages(self, stages: list[str] | None, present: list[str]) -> list[str]:
        if stages is None:
            if not present:
                raise StreamError(f"{self.source}: no rows outside the {FOUNDATION!r} stage")
            return present
        stages = list(stages)
        if FOUNDATION in stages:
            raise StreamError(
                f"{self.source}: {FOUNDATION!r} is pre-training data, not a stage of the stream"
            )
        if len(set(stages)) != len(stages):
            raise StreamError(f"{self.source}: stages {stages} list a stage twice")
        unknown = [stage for stage in stages if stage not in present]
        if unknown:
            raise StreamError(f"{self.source}: unknown stage(s) {unknown}; the data has stages {present}")
        if not stages:
            raise StreamError(f"{self.source}: empty stage list")
        return stages

    def _stage_name(self, stage: str | int) -> str:
        if isinstance(stage, int):
            if not 0 <= stage < len(self.stages):
                raise StreamError(f"stage index {stage} out of range 0..{len(self.stages) - 1}")
            return self.stages[stage]
        if stage not in self.stages:
            raise StreamError(f"unknown stage {stage!r}; stages are {self.stages}")
        return stage

    def _site_name(self, site: str) -> str:
        if site not in self.sites:
            raise StreamError(f"unknown site {site!r}; sites are {self.sites}")
        return site

    def site(self, site: str) -> SiteStream:
        """A fresh rehearsal-free view of one site's train rows."""
        name = self._site_name(site)
        return SiteStream(name, self.stages, {stage: self._train[(name, stage)] for stage in self.stages})

    def test(self, stage: str | int, site: str | None = None) -> list[Utterance]:
        """Test rows of one stage: all of them (site=None), or only those tagged with `site`."""
        rows = self._test[self._stage_name(stage)]
        return list(rows) if site is None else [u for u in rows if u.site == site]

    def validation(self, stage: str | int, share: float, site: str | None = None) -> list[Utterance]:
        """Validation rows of one stage (validation_split of each site's rows): every site's, or one's."""
        name = self._stage_name(stage)
        sites = self.sites if site is None else [self._site_name(site)]
        return [u for s in sites for u in validation_split(self._train[(s, name)], share)[1]]

    def num_train(self, site: str, stage: str | int) -> int:
        return len(self._train[(self._site_name(site), self._stage_name(stage))])

    def foundation(self, split: str = "train") -> list[Utterance]:
        """Rows of the `foundation` (pre-training) stage with this split."""
        if split not in ("train", "test"):
            raise StreamError(f"unknown split {split!r} (expected 'train' or 'test')")
        return [u for u in self._foundation if u.split == split]

    def describe(self) -> str:
        """A table: train rows per site x stage, then test rows per stage (and foundation rows if any)."""
        corner = "site \\ stage"
        labels = [*self.sites, "test (all)"]
        body = [[self.num_train(site, stage) for stage in self.stages] for site in self.sites]
        body.append([len(self._test[stage]) for stage in self.stages])
        label_width = max(len(corner), *(len(label) for label in labels))
        widths = [max(len(stage), *(len(str(row[i])) for row in body)) for i, stage in enumerate(self.stages)]
        lines = [f"{corner:<{label_width}}  " + "  ".join(f"{s:>{w}}" for s, w in zip(self.stages, widths))]
        for label, row in zip(labels, body):
            lines.append(f"{label:<{label_width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(row, widths)))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        if self._foundation:
            counts = f"{len(self.foundation('train'))} train, {len(self.foundation('test'))} test rows"
            lines.append(f"{FOUNDATION}: {counts}")
        return "\n".join(lines)

    @classmethod
    def from_manifest(
        cls,
        path: str | Path,
        stages: list[str] | None = None,
        sites: list[str] | None = None,
        **manifest_kwargs: Any,
    ) -> "StageStream":
        """A stream from a user manifest.

        Keyword arguments go to `load_manifest` (vocab, max_seconds, ...).
        """
        utterances, summary = load_manifest(path, **manifest_kwargs)
        return cls(utterances, stages, sites, source=str(path), load_summary=summary)

    @classmethod
    def from_dataset_dir(cls, path: str | Path, **manifest_kwargs: Any) -> "StageStream":
        """A stream from a generated dataset folder.

        Reads manifest.jsonl, and summary.json for stage order and sites.
        """
        folder = Path(path).expanduser().absolute()
        summary_path = folder / "summary.json"
        if not summary_path.is_file():
            raise StreamError(f"{summary_path}: not found; is {folder} a generated dataset folder?")
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise StreamError(f"{summary_path}: malformed JSON ({err})") from None
        for key in ("stages", "sites"):
            if not isinstance(summary.get(key), list) or not summary[key]:
                raise StreamError(f"{summary_path}: needs a non-empty list {key!r}, got {summary.get(key)!r}")
        stages = [str(stage) for stage in summary["stages"] if stage != FOUNDATION]
        utterances, load_summary = load_manifest(folder / "manifest.jsonl", **manifest_kwargs)
        sites = [str(site) for site in summary["sites"]]
        return cls(utterances, stages, sites, source=str(folder), load_summary=load_summary)
