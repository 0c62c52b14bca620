"""The quality benchmark's own code: paired statistics, the t quantile, which failures are retried,
configuration names, and the CSV/MD written from results.json files (no Flower runs here)."""

import csv
import json
import math
import time
from pathlib import Path

import pytest

from simulations import quality
from simulations.quality import (
    config_name,
    paired_stats,
    render_table,
    row_config,
    select_rows,
    t_quantile,
    verdict,
    write_results,
)
from simulations.report import group_runs, load_runs, table_csv
from simulations.sweep import infrastructure_failure, run_with_retries

# ---- statistics -----------------------------------------------------------------------------------


def test_t_quantile_table_and_beyond():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(30) == pytest.approx(2.0423, abs=1e-4)
    # past the table: the expansion, against scipy.stats.t.ppf(0.975, df) (scipy is not a dependency)
    exact = {31: 2.039513, 45: 2.014103, 60: 2.000298, 100: 1.983972, 120: 1.97993, 500: 1.96472}
    for df, value in exact.items():
        assert t_quantile(df) == pytest.approx(value, abs=1e-5)
    assert t_quantile(10**6) == pytest.approx(1.959966, abs=1e-5)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_paired_stats_by_hand():
    got = paired_stats([1.0, 2.0, 3.0])
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert got["n"] == 3 and got["mean"] == pytest.approx(2.0) and got["sd"] == pytest.approx(1.0)
    assert got["ci_low"] == pytest.approx(2.0 - half) and got["ci_high"] == pytest.approx(2.0 + half)
    one = paired_stats([5.0])
    assert one == {"n": 1, "mean": 5.0, "sd": None, "ci_low": None, "ci_high": None}
    assert paired_stats([])["mean"] is None


def test_verdicts_in_plain_words():
    lower = paired_stats([-3.0, -4.0, -5.0])  # mean -4, CI -4 +- 2.48
    assert verdict("AWER", "lower", lower) == "real: CI excludes 0, centralization lower AWER by 4.0 (better)"
    assert verdict("BWT", "higher", lower) == "real: CI excludes 0, centralization lower BWT by 4.0 (worse)"
    assert verdict("AWER", "lower", paired_stats([1.0, -1.0, 2.0])) == "not distinguishable at n=3"
    assert verdict("AWER", "lower", paired_stats([1.0])).startswith("n/a: 1 paired seed,")


def test_paired_differences_only_on_shared_seeds():
    records = [
        {"config": "centralization-every-stage-product", "seed": 0.0, "awer": 90.0},
        {"config": "centralization-every-stage-product", "seed": 1.0, "awer": 95.0},
        {"config": "centralization-every-stage-product", "seed": 2.0, "awer": 99.0},
        {"config": "fedavg", "seed": 0.0, "awer": 93.0},
        {"config": "fedavg", "seed": 2.0, "awer": None},  # n/a: not a pair
        {"config": "fedavg", "seed": 1.0, "awer": 94.0},
    ]
    diffs = quality.paired_differences(records, "centralization-every-stage-product", "fedavg", "awer")
    assert diffs == [(0, -3.0), (1, 1.0)]


