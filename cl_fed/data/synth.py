"""Generate a scenario's speech into a content-addressed cache directory.

`generate(scenario)` returns `<cache_root()>/speech/<fingerprint[:16]>/` holding

    audio/<id>.flac   16 kHz mono PCM_16
    manifest.jsonl    one Utterance.to_dict() per line, `audio` relative to the dataset directory
    summary.json      scenario name and fingerprint, stage order, sites, and per split x stage x site
                      utterance counts and seconds (plus the resolved scenario)

The foundation data has stage "foundation" and site "". Each stage's test set has split "test" and
the site whose conditions produced the utterance; utterance i of it uses site i mod len(sites).

A dataset is built in a temporary directory next to its final place and renamed into place when
complete, so an interrupted run never leaves something that is later taken for a dataset; an
existing dataset is reused at once. Every utterance draws from its own RNGs, seeded from
(scenario seed, stage, site, split, index), so the files are byte-identical for any worker count.

    python -m cl_fed.data.synth --scenario default
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.transforms as AT

from cl_fed.data import espeak
from cl_fed.data.acoustics import apply_site_acoustics
from cl_fed.data.scenario import FOUNDATION, GENERATOR_VERSION, Conditions, Scenario, load_scenario
from cl_fed.data.text import CODE_SWITCHED, make_utterance
from cl_fed.data.utterance import Utterance
from cl_fed.io import file_lock
from cl_fed.paths import cache_root
from cl_fed.progress import Progress

SAMPLE_RATE = 16000
_MAX_DRAWS = 50  # redraws of an utterance longer than max_seconds before giving up
_TMP_PREFIX = ".tmp-"
_JOBS_PER_WORKER = 200  # below this many utterances per extra process, starting it costs more than it saves


@dataclass(frozen=True)
class _Job:
    id: str
    stage: str
    site: str
    split: str
    seed: int
    conditions: Conditions
    max_seconds: float


def utterance_seed(scenario_seed: int, stage: str, site: str, split: str, index: int) -> int:
    """The seed of one utterance's RNGs: a hash, so it does not depend on generation order."""
    digest = hashlib.sha256(f"{scenario_seed}/{stage}/{site}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def _jobs(scenario: Scenario) -> list[_Job]:
    jobs = []

    def add(
        stage: str, site: str, split: str, index: int, conditions: Conditions, seed: int = scenario.seed
    ) -> None:
        uid = (
            f"{stage}-{site}-{split}-{index:05d}"
            if site and split == "train"
            else f"{stage}-{split}-{index:05d}"
        )
        jobs.append(
            _Job(
                uid,
                stage,
                site,
                split,
                utterance_seed(seed, stage, site, split, index),
                conditions,
                scenario.max_seconds,
            )
        )

    foundation = scenario.foundation
    # a scenario's dataset holds its foundation's test rows (the base-domain column); the train rows
    # only pre-train the base, from the foundation's own dataset (cl_fed.models.foundation), so they
    # are generated only there: a scenario with stages then renders no pre-training speech
    splits = [("test", foundation.test_utterances)]
    if not scenario.stages:
        splits.insert(0, ("train", foundation.train_utterances))
    for split, count in splits:
        for i in range(count):
            add(FOUNDATION, "", split, i, foundation.conditions, foundation.data_seed(scenario.seed))
    for stage in scenario.stages:
        for site, conditions in stage.sites.items():
            for i in range(conditions.train_utterances):
                add(stage.name, site, "train", i, conditions)
        for i in range(stage.test_utterances):
            site = scenario.sites[i % len(scenario.sites)]
            add(stage.name, site, "test", i, stage.sites[site])
    return jobs


@lru_cache(maxsize=1)
def _resampler() -> AT.Resample:
    return AT.Resample(espeak.ENGINE_SAMPLE_RATE, SAMPLE_RATE)  # the kernel is computed once per process


def _speak(rng: random.Random, conditions: Conditions) -> tuple[torch.Tensor, str, str, str]:
    """Draw language, text and voice; return (16 kHz clean wave, transcript, language, speaker)."""
    language = rng.choice(conditions.languages)
    segments = make_utterance(rng, language, rng.choice(conditions.domain))
    matrix = language.split("-")[0]
    voice = rng.choice(conditions.voices[matrix])
    variant = rng.choice(conditions.variants)
    rate, pitch = rng.randint(*conditions.rate), rng.randint(*conditions.pitch)
    if language in CODE_SWITCHED:
        english = rng.choice(conditions.voices["en"])
        ssml = espeak.build_ssml([(voice if lang == matrix else english, text) for lang, text in segments])
        samples = espeak.synthesize(ssml, voice, variant, rate, pitch, ssml=True)
    else:
        samples = espeak.synthesize(segments[0][1], voice, variant, rate, pitch)
    wave = _resampler()(torch.from_numpy(samples))
    return wave, " ".join(text for _, text in segments), language, f"{voice}+{variant}"


def _render(job: _Job, out_dir: Path) -> dict:
    """Synthesise one utterance into out_dir/audio and return its manifest record."""
    rng = random.Random(job.seed)
    for _ in range(_MAX_DRAWS):
        wave, text, language, speaker = _speak(rng, job.conditions)
        if 0 < wave.numel() <= job.max_seconds * SAMPLE_RATE:  # acoustics keep the length
            break
    else:
        raise RuntimeError(
            f"utterance {job.id}: no draw in {_MAX_DRAWS} came out at most {job.max_seconds} s long; "
            "raise max_seconds or speak faster (rate)"
        )
    wave = apply_site_acoustics(wave, SAMPLE_RATE, job.conditions, torch.Generator().manual_seed(job.seed))
    relative = f"audio/{job.id}.flac"
    sf.write(out_dir / relative, wave.numpy(), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return Utterance(
        id=job.id,
        audio=relative,
        text=text,
        site=job.site,
        stage=job.stage,
        split=job.split,
        speaker=speaker,
        language=language,
        seconds=round(wave.numel() / SAMPLE_RATE, 4),
    ).to_dict()


def _init_worker() -> None:
    torch.set_num_threads(
        1
    )  # one process per core; also keeps float results identical to the in-process path


def plan_workers(num_utterances: int, workers: int | None = None) -> int:
    """Processes `generate` uses: `workers` if given (at most one per utterance), else the usable
    cores but no more than one per _JOBS_PER_WORKER utterances (1 = in-process)."""
    if workers is not None:
        return max(1, min(workers, num_utterances))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, num_utterances // _JOBS_PER_WORKER))


def count_utterances(scenario: Scenario) -> int:
    return len(_jobs(scenario))


def _render_all(jobs: list[_Job], out_dir: Path, workers: int, progress: bool) -> list[dict]:
    start = time.perf_counter()
    bar = Progress(len(jobs), "synthesising", "utt", enabled=progress)
    try:
        records = _render_jobs(jobs, out_dir, workers, bar)
    finally:
        bar.close()
    minutes = sum(r["seconds"] for r in records) / 60
    bar.line(
        f"[cl-fed] synthesised {len(records)} utterances ({minutes:.1f} min of speech) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return records


def _render_jobs(jobs: list[_Job], out_dir: Path, workers: int, bar: Progress) -> list[dict]:
    render = partial(_render, out_dir=out_dir)
    if workers <= 1 or multiprocessing.current_process().daemon:  # daemonic processes may not have children
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return list(bar.track(map(render, jobs)))
        finally:
            torch.set_num_threads(threads)
    # spawn, not fork: the caller may hold torch thread pools or the espeak lock,
    # which fork would copy mid-use
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        return list(bar.track(pool.imap(render, jobs, chunksize=4)))


def _summary(scenario: Scenario, fingerprint: str, records: list[dict]) -> dict:
    counts: dict = {}
    for r in records:
        cell = (
            counts.setdefault(r["split"], {})
            .setdefault(r["stage"], {})
            .setdefault(r["site"], {"utterances": 0, "seconds": 0.0})
        )
        cell["utterances"] += 1
        cell["seconds"] = round(cell["seconds"] + r["seconds"], 4)
    return {
        "name": scenario.name,
        "fingerprint": fingerprint,
        "generator_version": GENERATOR_VERSION,
        "espeak": espeak.engine_version(),
        "sample_rate": SAMPLE_RATE,
        "stages": [s.name for s in scenario.stages],
        "sites": list(scenario.sites),
        "total_utterances": len(records),
        "total_seconds": round(sum(r["seconds"] for r in records), 4),
        "counts": counts,
        "scenario": scenario.to_dict(),
    }


def _existing(final: Path, fingerprint: str) -> bool:
    summary = final / "summary.json"
    if not final.exists():
        return False
    if not summary.is_file():
        raise RuntimeError(
            f"{final} exists but has no summary.json, so it is not a complete dataset; delete it"
        )
    found = json.loads(summary.read_text(encoding="utf-8")).get("fingerprint")
    if found != fingerprint:
        raise RuntimeError(f"{final} holds dataset {found}, not {fingerprint} (prefix collision); delete it")
    return True


def generate(
    scenario: Scenario | str | Path,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate (or reuse) the scenario's dataset; returns its directory.

    `scenario` may also be a packaged name or a path. `workers` defaults to the usable cores,
    but small scenarios are generated in-process, where starting worker processes costs more than
    it saves. The result does not depend on `workers`. Workers are spawned, so a script that calls
    this with workers > 1 needs Python's `if __name__ == "__main__":` guard: without it each worker
    re-runs the script, calls `generate` again and waits forever on the lock its parent holds.
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    fingerprint = scenario.fingerprint()
    speech = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    speech = speech / "speech"
    final = speech / fingerprint[:16]
    if _existing(final, fingerprint):
        return final
    speech.mkdir(parents=True, exist_ok=True)
    with file_lock(speech / f".{fingerprint[:16]}.lock"):
        if _existing(final, fingerprint):  # another process finished it while we waited
            return final
        for stale in speech.glob(f"{_TMP_PREFIX}{fingerprint[:16]}-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        jobs = _jobs(scenario)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{fingerprint[:16]}-", dir=speech))
        try:
            (tmp / "audio").mkdir()
            records = _render_all(jobs, tmp, plan_workers(len(jobs), workers), progress)
            with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            summary = _summary(scenario, fingerprint, records)
            summary_text = json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
            (tmp / "summary.json").write_text(summary_text, encoding="utf-8")
            tmp.chmod(0o755)  # mkdtemp made it private; the dataset is an ordinary shared cache entry
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def describe(dataset_dir: str | Path) -> str:
    """A readable table of a generated dataset: utterances and hours per site x stage, per split."""
    dataset_dir = Path(dataset_dir)
    summary = json.loads((dataset_dir / "summary.json").read_text(encoding="utf-8"))
    columns = [FOUNDATION] + summary["stages"]
    rows = summary["sites"] + [""]
    width = max(14, *(len(c) + 2 for c in columns))
    lines = [
        f"scenario {summary['name']}  fingerprint {summary['fingerprint'][:16]}  "
        f"{summary['total_utterances']} utterances, {summary['total_seconds'] / 3600:.2f} h",
        f"at {dataset_dir}",
    ]
    for split in ("train", "test"):
        table = summary["counts"].get(split, {})
        lines.append("")
        lines.append(f"{split + ' (utts / hours)':<22}" + "".join(f"{c:>{width}}" for c in columns))
        for site in rows:
            cells = []
            for stage in columns:
                cell = table.get(stage, {}).get(site)
                cells.append(f"{cell['utterances']} / {cell['seconds'] / 3600:.2f}" if cell else "-")
            if any(c != "-" for c in cells):
                lines.append(f"  {site or '(all sites)':<20}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Generate a synthetic factory-speech scenario into the cache."
    )
    parser.add_argument("--scenario", default="default", help="packaged name (default, tiny) or a YAML path")
    parser.add_argument("--cache-dir", default=None, help="cache root (default: cl_fed.paths.cache_root())")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: usable cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    path = generate(
        args.scenario, cache_dir=args.cache_dir, workers=args.workers, progress=not args.no_progress
    )
    print(describe(path))
    print(f"\ndataset: {path}")


if __name__ == "__main__":
    main()
