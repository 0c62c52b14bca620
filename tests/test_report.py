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
    run.mkdir(parents=True)
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


def test_written_table_and_csv_match_the_results(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(sweep, out)
    table = (out / "comparison.md").read_text()
    assert "| centralization | 0,1 | 40.0 ± 7.1 | -13.0 ± 4.2 |" in table
    assert "| joint | 0 | 20.0 | n/a | n/a | n/a | n/a |" in table
    assert (
        float(rows_of(out)["fedavg"]["epsilon_mean"]) == 7.5 and rows_of(out)["joint"]["epsilon_mean"] == ""
    )
    assert "incomplete run" in table  # what was left out is said
    rows = rows_of(out)
    assert float(rows["fedavg"]["awer_mean"]) == 45.0 and rows["fedavg"]["awer_std"] == ""
    assert float(rows["centralization"]["new_stage_wer_mean"]) == 33.5
    assert float(rows["centralization"]["wall_seconds_mean"]) == 105.0
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