def test_comparison_pairs():
    configs = [
        "centralization-every-round-product",
        "centralization-every-stage-factors-weightinguniform-dp-noise0.3",
        "centralization-every-stage-product-single-all",
        "fedavg",
        "fedavg-lora",
        "fedavg-single-all",
        "joint",
    ]
    assert quality.comparison_pairs(configs) == [
        ("centralization-every-round-product", "fedavg"),
        ("centralization-every-stage-product-single-all", "fedavg-single-all"),
    ]
    assert quality.comparison_pairs(["centralization-every-3-product", "joint"]) == []
    # extra settings (--set) pair with FedAvg under the same settings
    extra = ["centralization-every-3-product-rounds-per-stage1", "fedavg", "fedavg-rounds-per-stage1"]
    assert quality.comparison_pairs(extra) == [(extra[0], "fedavg-rounds-per-stage1")]
    # each strategy's own learning rate does not count as a different setting
    rates = [
        "centralization-every-stage-product-modelm-lr0.001-single-all",
        "fedavg-modelm-full-lr1e-05-single-all",
    ]
    assert quality.comparison_pairs(rates + ["fedavg-modeln-single-all"]) == [tuple(rates)]
    # issue 15's variants against the same run without the variant's keys (paired by seed)
    variants = [
        "centralization-every-stage-product",
        "centralization-every-stage-product-lora-aggregationffa",
        "centralization-every-3-product-lora-aggregationfedex",
        "centralization-every-stage-product-server-optimizeravgm",
        "fedavg",
        "fedavg-proximal-mu0.01",
    ]
    assert quality.comparison_pairs(variants) == [
        ("centralization-every-stage-product", "fedavg"),
        (variants[1], variants[0]),
        (variants[3], variants[0]),
        (variants[5], "fedavg"),
    ]  # fedex's reference (every-3 without it) is not among them: no pair
    assert quality.compared(variants[1]) == "lora-aggregationffa"
    # issue 16's continual-learning methods against centralization alone, the same extra settings,
    # and a method on FedAvg also against FedAvg alone where that row is there
    methods = [
        "centralization-every-stage-product",
        "centralization-every-stage-product-rounds-per-stage1",
        "fedavg-cl-methodewc",
        "centralization-every-stage-product-cl-methodolora",
        "fedavg-rounds-per-stage1-cl-methodreplay",
        "fedavg",
    ]
    assert quality.comparison_pairs(methods) == [
        (methods[0], "fedavg"),
        (methods[2], methods[0]),
        (methods[2], "fedavg"),
        (methods[3], methods[0]),
        (methods[4], methods[1]),
    ]  # no fedavg-rounds-per-stage1 row: replay's run has no FedAvg pair
    assert quality.compared(methods[2]) == "fedavg + ewc"
    marked = quality.summary_markdown(
        [
            {
                "config": c,
                "seeds": [0],
                **{m[0]: (None, None, 0) for m in quality.METRICS},
                "fwt_definition": None,
            }
            for c in methods
        ]
    )
    assert marked.count("(not rehearsal-free)") == 1 and "cl-methodreplay (not rehearsal-free)" in marked


def test_set_overrides_are_typed():
    assert quality.parse_overrides(["rounds-per-stage=1", "lr=0.01"]) == {"rounds-per-stage": 1, "lr": 0.01}
    for wrong in (["rounds-per-stage"], ["seed=3"], ["no-such-key=1"]):
        with pytest.raises(ValueError):
            quality.parse_overrides(wrong)


# ---- retries --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            "run 3 ended as 'finished:failed': An error was encountered. Ending simulation.\n"
            "Exception: The current node timed out during startup. This could happen because some of "
            "the Ray processes failed to startup.",
            "Ray node start-up timed out",
        ),
        ("flwr run failed (exit 1):\nConnection to the SuperLink is unavailable. Please check", "SuperLink"),
        ("RuntimeError: Failed to connect to GCS at address 127.0.0.1:6379 within 60 seconds", "GCS"),
        ("ray.exceptions.LocalRayletDiedError: The task's local raylet died.", "raylet"),
        ("flwr ls failed (exit 1):\nhttpx.ConnectError: [Errno 111] Connection refused", "connection"),
        (
            "RuntimeError: the SuperLink did not come up at http://127.0.0.1:5/health; see x.log",
            "did not start",
        ),
        ("client error: <class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly'>", "worker"),
        ("FlowerRunError: run 2 ended as 'finished:failed'\nthe shared SuperLink died", "SuperLink died"),
    ],
)
def test_infrastructure_failures_are_retried(text, reason):
    assert reason in infrastructure_failure(text)


@pytest.mark.parametrize(
    "text",
    [
        "ValueError: run config: unknown key 'foo'; known keys: scenario, model",
        "run 1 ended as 'finished:failed': Simulation failed with exception: KeyError: 'lora_A'",
        # Ray's log prefixes and the word "connection" in our own errors are not infrastructure
        "(raylet) [2025-01-01] WARNING: a warning\nTraceback ...\nZeroDivisionError: division by zero",
        "RuntimeError: the run ended without a complete /runs/x/results.json",
        "FileNotFoundError: no connection between stage de and the scenario",
    ],
)
def test_genuine_errors_are_not_retried(text):
    assert infrastructure_failure(text) is None


