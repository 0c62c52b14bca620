"""Synthesis throughput: seconds of audio generated per wall-clock second.

Generates a scenario (scaled to about --utterances utterances, keeping its proportions) into a
fresh temporary cache, so nothing is reused; the time includes worker start-up, espeak, resampling,
site acoustics and FLAC writing.

    python -m benchmarks.synthesis [--scenario tiny|default|path] [--utterances N] [--workers W]
"""

import argparse
import dataclasses
import json
import tempfile
import time

from cl_fed.data import synth
from cl_fed.data.scenario import Scenario, load_scenario


def scaled(scenario: Scenario, utterances: int) -> Scenario:
    """The scenario with every utterance count multiplied by utterances / its total (rounded)."""
    factor = utterances / synth.count_utterances(scenario)

    def scale(n: int) -> int:
        return round(n * factor)

    foundation = dataclasses.replace(
        scenario.foundation,
        train_utterances=scale(scenario.foundation.train_utterances),
        test_utterances=scale(scenario.foundation.test_utterances),
    )
    stages = tuple(
        dataclasses.replace(
            stage,
            test_utterances=scale(stage.test_utterances),
            sites={
                site: dataclasses.replace(c, train_utterances=scale(c.train_utterances))
                for site, c in stage.sites.items()
            },
        )
        for stage in scenario.stages
    )
    return dataclasses.replace(scenario, foundation=foundation, stages=stages)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default", help="packaged name or YAML path (default: default)")
    parser.add_argument(
        "--utterances", type=int, default=600, help="about this many utterances (default 600; 0 = all)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: as generate decides)"
    )
    args = parser.parse_args(argv)

    scenario = load_scenario(args.scenario)
    if args.utterances:
        scenario = scaled(scenario, args.utterances)
    total = synth.count_utterances(scenario)
    workers = synth.plan_workers(total, args.workers)
    with tempfile.TemporaryDirectory(prefix="cl-fed-bench-") as cache:
        start = time.perf_counter()
        dataset = synth.generate(scenario, cache_dir=cache, workers=args.workers, progress=False)
        wall = time.perf_counter() - start
        audio = json.loads((dataset / "summary.json").read_text())["total_seconds"]
    print(f"scenario {scenario.name}: {total} utterances, {audio:.1f} s of audio ({audio / 3600:.3f} h)")
    print(f"workers {workers}, wall {wall:.1f} s")
    print(f"throughput {audio / wall:.1f} s of audio per wall second ({audio / wall:.0f}x real time)")


if __name__ == "__main__":
    main()
