"""The sweep report: numbers are the runs' results.json aggregated over seeds, plots draw those numbers."""

import csv
import json
import math

import matplotlib
import pytest

matplotlib.use("Agg")

from simulations.report import (
    group_runs,
    load_runs,
    plot_forgetting_curves,
    plot_heatmaps,
    plot_wer_vs_bytes,
    write_report,
)

STAGES = ["s1", "s2"]


def results(
    name,
    strategy,
    seed,
    wer,
    cer,
    initial,
    metrics,
    bytes_up,
    bytes_down,
    wall,
    mode=None,
    complete=True,
    privacy=None,
):
    schedule = {"centralize_every": 1, "merge": "product"} if mode is None else {"mode": mode}
    return {
        "run_name": f"toy-{name}-seed{seed}",
        "strategy": strategy,
        "schedule": schedule,
        "config": {"scenario": "toy", "strategy": strategy, "seed": seed, "output-dir": "/somewhere"},
        "stages": STAGES,
        "complete": complete,
        "wer_matrix": wer,
        "cer_matrix": cer,
        "initial_wer": initial,
        "other_test_sets": {"foundation": {"wer": [10.0, 30.0 + seed], "cer": [5.0, 9.0]}},
        "metrics": metrics,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "wall_seconds": wall,
        **({"privacy": privacy} if privacy else {}),
    }


def write(folder, data):
    run = folder / data["run_name"]
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(data))


@pytest.fixture()
def sweep(tmp_path):
    # centralization, seeds 0 and 1; fedavg, seed 0; a joint run; an unfinished run
    write(
        tmp_path,
        results(
            "centralization",
            "centralization",
            0,
            [[20, 80], [30, 40]],
            [[10, 40], [12, 20]],
            [50, 90],
            {"awer": 35.0, "bwt": -10.0, "forgetting": 10.0, "fwt": 10.0, "new_stage_wer": 30.0},
            2_000_000,
            8_000_000,
            100.0,
        ),
    )
    write(
        tmp_path,
        results(
            "centralization",
            "centralization",
            1,
            [[24, 70], [40, 50]],
            [[14, 30], [16, 30]],
            [50, 80],
            {"awer": 45.0, "bwt": -16.0, "forgetting": 16.0, "fwt": 10.0, "new_stage_wer": 37.0},
            2_000_000,
            8_000_000,
            110.0,
        ),
    )
    write(
        tmp_path,
        results(
            "fedavg",
            "fedavg",
            0,
            [[10, 90], [60, 30]],
            [[5, 50], [30, 15]],
            [50, 90],
            {"awer": 45.0, "bwt": -50.0, "forgetting": 50.0, "fwt": 0.0, "new_stage_wer": 20.0},
            40_000_000,
            40_000_000,
            90.0,
            privacy={"epsilon": 7.5, "delta": 1e-5},
        ),
    )
    write(
        tmp_path,
        results(
            "joint",
            "joint",
            0,
            [[15, 25]],
            [[7, 11]],
            [50, 90],
            {"awer": 20.0, "bwt": None, "forgetting": None, "fwt": None, "new_stage_wer": None},
            0,
            0,
            60.0,
            mode="joint",
        ),
    )
    write(
        tmp_path,
        results("local", "local", 0, [[15, 25]], [[7, 11]], [50, 90], None, 0, 0, 1.0, complete=False),
    )
    return tmp_path