class FakeSuperLink:
    def __init__(self, tmp_path):
        self.log_path = tmp_path / "superlink.log"
        self.process = None
        self.envs = 0

    def env(self):
        self.envs += 1
        return {"FAKE": "1"}

    def alive(self):
        return True

    def close(self):
        self.closed = getattr(self, "closed", 0) + 1


def test_run_with_retries_retries_infrastructure_only(tmp_path, monkeypatch, capsys):
    import simulations.sweep

    calls = []

    def flaky(overrides, mode, output_dir, env=None):
        calls.append(env)
        if len(calls) < 3:
            raise RuntimeError("Exception: The current node timed out during startup.")
        return tmp_path / "run", True

    monkeypatch.setattr(simulations.sweep, "run_one", flaky)
    superlink = FakeSuperLink(tmp_path)
    assert run_with_retries({}, "federated", tmp_path, superlink, name="tiny-x") == (tmp_path / "run", True)
    assert calls == [{"FAKE": "1"}] * 3 and superlink.envs == 3  # a fresh env each attempt
    assert superlink.closed == 2  # a new SuperLink (and the failed attempt's simulation stopped) per retry
    out = capsys.readouterr().out
    assert "[retry] tiny-x: infrastructure failure (Ray node start-up timed out); attempt 2/3" in out
    assert "attempt 3/3" in out

    def always(overrides, mode, output_dir, env=None):
        calls.append(env)
        raise RuntimeError("Connection to the SuperLink is unavailable")

    calls.clear()
    monkeypatch.setattr(simulations.sweep, "run_one", always)
    with pytest.raises(RuntimeError, match="unavailable"):
        run_with_retries({}, "federated", tmp_path, superlink)
    assert len(calls) == 3

    def buggy(overrides, mode, output_dir, env=None):
        calls.append(env)
        raise KeyError("lora_A")

    calls.clear()
    monkeypatch.setattr(simulations.sweep, "run_one", buggy)
    with pytest.raises(KeyError):
        run_with_retries({}, "federated", tmp_path, superlink)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(simulations.sweep, "run_one", always)
    with pytest.raises(RuntimeError):  # single-site and joint runs are never retried
        run_with_retries({}, "joint", tmp_path, superlink)
    assert calls == [None]


def test_the_superlink_log_of_the_attempt_is_read(tmp_path, monkeypatch):
    """Ray's errors may reach only the SuperLink's log: what it logged during the attempt counts."""
    import simulations.sweep

    superlink = FakeSuperLink(tmp_path)
    superlink.log_path.write_text("old run: ray.exceptions.LocalRayletDiedError\n")
    calls = []

    def fails(overrides, mode, output_dir, env=None):
        calls.append(1)
        with superlink.log_path.open("a") as log:
            log.write(
                "Failed to connect to GCS at address 127.0.0.1:1\n" if len(calls) == 1 else "KeyError\n"
            )
        raise RuntimeError("run 1 ended as 'finished:failed': An error was encountered. Ending simulation.")

    monkeypatch.setattr(simulations.sweep, "run_one", fails)
    with pytest.raises(RuntimeError):
        run_with_retries({}, "federated", tmp_path, superlink)
    assert len(calls) == 2  # retried after the GCS line; the old run's raylet line did not count again


def test_stop_ends_what_a_dead_superlink_left_running(tmp_path):
    """The SuperLink's group after its leader died, and a simulation in a session of its own that
    names the SuperLink's port, are stopped; a simulation of another SuperLink is not."""
    import subprocess

    from simulations.superlink import group_members, simulation_groups, stop

    fake = tmp_path / "flwr-simulation"
    fake.write_text("sleep 60\n")
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & exit 0"], start_new_session=True)
    leader.wait()
    assert group_members(leader.pid)  # the sleep outlived its leader
    ours, other = (
        subprocess.Popen(
            ["sh", str(fake), "--runtime-api-address", f"127.0.0.1:{port}"], start_new_session=True
        )
        for port in (41234, 41235)
    )
    try:
        for _ in range(50):  # until both shells run (psutil sees their command lines)
            if simulation_groups(41234) and simulation_groups(41235):
                break
            time.sleep(0.05)
        assert simulation_groups(41234) == [ours.pid]
        stop(leader, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "41234"}, timeout=5)
        assert group_members(leader.pid) == [] and group_members(ours.pid) == []
        assert ours.wait(timeout=5) is not None and other.poll() is None
    finally:
        for process in (ours, other):
            stop(process, timeout=5)


