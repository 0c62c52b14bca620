"""The Deployment Engine under faults, for real (a module of its own so that it runs beside
test_deployment.py on the other pytest worker): a second federation where factory-b's SuperNode
reads its own manifest with a corrupt and a missing audio file: with bad-rows=skip its skips are
counted in results.json, and in that same run factory-a's SuperNode is SIGKILLed while it trains in
round 1: the round and the run finish with factory-b, and the drop is recorded. (With
bad-rows=raise the site's data loading fails with an error naming the manifest row, checked
directly on the site to save CI a run: a failing site is dropped like any other, see
test_flower_e2e's injected crash.)
"""

import json
import math
import random
import re
from pathlib import Path

import pytest
from test_deployment import SITES, scenario  # noqa: F401  (the module-scoped scenario fixture)

from cl_fed.config import make_config
from cl_fed.data.manifest import load_manifest, write_manifest
from cl_fed.data.synth import generate
from clients.site import load_site
from deploy.federation import is_gone, kill_tree, local_federation, spawned_process, submit_run
from simulations.flower import wait_for_run


def manifest_with_bad_audio(scenario: Path, site: str, folder: Path) -> Path:
    """`site`'s train rows and every test row of the scenario's (generated) data, plus one train row
    whose FLAC file is random bytes and one whose file does not exist: lines 2 and 1 from the end."""
    rows, _ = load_manifest(generate(scenario, progress=False) / "manifest.jsonl")
    keep = [u for u in rows if u.stage != "foundation" and (u.split == "test" or u.site == site)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.flac").write_bytes(random.Random(0).randbytes(4096))
    path = write_manifest(keep, folder / "site.jsonl")
    bad = [
        {
            "id": f"{site}-{name}",
            "audio": f"{name}.flac",
            "text": "weld the seam",
            "site": site,
            "stage": keep[0].stage,
            "split": "train",
        }
        for name in ("corrupt", "missing")
    ]
    with open(path, "a", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in bad)
    return path


@pytest.fixture(scope="module")
def faults(tmp_path_factory, scenario):
    """factory-b's SuperNode points at its own manifest with bad audio; one run, results kept."""
    work = tmp_path_factory.mktemp("faults")
    manifest = manifest_with_bad_audio(scenario, "factory-b", work / "factory-b-data")
    faults_file = work / "faults.json"
    faults_file.write_text("{}")
    config = {"scenario": str(scenario), "output-dir": str(work / "runs")}
    good, _ = load_manifest(manifest, on_error="skip")
    seen = {
        "manifest": str(manifest),
        "rows": len(manifest.read_text().splitlines()),
        "good_train_rows": sum(u.split == "train" for u in good),
    }
    with local_federation(
        work / "federation",
        SITES,
        {"factory-a": str(scenario), "factory-b": str(manifest)},
        env={"CL_FED_FAULTS_FILE": str(faults_file)},
    ) as federation:
        seen["node_ids"] = dict(federation.node_ids)
        # factory-a sleeps in its round-1 ClientApp, so the kill surely lands mid-round
        faults_file.write_text(
            json.dumps({"client": [{"site": "factory-a", "round": 1, "fault": "sleep", "seconds": 900}]})
        )
        run_id = submit_run(
            federation,
            {
                **config,
                "bad-rows": "skip",
                "rounds-per-stage": 2,
                "round-timeout": 120,
                "run-name": "skip-and-kill",
            },
        )
        node_a = federation.processes["supernode:factory-a"]
        spawned_process(node_a.pid, "flwr-clientapp", timeout=600)  # round 1 reached factory-a
        seen["killed"] = kill_tree(node_a.pid)
        seen["status"] = wait_for_run(run_id, federation.cli_env, 900, federation.name)
        seen["skip"] = json.loads((work / "runs" / "skip-and-kill" / "results.json").read_text())
        seen["started"] = [p.pid for p in federation.processes.values()]
    seen["stopped"] = federation.stopped
    return seen


def test_corrupt_and_missing_audio_raise_names_the_manifest_row(scenario, tmp_path):
    manifest = manifest_with_bad_audio(scenario, "factory-b", tmp_path / "data")
    rows = len(manifest.read_text().splitlines())
    cfg = make_config({"scenario": str(scenario), "bad-rows": "raise"})
    # the first bad row (the corrupt file) is named with its manifest and line
    with pytest.raises(
        ValueError, match=re.escape(f"{manifest}, row {rows - 1}: unreadable or corrupt audio")
    ):
        load_site(cfg, {"site": "factory-b", "data": str(manifest)}, "bad-audio", 0)


@pytest.mark.slow
def test_corrupt_and_missing_audio_skipped_and_counted(faults):
    results = faults["skip"]
    assert faults["status"]["status"] == "finished:completed" and results["complete"]
    assert [r["rows_skipped"] for r in results["rounds"]] == [{"factory-b": 2}] * 2
    # factory-b trained on its good rows in both rounds
    assert [r["clients_used"] for r in results["rounds"]] == [["factory-b"]] * 2
    assert [r["num_examples"] for r in results["rounds"]] == [[faults["good_train_rows"]]] * 2


@pytest.mark.slow
def test_supernode_killed_mid_round_is_dropped_and_the_run_completes(faults):
    results, node_a = faults["skip"], faults["node_ids"]["factory-a"]
    assert (
        faults["killed"]
        and len(results["rounds"]) == 2
        and all(math.isfinite(w) for w in results["wer_matrix"][0])
    )
    first, second = results["rounds"]
    assert sorted(first["sent_to"]) == sorted(faults["node_ids"].values()) and first["clients_used"] == [
        "factory-b"
    ]
    # recorded with the SuperLink's answer for a node that stopped sending heartbeats
    [drop] = first["clients_dropped"]
    assert drop["node"] == node_a and "Node Unavailable" in drop["reason"], drop
    # round 2 went on with the site still online; its update, merged, is what the run ends with
    assert second["sent_to"] == [faults["node_ids"]["factory-b"]] and second["clients_used"] == ["factory-b"]
    assert second["merged"] and second["losses"] and math.isfinite(second["losses"][0])
    assert all(is_gone(pid) for pid in [*faults["killed"], *faults["started"], *faults["stopped"]])