def test_rows_aggregate_seeds_with_mean_and_sample_std(sweep):
    runs, skipped = load_runs(sweep)
    assert len(runs) == 4 and len(skipped) == 1 and "incomplete" in skipped[0]
    rows = {row.label: row for row in group_runs(runs)}
    assert sorted(rows) == ["centralization", "fedavg", "joint"]  # the shared scenario prefix is dropped
    central = rows["centralization"]
    assert central.seeds == [0, 1]
    assert central.stat("awer", "metrics") == (40.0, pytest.approx(math.sqrt(50)))  # 35, 45
    assert central.stat("acer", "derived")[0] == pytest.approx(((12 + 20) / 2 + (16 + 30) / 2) / 2)
    assert central.stat("foundation", "derived") == (30.5, pytest.approx(math.sqrt(0.5)))
    assert central.stat("bytes_down", "results") == (8.0, 0.0)  # MB
    assert central.mean_matrix() == [[22, 75], [35, 45]]
    assert central.curve(1) == [85, 75, 45]  # initial, after s1, after s2
    assert rows["fedavg"].stat("bwt", "metrics") == (-50.0, None)  # one seed: no deviation
    assert rows["joint"].joint and rows["joint"].stat("bwt", "metrics") == (None, None)
    # paired with toy-joint-seed0 (WER 15, 25): seed 0 diagonal 20, 40 -> 10; seed 1 has no joint run
    assert central.stat("intransigence", "paired") == (10.0, None)
    assert rows["fedavg"].stat("intransigence", "paired") == (0.0, None)  # diagonal 10, 30
    assert rows["joint"].stat("intransigence", "paired") == (None, None)
    # results written before fwt_definition existed computed FWT from the initial base
    assert central.fwt_definition() == "initial" and rows["joint"].fwt_definition() is None