def test_shared_superlink_restarts_when_it_died(tmp_path, monkeypatch):
    import subprocess

    import simulations.superlink as superlink

    started = []

    def fake_start(work_dir, env=None, start_timeout=60.0):
        started.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
        return started[-1], {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(len(started))}

    monkeypatch.setattr(superlink, "start_superlink", fake_start)
    monkeypatch.setattr(superlink.httpx, "get", lambda url, timeout: type("R", (), {"is_success": True}))
    with superlink.SharedSuperLink(tmp_path) as link:
        assert link.env() == link.env() == {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "1"}  # started once
        started[0].kill()
        started[0].wait()
        assert link.env()["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "2" and link.starts == 2
    assert started[1].poll() is not None  # stopped at the end


# ---- names ----------------------------------------------------------------------------------------


def test_config_names_from_run_directories():
    assert config_name("default-centralization-every-stage-product-seed0", "default") == (
        "centralization-every-stage-product"
    )
    assert config_name("default-fedavg-seed2-single-all", "default") == "fedavg-single-all"
    assert config_name("new-languages-joint-seed1", "new-languages") == "joint"
    assert config_name("my-plant-fedavg-lora-seed0", "/data/my-plant.yaml") == "fedavg-lora"


def test_rows_and_their_names():
    names = [row_config(mode, overrides, "default") for mode, overrides in quality.ROWS]
    assert names == [
        "centralization-every-round-product",
        "centralization-every-stage-product",
        "centralization-every-stage-factors",
        "centralization-every-3-product",
        "fedavg",
        "fedavg-lora",
        "local-every-stage-product",
        "centralization-every-stage-product-single-all",
        "fedavg-single-all",
        "joint",
    ]
    main = select_rows("tiny", main=True)
    assert [row_config(mode, o, "tiny") for mode, o in main] == list(quality.MAIN)
    assert len(select_rows("default")) == 10 and len(select_rows("default", with_dp=True)) == 12
    assert select_rows("default", only=[11]) == [quality.DP_ROWS[0]]
    variants = select_rows("default", with_variants=True)[len(quality.ROWS) :]
    assert variants == quality.VARIANT_ROWS and len(variants) == 9
    methods = select_rows("default", with_cl_methods=True)[len(quality.ROWS) :]
    assert methods == quality.CL_ROWS and len(methods) == 6
    with pytest.raises(ValueError, match="out of 1..30"):
        select_rows("default", only=[0])
    assert select_rows("default", names=["joint", "fedavg"]) == [quality.ROWS[9], quality.ROWS[4]]
    with pytest.raises(ValueError, match="unknown configuration"):
        select_rows("default", names=["fedsgd"])


def test_jobs_are_seed_major_and_progress_has_an_eta(tmp_path):
    jobs = quality.jobs_for([quality.ROWS[4], quality.ROWS[9]], "tiny", [0, 1], tmp_path)
    assert [(j["config"], j["seed"]) for j in jobs] == [
        ("fedavg", 0),
        ("joint", 0),
        ("fedavg", 1),
        ("joint", 1),
    ]
    assert jobs[0]["dir"] == tmp_path / "tiny-fedavg-seed0"
    first = quality.progress(1, 4, jobs[0], 0.0, [])
    assert first.startswith("[quality 1/4] fedavg seed 0 (0.0 min so far")
    assert quality.progress(3, 4, jobs[2], 600.0, [300.0, 300.0]) == (
        "[quality 3/4] fedavg seed 1 (10.0 min so far, ~10 min left)"
    )


# ---- CSV and markdown from results.json -----------------------------------------------------------

STAGES = ["s1", "s2"]


def results(config, seed, wer, strategy=None, mode=None, bytes_up=2e6, privacy=None):
    """A results.json as the runs write it (the fields the report reads), named like run_one's runs."""
    strategy = strategy or config.split("-")[0]
    final = wer[-1]
    diagonal = [wer[i][i] for i in range(len(STAGES))] if mode != "joint" else None
    metrics = {"awer": sum(final) / len(final)}
    if mode != "joint":
        bwt = sum(wer[i][i] - final[i] for i in range(len(STAGES) - 1)) / (len(STAGES) - 1)
        metrics |= {
            "bwt": -bwt,
            "forgetting": bwt,
            "fwt": 5.0,
            "fwt_definition": "initial",
            "new_stage_wer": sum(diagonal) / len(diagonal),
        }
    return {
        "run_name": f"toy-{config}-seed{seed}",
        "strategy": strategy,
        "schedule": {"mode": mode} if mode else {"centralize_every": 1, "merge": "product"},
        "config": {"scenario": "toy", "strategy": "fedavg" if mode == "joint" else strategy, "seed": seed},
        "stages": STAGES,
        "complete": True,
        "wer_matrix": wer,
        "cer_matrix": [[w / 2 for w in row] for row in wer],
        "initial_wer": [60.0, 90.0],
        "other_test_sets": {"foundation": {"wer": [10.0, 30.0 + seed]}},
        "metrics": metrics,
        "bytes_up": 0 if mode else bytes_up,
        "bytes_down": 0 if mode else 4 * bytes_up,
        "wall_seconds": 100.0 + seed,
        **({"privacy": privacy} if privacy else {}),
    }


def write_run(folder, data, name=None):
    run = folder / (name or data["run_name"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(data))


@pytest.fixture()
def benchmark(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1, 2):
        # centralization: AWER 35 + seed, fedavg 37 + seed (2 lower on every seed: real); BWT
        # (final[0] - 20) differs by -1, +1, -1 (noise)
        c = 30.0 + seed
        write_run(runs, results("centralization-every-stage-product", seed, [[20, 80], [c, 40 + seed]]))
        f = c + (1 if seed == 1 else -1)
        write_run(runs, results("fedavg", seed, [[20, 80], [f, 74 + 2 * seed - f]], bytes_up=8e6))
    for seed in (0, 1):  # the joint reference of two seeds only
        write_run(runs, results("joint", seed, [[15, 50]], strategy="joint", mode="joint"))
    write_run(runs, {**results("fedavg", 3, [[1, 2], [3, 4]]), "complete": False})  # unfinished: not counted
    write_run(
        runs, results("fedavg", 0, [[1, 2], [3, 4]]) | {"config": {"scenario": "other", "seed": 0}}, "x"
    )
    return runs


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_and_markdown(benchmark, tmp_path):
    out = tmp_path / "results"
    order = ["fedavg", "centralization-every-stage-product", "joint"]
    command = "python -m simulations.quality --scenario toy"
    assert write_results("toy", benchmark, out, command, order) == (8, 0)
    rows = read_csv(out / "quality-toy.csv")
    assert [(r["config"], r["seed"]) for r in rows] == [
        *[("fedavg", str(s)) for s in (0, 1, 2)],
        *[("centralization-every-stage-product", str(s)) for s in (0, 1, 2)],
        ("joint", "0"),
        ("joint", "1"),
    ]
    for column in ["config", "seed", "awer", "bwt", "forgetting", "fwt", "new_stage_wer", "intransigence"]:
        assert column in rows[0]
    for column in ["acer", "base_domain_wer", "mb_up", "mb_down", "wall_seconds"]:
        assert column in rows[0]
    joint = rows[6]
    assert joint["bwt"] == "" and joint["intransigence"] == "" and joint["mb_up"] == "0"  # n/a: empty
    central = rows[3]
    assert float(central["intransigence"]) == pytest.approx(((20 - 15) + (40 - 50)) / 2)  # vs joint seed 0
    assert central["joint_reference"] == "toy-joint-seed0" and rows[5]["intransigence"] == ""  # seed 2: none
    assert float(central["mb_up"]) == 2.0 and float(central["base_domain_wer"]) == 30.0
    assert float(central["acer"]) == pytest.approx((30 / 2 + 40 / 2) / 2)

    # the means are the report's means over the same runs
    toy = [r for r in load_runs(benchmark)[0] if r["config"]["scenario"] == "toy"]
    report = {r["run"]: r for r in csv.DictReader(table_csv(group_runs(toy)).splitlines())}
    summary = {row["config"]: row for row in quality.summarize(quality.read_records(out / "quality-toy.csv"))}
    for config in order:
        for column, key, *_ in quality.METRICS:
            mean, std, _ = summary[config][column]
            expected = report[config][f"{key}_mean"]
            assert (mean is None) == (expected == "") and (
                mean is None or mean == pytest.approx(float(expected), rel=1e-5)
            )
            if std is not None:
                assert std == pytest.approx(float(report[config][f"{key}_std"]), rel=1e-5)

    paired = {r["metric"]: r for r in read_csv(out / "quality-toy-paired.csv")}
    assert paired["awer"]["seeds"] == "0 1 2" and paired["awer"]["differences"] == "-2 -2 -2"
    assert paired["awer"]["verdict"] == "real: CI excludes 0, centralization lower AWER by 2.0 (better)"
    assert paired["bwt"]["verdict"] == "not distinguishable at n=3"
    assert float(paired["bwt"]["ci_low"]) < 0 < float(paired["bwt"]["ci_high"])

    md = (out / "quality-toy.md").read_text()
    assert command in md and "CPU cores" in md and " UTC" in md
    assert "| fedavg | 3 | 0,1,2 |" in md and "| joint | 2 | 0,1 |" in md
    assert "(2 of 3 seeds)" in md  # centralization's intransigence: seeds 0 and 1 have a joint run
    assert "real: CI excludes 0, centralization lower AWER by 2.0 (better)" in md
    # README's table is rendered from the committed CSVs alone, identical to the MD's
    assert render_table(out / "quality-toy.csv") in md
    assert render_table(out / "quality-toy-paired.csv") in md


def test_nothing_written_without_complete_runs(tmp_path):
    assert write_results("toy", tmp_path / "none", tmp_path / "results", "cmd", []) == (0, 0)
    assert not (tmp_path / "results").exists()


def test_table_cli_prints_the_csv_table(benchmark, tmp_path, capsys):
    write_results("toy", benchmark, tmp_path, "cmd", [])
    assert quality.main(["--table", str(tmp_path / "quality-toy.csv")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| Configuration | n | Seeds | AWER |") and "| joint | 2 | 0,1 |" in printed


def test_committed_rows_survive_an_empty_runs_folder_and_stale_ones_go(benchmark, tmp_path):
    out, order = tmp_path / "results", ["fedavg", "centralization-every-stage-product", "joint"]
    write_results("toy", benchmark, out, "cmd", order)
    before = read_csv(out / "quality-toy.csv")
    assert all(r["recipe"] for r in before)
    # a fresh clone has no runs folder: the committed rows still count, unchanged
    assert write_results("toy", tmp_path / "none", out, "cmd", order) == (0, 8)
    assert read_csv(out / "quality-toy.csv") == before
    # a row whose recipe is not the one this invocation would run now is stale and drops out
    recipes = {("fedavg", 0): "0123456789ab", ("joint", 1): before[7]["recipe"]}
    assert write_results("toy", tmp_path / "none", out, "cmd", order, recipes) == (0, 7)
    kept = [(r["config"], r["seed"]) for r in read_csv(out / "quality-toy.csv")]
    assert ("fedavg", "0") not in kept and ("joint", "1") in kept
    # a run in the folder replaces its committed row
    write_run(tmp_path / "more", results("fedavg", 1, [[20, 80], [50, 50]]))
    assert write_results("toy", tmp_path / "more", out, "cmd", order) == (1, 6)
    fedavg = {r["seed"]: r for r in read_csv(out / "quality-toy.csv") if r["config"] == "fedavg"}
    assert sorted(fedavg) == ["1", "2"] and float(fedavg["1"]["awer"]) == 50.0


def test_recipe_follows_what_decides_the_results(monkeypatch, tmp_path):
    from cl_fed.config import make_config
    from cl_fed.models.tiny import TinyFastConformer

    recipe = quality.recipe
    base = {"scenario": "tiny", "seed": 0, "strategy": "centralization"}
    fedavg = {**base, "strategy": "fedavg"}
    mine, theirs = recipe("federated", base), recipe("federated", fedavg)
    assert recipe("federated", {**base, "output-dir": "/x", "run-name": "y", "resume": True}) == mine
    assert recipe("federated", {**base, "full-lr": 0.5}) == mine  # a knob its strategy ignores
    assert recipe("federated", make_config(base).to_dict()) == mine  # the config a run saves
    for changed in ({"lr": 0.5}, {"seed": 1}, {"centralize-every": "round"}):
        assert recipe("federated", {**base, **changed}) != mine
    assert recipe("single-site", base) != mine and recipe("joint", base) == recipe("joint", fedavg)
    scenario = tmp_path / "tiny-copy.yaml"
    text = (Path(quality.__file__).parents[1] / "cl_fed/data/scenarios/tiny.yaml").read_text()
    scenario.write_text(text.replace("\nseed: 0\n", "\nseed: 5\n", 1))
    assert recipe("federated", {**base, "scenario": str(scenario)}) != mine  # the data, not the name
    monkeypatch.setattr(TinyFastConformer, "lora_rank", TinyFastConformer.lora_rank + 1)
    assert recipe("federated", base) != mine  # the model family's LoRA default
    assert recipe("federated", fedavg) == theirs  # full fine-tuning has no LoRA


def test_run_jobs_skips_runs_the_committed_csv_holds(monkeypatch, tmp_path, capsys):
    import simulations.superlink

    def no_superlink(*args, **kwargs):
        raise AssertionError("a job was run")

    monkeypatch.setattr(simulations.superlink, "SharedSuperLink", no_superlink)
    jobs = quality.jobs_for([("federated", {"strategy": "fedavg"})], "tiny", [0, 1], tmp_path)
    committed = [{"config": j["config"], "seed": float(j["seed"]), "recipe": j["recipe"]} for j in jobs]
    assert quality.run_jobs(jobs, tmp_path, lambda: None, committed) == []
    assert "2 of 2 runs done (0 in" in capsys.readouterr().out
    committed[1]["recipe"] = "stale"
    with pytest.raises(AssertionError, match="a job was run"):
        quality.run_jobs(jobs, tmp_path, lambda: None, committed)


def test_report_labels_drop_a_hyphenated_scenario_name(tmp_path):
    for config in ("fedavg", "centralization-every-stage-product"):
        data = results(config, 0, [[20, 80], [30, 40]])
        data["run_name"] = f"new-languages-{config}-seed0"
        data["config"]["scenario"] = "new-languages"
        write_run(tmp_path, data)
    labels = [row.label for row in group_runs(load_runs(tmp_path)[0])]
    assert labels == ["centralization-every-stage-product", "fedavg"]


def test_a_run_the_superlink_forgot_is_an_infrastructure_failure(monkeypatch):
    """A SuperLink that restarted knows none of its runs: waiting for one must end, and be retried."""
    import simulations.flower as flower

    monkeypatch.setattr(flower, "run_status", lambda run_id, env, superlink=None: {})
    monkeypatch.setattr(flower.time, "sleep", lambda seconds: None)
    with pytest.raises(flower.FlowerRunError, match="unknown to the SuperLink") as err:
        flower.wait_for_run("7", {})
    assert infrastructure_failure(str(err.value)) == "the SuperLink lost the run"


def test_readme_blocks_are_the_committed_tables(tmp_path, monkeypatch):
    from simulations import readme_tables

    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "quality-x.csv").write_text("stub")
    monkeypatch.setattr(readme_tables, "ROOT", tmp_path)
    monkeypatch.setattr(readme_tables, "render_table", lambda path: f"| table of {Path(path).name} |\n")
    start = "<!-- quality-x table: generated by `...` -->"
    text = f"before\n{start}\n| stale 1.0 |\n| stale 2.0 |\n<!-- end of quality-x table -->\nafter\n"
    assert readme_tables.update(text) == (
        f"before\n{start}\n| table of quality-x.csv |\n<!-- end of quality-x table -->\nafter\n"
    )
    # a block whose CSV is missing is an error naming the file, never an empty table
    missing = "<!-- quality-y paired: -->\nold\n<!-- end of quality-y paired -->\n"
    with pytest.raises(SystemExit, match="quality-y-paired.csv not found"):
        readme_tables.update(missing)
    # the real README's blocks are exactly what the committed CSVs render
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    monkeypatch.undo()
    assert readme_tables.BLOCK.search(readme) and readme_tables.update(readme) == readme
