"""The Deployment Engine under faults, for real (a module of its own so that it runs beside
test_deployment.py on the other pytest worker): a second federation, serving the packaged two-stage
tiny scenario, where factory-b's SuperNode reads its own manifest with a corrupt and a missing audio
file. One run of two stages x two rounds:

- with bad-rows=skip, factory-b's skips are counted in results.json every round;
- factory-a's SuperNode is SIGKILLed in stage 1 while it sleeps in round 1 (a `sleep` fault, so the
  kill lands mid-round): the SuperLink answers "Node Unavailable" for it once its heartbeats are
  overdue (30 to 60 s after the kill: SuperNodes beat every 30 s, HEARTBEAT_PATIENCE = 2), so round
  1 ends with factory-b alone, and the node is offline: round 2 is not sent to it;
- once stage 2's first round (round 3) has reached factory-b, which sleeps 5 s in it, factory-a's
  SuperNode is started again (same key, node config and port): it is activated under the same node
  id, misses round 3 (sampled before it came back), and in round 4 gets the full current weights
  (the server forgot what it held when it dropped) and trains on them. No server change was needed
  for this: the server samples the nodes online each round (server/strategies.py).

(With bad-rows=raise the site's data loading fails with an error naming the manifest row, checked
directly on the site to save CI a run: a failing site is dropped like any other, see
test_flower_e2e's injected crash.)
"""

import json
import math
import random
import re
import time
from pathlib import Path

import psutil
import pytest
from test_deployment import SITES, tail

from cl_fed.config import make_config
from cl_fed.continual import state_checksum
from cl_fed.data.manifest import load_manifest, write_manifest
from cl_fed.data.synth import generate
from cl_fed.io import load_tensors, read_tensors_meta
from cl_fed.state import ContinualState
from clients.site import load_site
from deploy.federation import (
    is_gone,
    kill_supernode,
    local_federation,
    online_supernodes,
    restart_supernode,
    submit_run,
)
from server.checkpoint import CHECKPOINT
from simulations.flower import wait_for_run

SCENARIO = "tiny"  # two stages; factory-a's node-config data


def manifest_with_bad_audio(scenario: str | Path, site: str, folder: Path) -> Path:
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
def faults(tmp_path_factory):
    """factory-b's SuperNode points at its own manifest with bad audio; factory-a's is killed in
    stage 1 and restarted in stage 2. One run; what it recorded is checked below."""
    work = tmp_path_factory.mktemp("faults")
    manifest = manifest_with_bad_audio(SCENARIO, "factory-b", work / "factory-b-data")
    faults_file = work / "faults.json"
    faults_file.write_text("{}")
    good, _ = load_manifest(manifest, on_error="skip")
    seen = {
        "manifest": str(manifest),
        "rows": len(manifest.read_text().splitlines()),
        "good_train_rows": {
            stage: sum(u.split == "train" and u.stage == stage for u in good)
            for stage in dict.fromkeys(u.stage for u in good)
        },
    }
    config = {
        "scenario": SCENARIO,
        "output-dir": str(work / "runs"),
        "local-epochs": 1,  # a round costs mostly its ClientApp processes starting
        "bad-rows": "skip",
        "rounds-per-stage": 2,
        "round-timeout": 120,
        "run-name": "skip-kill-rejoin",
    }
    with local_federation(
        work / "federation",
        SITES,
        {"factory-a": SCENARIO, "factory-b": str(manifest)},
        env={"CL_FED_FAULTS_FILE": str(faults_file)},
    ) as federation:
        seen["node_ids"] = dict(federation.node_ids)
        seen["started"] = {p.pid for p in federation.processes.values()}
        seen.update(kill_supernode_in_stage_one_and_restart_in_stage_two(federation, config, faults_file))
        seen["started"] |= {p.pid for p in federation.processes.values()}
        results = (Path(config["output-dir"]) / config["run-name"] / "results.json", None)
        seen["status"] = wait_for_run(seen["run_id"], federation.cli_env, 900, federation.name, results)
        seen["results"] = json.loads(results[0].read_text())
    seen["stopped"] = federation.stopped
    return seen