def test_written_table_and_csv_match_the_results(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(sweep, out)
    table = (out / "comparison.md").read_text()
    assert "| centralization | 0,1 | 40.0 ± 7.1 | -13.0 ± 4.2 |" in table
    assert "| joint | 0 | 20.0 | n/a | n/a | n/a | n/a | n/a | n/a |" in table
    assert "| FWT | FWT def. | New-stage WER | Intransigence |" in table
    assert "| fedavg | 0 | 45.0 | -50.0 | 50.0 | 0.0 | initial | 20.0 | 0.0 |" in table
    assert "seed 0: toy-joint-seed0; seed 1: no joint run of scenario toy, seed 1" in table
    assert "| 33.5 ± 4.9 | 10.0 (1 of 2 seeds) |" in table  # centralization: new-stage WER, intransigence
    assert (
        float(rows_of(out)["fedavg"]["epsilon_mean"]) == 7.5 and rows_of(out)["joint"]["epsilon_mean"] == ""
    )
    assert "incomplete run" in table  # what was left out is said
    rows = rows_of(out)
    assert float(rows["fedavg"]["awer_mean"]) == 45.0 and rows["fedavg"]["awer_std"] == ""
    assert float(rows["centralization"]["new_stage_wer_mean"]) == 33.5
    assert float(rows["centralization"]["wall_seconds_mean"]) == 105.0
    assert float(rows["centralization"]["intransigence_mean"]) == 10.0
    assert rows["centralization"]["fwt_definition"] == "initial" and rows["joint"]["fwt_definition"] == ""
    for name in ("heatmaps.png", "forgetting_curves.png", "wer_vs_bytes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def rows_of(out):
    return {r["run"]: r for r in csv.DictReader((out / "comparison.csv").open())}


def test_plots_draw_the_table_numbers(sweep):
    rows = group_runs(load_runs(sweep)[0])
    heatmaps = plot_heatmaps(rows)
    drawn = {
        ax.get_title().split("\n")[0]: ax.images[0].get_array().tolist() for ax in heatmaps.axes if ax.images
    }
    assert drawn == {row.label: row.mean_matrix() for row in rows}

    curves = plot_forgetting_curves(rows)
    panel = curves.axes[1]  # test set s2
    lines = {line.get_label(): list(line.get_ydata()) for line in panel.lines}
    assert lines["centralization"] == [85, 75, 45]
    assert lines["fedavg"] == [90, 90, 30]
    assert lines["joint"] == [25, 25]  # the joint model: a horizontal line at its WER

    scatter = plot_wer_vs_bytes(rows)
    points = {
        c.get_label(): (c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0])
        for c in scatter.axes[0].containers
    }
    assert points == {"centralization": (10.0, 40.0), "fedavg": (80.0, 45.0)}  # joint sent nothing: not drawn


def test_runs_written_before_a_key_existed_group_with_newer_ones(sweep):
    old = json.loads((sweep / "toy-centralization-seed1" / "results.json").read_text())
    old["config"]["dp-noise"], old["config"]["full-lr"] = (
        0.0,
        0.123,
    )  # a newer key at its default; an ignored knob
    (sweep / "toy-centralization-seed1" / "results.json").write_text(json.dumps(old))
    rows = {row.label: row for row in group_runs(load_runs(sweep)[0])}
    assert rows["centralization"].seeds == [0, 1]


def test_missing_or_empty_sweep_folder_is_a_clear_error(tmp_path):
    from simulations.report import main

    assert main([str(tmp_path / "nope")]) == 2
    assert main([str(tmp_path)]) == 2


# ---- intransigence: pairing with the joint run of the same scenario and seed ------------------------


def continual(name, seed, wer, scenario="toy", fwt=10.0, fwt_definition="initial"):
    data = results(
        name,
        name,
        seed,
        wer,
        wer,
        [50, 90],
        {
            "awer": 1.0,
            "bwt": 0.0,
            "forgetting": 0.0,
            "fwt": fwt,
            "fwt_definition": fwt_definition,
            "new_stage_wer": 1.0,
            "intransigence": None,
        },
        1,
        1,
        1.0,
    )
    data["config"]["scenario"] = f"scenarios/{scenario}.yaml"  # matched by the scenario's name
    data["run_name"] = f"{scenario}-{name}-seed{seed}"
    return data


def joint_run(seed, wer, scenario="toy", **config):
    data = results("joint", "joint", seed, [wer], [wer], [50, 90], None, 0, 0, 1.0, mode="joint")
    data["config"] = {"scenario": scenario, "strategy": "fedavg", "seed": seed, "mode": "joint", **config}
    data["run_name"] = f"{scenario}-joint-seed{seed}" + "".join(f"-{k}{v}" for k, v in config.items())
    return data


def test_report_pairs_each_run_with_its_joint_run(tmp_path):
    # a continual run and the joint run of the same scenario and seed (in a sibling folder of the
    # tree, as a separate joint sweep writes it), and a run of another scenario with no joint partner
    sweep = tmp_path / "sweep"
    write(sweep, continual("fedavg", 3, [[30, 80], [50, 20]]))
    write(sweep, continual("fedavg", 3, [[30, 80], [50, 20]], scenario="other"))
    write(sweep / "joint-sweep", joint_run(3, [26, 12]))
    write(sweep / "joint-sweep", joint_run(4, [0, 0]))  # another seed: nobody's partner
    runs, skipped = load_runs(sweep)
    assert sorted(r["run_name"] for r in runs) == ["other-fedavg-seed3", "toy-fedavg-seed3"]  # rows
    assert skipped == []
    paired = {r["run_name"]: r for r in runs}
    # diagonal 30, 20 against joint 26, 12: ((30 - 26) + (20 - 12)) / 2 = 6
    assert paired["toy-fedavg-seed3"]["_intransigence"] == pytest.approx(6.0)
    assert paired["toy-fedavg-seed3"]["_joint_reference"] == "toy-joint-seed3"
    assert paired["other-fedavg-seed3"]["_intransigence"] is None

    write_report(sweep)
    table = (sweep / "comparison.md").read_text()
    assert (
        "| Run | Seeds | AWER | BWT | Forgetting | FWT | FWT def. | New-stage WER | Intransigence |" in table
    )
    assert "| toy-fedavg | 3 | 1.0 | 0.0 | 0.0 | 10.0 | initial | 1.0 | 6.0 |" in table
    assert "| other-fedavg | 3 | 1.0 | 0.0 | 0.0 | 10.0 | initial | 1.0 | n/a |" in table
    assert "no joint run of scenario other, seed 3" in table
    rows = rows_of(sweep)
    assert (
        float(rows["toy-fedavg"]["intransigence_mean"]) == 6.0
        and rows["toy-fedavg"]["intransigence_std"] == ""
    )
    assert rows["other-fedavg"]["intransigence_mean"] == ""


def test_intransigence_is_mean_and_std_over_seeds(tmp_path):
    write(tmp_path, continual("fedavg", 0, [[30, 80], [50, 20]]))  # vs (26, 12): 6
    write(tmp_path, continual("fedavg", 1, [[20, 80], [50, 40]]))  # vs (26, 12): (-6 + 28) / 2 = 11
    write(tmp_path, joint_run(0, [26, 12]))
    write(tmp_path, joint_run(1, [26, 12]))
    rows = {row.label: row for row in group_runs(load_runs(tmp_path)[0])}
    assert rows["fedavg"].stat("intransigence", "paired") == (8.5, pytest.approx(math.sqrt(12.5)))


def test_closest_joint_run_is_the_partner(tmp_path):
    run = continual("fedavg", 0, [[30, 80], [50, 20]])
    run["config"]["rounds-per-stage"] = 3
    write(tmp_path, run)
    write(tmp_path, joint_run(0, [26, 12], **{"rounds-per-stage": 3}))
    write(tmp_path, joint_run(0, [0, 0], **{"rounds-per-stage": 5}))
    paired = {r["run_name"]: r for r in load_runs(tmp_path)[0]}["toy-fedavg-seed0"]
    assert paired["_joint_reference"] == "toy-joint-seed0-rounds-per-stage3"
    assert paired["_intransigence"] == pytest.approx(6.0)


def test_fwt_is_never_averaged_across_definitions(tmp_path):
    write(tmp_path, continual("fedavg", 0, [[30, 80], [50, 20]], fwt=10.0, fwt_definition="initial"))
    write(tmp_path, continual("fedavg", 1, [[30, 80], [50, 20]], fwt=2.0, fwt_definition="single-task"))
    write(tmp_path, continual("local", 0, [[30, 80], [50, 20]], fwt=2.0, fwt_definition="single-task"))
    write(tmp_path, continual("local", 1, [[30, 80], [50, 20]], fwt=4.0, fwt_definition="single-task"))
    rows = {row.label: row for row in group_runs(load_runs(tmp_path)[0])}
    assert rows["fedavg"].fwt_definition() == "mixed" and rows["fedavg"].stat("fwt", "metrics") == (
        None,
        None,
    )
    assert rows["local"].fwt_definition() == "single-task" and rows["local"].stat("fwt", "metrics")[0] == 3.0
    write_report(tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| fedavg | 0,1 | 1.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | mixed defs, not averaged | mixed |" in table
    assert "| local | 0,1 | 1.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | 3.0 ± 1.4 | single-task |" in table
    csv_rows = rows_of(tmp_path)
    assert csv_rows["fedavg"]["fwt_mean"] == "" and csv_rows["fedavg"]["fwt_definition"] == "mixed"
    assert (
        float(csv_rows["local"]["fwt_mean"]) == 3.0 and csv_rows["local"]["fwt_definition"] == "single-task"
    )


def test_replay_rows_are_marked_not_rehearsal_free(tmp_path):
    for name, method in (
        ("fedavg", "none"),
        ("fedavg-cl-methodreplay", "replay"),
        ("fedavg-cl-methodewc", "ewc"),
    ):
        data = continual(name, 0, [[30, 80], [50, 20]])
        data["config"]["cl-method"] = method
        write(tmp_path, data)
    write_report(tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| fedavg-cl-methodreplay (not rehearsal-free) | 0 |" in table
    assert table.count("not rehearsal-free") == 1  # neither plain fedavg nor EWC keeps past data
