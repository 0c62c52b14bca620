"""The embedded base model: `tiny-fastconformer-ctc` pre-trained on a scenario's foundation data.

The base plays the part of a pretrained checkpoint (Whisper, Parakeet): it depends on the scenario's
`foundation` section only (and the scenario seed), never on a run's seed or on the stages, so every
run and every scenario with the same foundation starts from the same base.

`foundation_base(scenario)` returns its directory: a committed base shipped in `cl_fed/models/bases/`
when one matches, else one trained once (centralised, on 2 CPU cores) and cached under
`<cache root>/bases/<key>/`. The key hashes everything that decides the result: the foundation
data's fingerprint, the model and feature configuration, the training configuration, the seed and
FOUNDATION_VERSION. The directory loads with `cl_fed.models.load_model` and holds `foundation.json`
(key, configs, WER/CER on the foundation test split, wall seconds).

Regenerate the committed base of the default scenario (about 25 min on 2 cores):

    python -m cl_fed.models.foundation --scenario default --commit
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from cl_fed.data.manifest import load_manifest
from cl_fed.data.scenario import FOUNDATION, Scenario, load_scenario
from cl_fed.data.synth import generate
from cl_fed.evaluate import evaluate
from cl_fed.io import file_lock
from cl_fed.models.tiny import ENCODER_CONFIG, FEATURE_CONFIG, NAME, build_tiny
from cl_fed.paths import cache_root, project_root
from cl_fed.train import FeatureCache, TrainConfig, train_local

FOUNDATION_VERSION = 3  # bump when training code changes what a cached base would contain
INFO_FILE = "foundation.json"


def _committed_dir() -> Path:
    """Where the regenerable bases shipped with the code are: in the checkout cl-fed is installed
    from (Flower runs the apps from a copy of the app that leaves binary files out), else beside
    this file (an installed wheel, whose package data holds them)."""
    root = project_root()
    if root is not None and (root / "cl_fed" / "models").is_dir():
        return root / "cl_fed" / "models" / "bases"
    return Path(__file__).resolve().parent / "bases"


COMMITTED = _committed_dir()
# For the default scenario's 4,800 three-language foundation utterances (~4 h of speech). Cosine decay
# anneals to a sharper optimum than inverse-sqrt in a fixed budget.
FOUNDATION_TRAIN = TrainConfig(
    epochs=8,
    batch_size=16,
    lr=2e-3,
    warmup=0.1,
    schedule="cosine",
    weight_decay=0.01,
    grad_clip=1.0,
    spec_augment=True,
)


def foundation_scenario(scenario: Scenario) -> Scenario:
    """The scenario's foundation alone, as a scenario to generate: its data (seeded by the foundation's
    seed, else the scenario's; independent of stages and sites) and fingerprint are shared by every
    scenario with the same foundation section."""
    seed = scenario.foundation.data_seed(scenario.seed)
    foundation = dataclasses.replace(scenario.foundation, seed=None)
    return dataclasses.replace(
        scenario,
        name=FOUNDATION,
        seed=seed,
        sites=(),
        stages=(),
        foundation=foundation,
        source=scenario.source,
    )


def foundation_key(scenario: Scenario, train_config: TrainConfig, seed: int | None = None) -> str:
    config = {k: v for k, v in dataclasses.asdict(train_config).items() if k != "progress"}
    if config["accumulate"] == 1:  # added after the committed bases; 1 computes what they were made with
        del config["accumulate"]
    if config["proximal_mu"] == 0.0:  # likewise (issue 15's FedProx term; 0 = off)
        del config["proximal_mu"]
    payload = {
        "version": FOUNDATION_VERSION,
        "dataset": foundation_scenario(scenario).fingerprint(),
        "model": {"name": NAME, "encoder": ENCODER_CONFIG, "features": FEATURE_CONFIG},
        "train": config,
        "seed": scenario.foundation.data_seed(scenario.seed) if seed is None else seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def base_key(scenario: Scenario, seed: int | None = None, train_config: TrainConfig | None = None) -> str:
    """The key of the base that foundation_base returns for `scenario` (same defaults)."""
    seed = scenario.foundation.data_seed(scenario.seed) if seed is None else seed
    return foundation_key(scenario, dataclasses.replace(train_config or FOUNDATION_TRAIN, seed=seed), seed)


def foundation_base(
    scenario: Scenario | str | os.PathLike,
    *,
    seed: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    train_config: TrainConfig | None = None,
    committed: bool = True,
) -> Path:
    """Directory of the pre-trained embedded base for `scenario` (trained on first use, then cached).

    `seed` (default: the foundation's seed, else the scenario's) seeds the initial weights and the
    training order.
    `cache_dir` replaces `cl_fed.paths.cache_root()` for both the speech data and the bases.
    `committed=False` ignores the shipped bases (to regenerate one).
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    if not (scenario.foundation.train_utterances and scenario.foundation.test_utterances):
        raise ValueError(
            f"scenario {scenario.name!r} ({scenario.source}): foundation needs train and test utterances, "
            f"got {scenario.foundation.train_utterances} train and {scenario.foundation.test_utterances} test"
        )
    seed = scenario.foundation.data_seed(scenario.seed) if seed is None else seed
    train_config = dataclasses.replace(train_config or FOUNDATION_TRAIN, seed=seed, progress=progress)
    key = base_key(scenario, seed, train_config)
    shipped = committed_base(key) if committed else None
    if shipped is not None:
        return shipped
    root = (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / "bases"
    final = root / key[:16]
    if (final / INFO_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{key[:16]}.lock"):  # parallel clients wait for one trainer
        if (final / INFO_FILE).is_file():
            return final
        if final.exists():  # no foundation.json: not a finished base
            shutil.rmtree(final)
        dataset = generate(foundation_scenario(scenario), cache_dir=cache_dir, progress=progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=root))
        try:
            info = _train(scenario, dataset, train_config, seed, tmp)
            info["key"] = key
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def committed_base(key: str) -> Path | None:
    """The shipped base with this key, if there is one."""
    path = COMMITTED / key[:16]
    info = path / INFO_FILE
    if (
        info.is_file()
        and (path / "model.safetensors").is_file()
        and json.loads(info.read_text())["key"] == key
    ):
        return path
    return None


def _train(scenario: Scenario, dataset: Path, config: TrainConfig, seed: int, out: Path) -> dict:
    start = time.perf_counter()
    speech = build_tiny(seed=seed)
    utterances, _ = load_manifest(dataset / "manifest.jsonl", vocab=set(speech.vocab.characters))
    train = [u for u in utterances if u.stage == FOUNDATION and u.split == "train"]
    test = [u for u in utterances if u.stage == FOUNDATION and u.split == "test"]
    if not train or not test:
        raise ValueError(
            f"scenario {scenario.name!r} ({scenario.source}): foundation needs train and test utterances, "
            f"got {len(train)} train and {len(test)} test"
        )
    cache = FeatureCache()  # private: these features are not needed after pre-training
    result = train_local(speech, train, config, cache=cache)
    scores = evaluate(speech, test, cache=cache)
    speech.save(out)
    tail = result.step_losses[-max(1, min(20, result.steps // 10)) :] or [float("nan")]
    return {
        "model": NAME,
        "scenario": scenario.name,
        "dataset": dataset.name,
        "seed": seed,
        "version": FOUNDATION_VERSION,
        "train_config": dataclasses.asdict(config),
        "train_utterances": len(train),
        "train_audio_hours": round(sum(u.seconds for u in train) / 3600, 3),
        "test_utterances": len(test),
        "steps": result.steps,
        "first_train_loss": round(result.step_losses[0], 4) if result.step_losses else float("nan"),
        "final_train_loss": round(sum(tail) / len(tail), 4),  # mean over the last 10% of steps (<= 20)
        "wer": scores["wer"],
        "cer": scores["cer"],
        "train_seconds": round(result.wall_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cl_fed.models.foundation",
        description="Train (or find) a scenario's foundation base and print its foundation.json.",
    )
    parser.add_argument("--scenario", default="default", help="packaged name or scenario YAML")
    parser.add_argument(
        "--commit",
        action="store_true",
        help="train it ignoring the committed bases (a cached one made by the same recipe is reused) "
        f"and copy it into {COMMITTED}",
    )
    parser.add_argument("--cache-dir", default=None, help="default: the project's .cache/")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
    except (OSError, ValueError) as error:  # one line, naming the file and key
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.commit:
        path = foundation_base(scenario, cache_dir=args.cache_dir)
        print((path / INFO_FILE).read_text(), end="")
        print(f"[foundation] {path}")
        return 0
    path = foundation_base(scenario, cache_dir=args.cache_dir, committed=False)
    target = COMMITTED / path.name
    if target.exists():
        shutil.rmtree(target)
    COMMITTED.mkdir(parents=True, exist_ok=True)
    shutil.copytree(path, target)
    target.chmod(0o755)  # the cached base was written through a private temporary directory
    for file in target.iterdir():
        file.chmod(0o644)
    print((target / INFO_FILE).read_text(), end="")
    print(f"[foundation] committed {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