def kill_supernode_in_stage_one_and_restart_in_stage_two(federation, config: dict, faults: Path) -> dict:
    """factory-a sleeps in round 1 and is SIGKILLed there; once stage 1's evaluation is checkpointed
    and round 3 (stage 2's first) has reached factory-b, which sleeps in it, factory-a's SuperNode is
    started again, in time for round 4."""
    run_dir = Path(config["output-dir"]) / config["run-name"]
    faults.write_text(
        json.dumps(
            {
                "client": [
                    {"site": "factory-a", "round": 1, "fault": "sleep", "seconds": 900},
                    {"site": "factory-b", "round": 3, "fault": "sleep", "seconds": 5},
                ]
            }
        )
    )
    node_a = federation.processes["supernode:factory-a"]
    log_a, log_b = (federation.work / s / "supernode.log" for s in SITES)
    before, offset_b = clientapps(node_a.pid), log_b.stat().st_size
    run_id = submit_run(federation, config)
    wait_for_new_clientapp(node_a.pid, before, timeout=600)  # round 1 reached factory-a: it sleeps
    seen = {"run_id": run_id, "old_pid": node_a.pid, "killed": kill_supernode(federation, "factory-a")}
    # stage 1 is over (its evaluation is checkpointed): the weights the server holds for stage 2
    seen["base_at_return"] = wait_for_stage(run_dir / CHECKPOINT, 1, timeout=600)
    wait_for_received(log_b, offset_b, run_id, 3, timeout=300)  # round 3 reached factory-b: it sleeps
    offset = log_a.stat().st_size
    seen["new_pid"] = restart_supernode(federation, "factory-a").pid
    seen["new_node_id"] = wait_for_node_id(log_a, offset, federation.processes["supernode:factory-a"])
    seen["online_after_restart"] = {
        int(n["node-id"]) for n in online_supernodes(federation.name, federation.cli_env)
    }
    return seen


def wait_for_received(log: Path, offset: int, run_id: str, count: int, timeout: float) -> None:
    """Until a SuperNode's log shows it received `count` train messages of the run."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"\[RUN {run_id}\][^\n]*\n[^\n]*Receiving: train message")
    while len(pattern.findall(tail(log, offset))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log}: fewer than {count} train messages of run {run_id} in {timeout:.0f} s")
        time.sleep(0.2)


def wait_for_node_id(log: Path, offset: int, process, timeout: float = 120) -> int:
    """The node id a (re)started SuperNode logs once the SuperLink has activated it."""
    deadline = time.monotonic() + timeout
    while not (found := re.search(r"SuperNode ID: (\d+)", tail(log, offset))):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"SuperNode not activated (exit code {process.poll()}); see {log}")
        time.sleep(0.2)
    return int(found.group(1))


def clientapps(pid: int) -> set[int]:
    found = set()
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(Path(arg).name == "flwr-clientapp" for arg in child.cmdline()[:2]):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def wait_for_new_clientapp(pid: int, before: set[int], timeout: float) -> None:
    """Until a `flwr-clientapp` that was not in `before` runs below `pid` (a message reached it)."""
    deadline = time.monotonic() + timeout
    while not clientapps(pid) - before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no new flwr-clientapp below PID {pid} after {timeout:.0f} s")
        time.sleep(0.2)


def wait_for_stage(checkpoint: Path, stages: int, timeout: float) -> str:
    """Until the checkpoint holds `stages` after-stage evaluations; the checksum of its weights."""
    deadline = time.monotonic() + timeout
    while True:
        if checkpoint.is_file() and len(read_tensors_meta(checkpoint)["record"]["after_stage"]) >= stages:
            tensors, meta = load_tensors(checkpoint)
            state = ContinualState.from_tensors(tensors, has_adapter=bool(meta["has_adapter"]))
            return state_checksum(state.weights)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{checkpoint} did not reach stage {stages} within {timeout:.0f} s")
        time.sleep(0.2)


def test_corrupt_and_missing_audio_raise_names_the_manifest_row(tmp_path):
    manifest = manifest_with_bad_audio(SCENARIO, "factory-b", tmp_path / "data")
    rows = len(manifest.read_text().splitlines())
    cfg = make_config({"scenario": SCENARIO, "bad-rows": "raise"})
    # the first bad row (the corrupt file) is named with its manifest and line
    with pytest.raises(
        ValueError, match=re.escape(f"{manifest}, row {rows - 1}: unreadable or corrupt audio")
    ):
        load_site(cfg, {"site": "factory-b", "data": str(manifest)}, "bad-audio", 0)


@pytest.mark.slow
def test_corrupt_and_missing_audio_skipped_and_counted(faults):
    results = faults["results"]
    assert faults["status"]["status"] == "finished:completed" and results["complete"]
    assert [r["rows_skipped"] for r in results["rounds"]] == [{"factory-b": 2}] * 4
    # factory-b trained on its good rows of each stage in every round
    good = [faults["good_train_rows"][stage] for stage in results["stages"]]
    assert all("factory-b" in r["clients_used"] for r in results["rounds"])
    examples = [dict(zip(r["clients_used"], r["num_examples"]))["factory-b"] for r in results["rounds"]]
    assert examples == [good[0], good[0], good[1], good[1]]


@pytest.mark.slow
def test_supernode_killed_in_stage_one_is_dropped_and_rejoins_in_stage_two(faults):
    ids, results = faults["node_ids"], faults["results"]
    node_a, node_b = ids["factory-a"], ids["factory-b"]
    assert faults["killed"] and all(math.isfinite(w) for row in results["wer_matrix"] for w in row)
    rounds = results["rounds"]
    assert [(r["stage"], r["round"]) for r in rounds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first, second, third, last = rounds
    # round 1: sent to both, factory-a killed while it trained: dropped with the SuperLink's answer
    # for a node that stopped sending heartbeats; the round ends with factory-b
    assert sorted(first["sent_to"]) == sorted([node_a, node_b]) and first["clients_used"] == ["factory-b"]
    [drop] = first["clients_dropped"]
    assert drop["node"] == node_a and "Node Unavailable" in drop["reason"], drop
    # rounds 2 and 3 (the first of stage 2, during which it was restarted): offline, not sampled;
    # round 2's update, merged, ends stage 1
    assert [r["sent_to"] for r in (second, third)] == [[node_b]] * 2
    assert [r["clients_used"] for r in (second, third)] == [["factory-b"]] * 2
    assert second["merged"] and second["losses"] and math.isfinite(second["losses"][0])
    # restarted with the same key: the same node id, online again beside factory-b
    assert faults["new_pid"] != faults["old_pid"] and faults["new_node_id"] == node_a
    assert faults["online_after_restart"] == {node_a, node_b}
    # round 4: back, and trained on the server's current weights (sent in full: it was forgotten)
    assert sorted(last["sent_to"]) == sorted([node_a, node_b])
    assert sorted(last["clients_used"]) == SITES and last["clients_dropped"] == []
    assert last["bytes_down"] > 3 * third["bytes_down"]  # factory-b's adapter; factory-a's plus the weights
    assert last["site_checksums"]["factory-a"] == faults["base_at_return"]
    assert last["site_checksums"]["factory-a"] == last["site_checksums"]["factory-b"]
    assert faults["base_at_return"] != first["site_checksums"]["factory-b"]  # stage 1 changed the base


@pytest.mark.slow
def test_every_process_the_faults_run_started_is_gone(faults):
    # the old and the new factory-a SuperNode, factory-b's, the SuperLink, and all they spawned
    assert len(faults["started"]) == 4 and {faults["old_pid"], faults["new_pid"]} <= faults["started"]
    assert all(is_gone(pid) for pid in [*faults["started"], *faults["killed"], *faults["stopped"]])
