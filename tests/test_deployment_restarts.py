"""Coordinator and site restarts on the Deployment Engine, for real: a `flower-superlink` with TLS,
SuperNode authentication and `--database` (SQLite) and two authenticated `flower-supernode`
processes on 127.0.0.1, all serving the packaged two-stage tiny scenario. In one federation:

1. A run of two stages x one round (one site sampled a round, fraction-train=0.5: a round's cost
   is mostly its ClientApp processes starting) is submitted, and the SuperLink is SIGKILLed (with
   the SuperExec and ServerApp it spawned: a crash of the coordinator's machine) as soon as round
   1's checkpoint is on disk, down 4 s (longer than a SuperNode's 3 s between pulls), then started
   again on the same port with the same database and certificates. What Flower 1.42 does then:
   - the killed run is still `running` in the database: nothing restarts its ServerApp (the
     SuperExec launches pending runs only). Left alone, the restarted SuperLink fails it
     (`finished:failed`, "No heartbeat received from the task") once its ServerApp's last
     heartbeat is HEARTBEAT_PATIENCE x 30 s = 60 s old; until then its messages pushed before the
     crash (round 2's) are still handed out, and a reconnected SuperNode was seen held ~40 s by
     one (it starts a ClientApp, whose object pulls are refused with "Run is finished" once the run
     failed) before it served the resumed run. So the test, as an operator would, `flwr stop`s the
     dead run (`finished:stopped`; SuperNodes then ignore its messages) before resuming;
   - the registered keys and node ids survive, and both SuperNodes, left running, reconnect by
     themselves (their HTTP client retries with exponential backoff: "Connection successful after
     ... tries" in their logs); they need no restart;
   - `flwr run` again with resume=true continues from the checkpoint and ends exactly like an
     uninterrupted run of the same config and seed on the same federation (wer/cer matrices,
     losses, base checksum, the final model's checksum).
2. factory-a's SuperNode is SIGKILLed in stage 1 while it sleeps in round 1 (a `sleep` fault, so
   the kill lands mid-round): the SuperLink answers "Node Unavailable" for it once its heartbeats
   are overdue (30 to 60 s after the kill: SuperNodes beat every 30 s, HEARTBEAT_PATIENCE = 2), so
   round 1 ends with factory-b alone, and the node is offline: round 2 is not sent to it. Once
   stage 2's first round (round 3) has reached factory-b, which sleeps 5 s in it, factory-a's
   SuperNode is started again (same key, node config and port): it is activated under the same
   node id, misses round 3 (sampled before it came back), and in round 4 gets the full current
   weights (the server forgot what it held when it dropped) and trains on them. No server change
   was needed for this: the server samples the nodes online each round (server/strategies.py).
"""

import json
import math
import re
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from test_deployment import SITES, wait_for_file

from cl_fed.continual import state_checksum
from cl_fed.io import load_tensors, read_tensors_meta
from cl_fed.state import ContinualState
from deploy.federation import (
    flwr_cli,
    is_gone,
    kill_supernode,
    local_federation,
    online_supernodes,
    restart_superlink,
    restart_supernode,
    spawned_process,
    stop_run,
    submit_run,
)
from server.checkpoint import CHECKPOINT
from simulations.flower import run_status, wait_for_run

SCENARIO = "tiny"  # two stages; also every SuperNode's node-config data


@pytest.fixture(scope="module")
def restarts(tmp_path_factory):
    """Everything happens here, once, in one federation; the tests below check what it recorded."""
    work = tmp_path_factory.mktemp("restarts")
    faults = work / "faults.json"
    faults.write_text("{}")
    seen = {"started": set()}
    with local_federation(
        work / "federation",
        SITES,
        SCENARIO,
        env={"CL_FED_FAULTS_FILE": str(faults)},
        database=work / "federation" / "superlink" / "state.db",
    ) as federation:
        seen["started"] |= {p.pid for p in federation.processes.values()}
        seen["node_ids"] = dict(federation.node_ids)
        # a round costs mostly its ClientApp processes starting (~10 s of CPU each here): the
        # SuperLink drill trains one site a round (fraction-train=0.5), one epoch
        config = {"scenario": SCENARIO, "local-epochs": 1, "output-dir": str(work / "runs")}
        drill = {**config, "rounds-per-stage": 1, "fraction-train": 0.5}
        whole = {**drill, "run-name": "whole"}
        seen["whole"] = finish(federation, submit_run(federation, whole), whole)
        seen["superlink"] = kill_superlink_after_round_one_and_resume(
            federation, {**drill, "run-name": "killed"}
        )
        seen["started"] |= {p.pid for p in federation.processes.values()}
        seen["supernode"] = kill_supernode_in_stage_one_and_restart_in_stage_two(
            federation, {**config, "rounds-per-stage": 2, "round-timeout": 120, "run-name": "rejoin"}, faults
        )
        seen["started"] |= {p.pid for p in federation.processes.values()}
        # the last run's end, then every run's status in one `flwr ls`
        wait_for_run(seen["supernode"]["run_id"], federation.cli_env, 120, federation.name)
        seen["status"] = {
            run["run-id"]: run for run in flwr_cli(["ls", federation.name], federation.cli_env)["runs"]
        }
    seen["stopped"] = federation.stopped
    return seen


def finish(federation, run_id: str, config: dict, timeout: float = 600) -> dict:
    """Wait for the run's results.json (each `flwr ls` costs a second of CPU here, so the SuperLink
    is asked only now and then whether the run failed); its id, results and final model's checksum."""
    run_dir = Path(config["output-dir"]) / config["run-name"]
    deadline, asked = time.monotonic() + timeout, time.monotonic()
    while not (run_dir / "results.json").is_file():
        if time.monotonic() - asked > 20:
            asked = time.monotonic()
            status = run_status(run_id, federation.cli_env, federation.name)
            if str(status.get("status", "")).startswith("finished"):
                raise AssertionError(f"run {config['run-name']} ended without results: {status}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {config['run-name']} not done within {timeout:.0f} s")
        time.sleep(0.5)
    return {
        "run_id": run_id,
        "results": json.loads((run_dir / "results.json").read_text()),
        "model": state_checksum(load_file(run_dir / "model" / "model.safetensors")),
    }


def kill_superlink_after_round_one_and_resume(federation, config: dict) -> dict:
    """Submit the run; as soon as round 1 (stage 1) is checkpointed, SIGKILL the SuperLink with its
    ServerApp and start it again; leave the SuperNodes alone; submit the run again with resume=true."""
    run_dir = Path(config["output-dir"]) / config["run-name"]
    logs = {s: federation.work / s / "supernode.log" for s in SITES}
    run_id = submit_run(federation, config)
    wait_for_file(run_dir / CHECKPOINT, timeout=600)
    superlink = federation.processes["superlink"].pid
    server = spawned_process(superlink, "flwr-serverapp", timeout=10).pid
    offsets = {s: log.stat().st_size for s, log in logs.items()}
    # down longer than a SuperNode's 3 s between pulls: each surely finds it gone, then back
    seen = {"superlink": superlink, "server": server, "killed": restart_superlink(federation, downtime=4)}
    seen["results_when_killed"] = (run_dir / "results.json").exists()
    seen["restarted"] = federation.processes["superlink"].pid
    seen["killed_run"] = run_id
    seen["killed_run_after_restart"] = run_status(run_id, federation.cli_env, federation.name)
    stop_run(federation, run_id)
    # back online: each SuperNode, left alone, logs that it reached the SuperLink again
    seen["reconnected"] = {
        s: wait_for_log(log, offsets[s], RECONNECTED, timeout=60) for s, log in logs.items()
    }
    seen["supernodes_alive"] = all(federation.processes[f"supernode:{s}"].poll() is None for s in SITES)
    seen.update(finish(federation, submit_run(federation, {**config, "resume": True}), config))
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
    seen = {"old_pid": node_a.pid, "killed": kill_supernode(federation, "factory-a")}
    # stage 1 is over (its evaluation is checkpointed): the weights the server holds for stage 2
    seen["base_at_return"] = wait_for_stage(run_dir / CHECKPOINT, 1, timeout=600)
    wait_for_received(log_b, offset_b, run_id, 3, timeout=300)  # round 3 reached factory-b: it sleeps
    offset = log_a.stat().st_size
    seen["new_pid"] = restart_supernode(federation, "factory-a").pid
    seen["new_node_id"] = wait_for_node_id(log_a, offset, federation.processes["supernode:factory-a"])
    seen["online_after_restart"] = {
        int(n["node-id"]) for n in online_supernodes(federation.name, federation.cli_env)
    }
    seen.update(finish(federation, run_id, config, timeout=900))
    return seen


def tail(log: Path, offset: int) -> str:
    with open(log, encoding="utf-8", errors="replace") as text:
        text.seek(offset)
        return text.read()


RECONNECTED = re.compile(r"Connection successful after [\d.]+ seconds and \d+ tries")


def wait_for_log(log: Path, offset: int, pattern: re.Pattern, timeout: float) -> str:
    """Until `pattern` appears in `log` after `offset`; the line it matched."""
    deadline = time.monotonic() + timeout
    while not (found := pattern.search(tail(log, offset))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log}: no {pattern.pattern!r} within {timeout:.0f} s")
        time.sleep(0.2)
    return found.group(0)


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


@pytest.mark.slow
def test_superlink_killed_mid_run_and_restarted_resumes_to_the_same_results(restarts):
    killed, whole = restarts["superlink"], restarts["whole"]
    status = restarts["status"]
    assert status[whole["run_id"]]["status"] == "finished:completed" and whole["results"]["complete"]
    # the SuperLink died with the ServerApp it ran, mid-run (after round 1, before the end)
    assert {killed["superlink"], killed["server"]} <= set(killed["killed"])
    assert not killed["results_when_killed"] and killed["restarted"] != killed["superlink"]
    # the database kept the dead run, as still running: nothing restarts its ServerApp
    assert killed["killed_run_after_restart"]["status"] == "running", killed["killed_run_after_restart"]
    # the same SuperNode processes, never restarted, reconnected by themselves (logged) and served
    # the resumed run, which sampled and used the same site each round as the uninterrupted one
    reconnected = killed["reconnected"]
    assert killed["supernodes_alive"] and set(reconnected) == set(SITES), reconnected
    assert all(RECONNECTED.fullmatch(line) for line in reconnected.values()), reconnected
    resumed, expected = killed["results"], whole["results"]
    assert status[killed["run_id"]]["status"] == "finished:completed" and resumed["complete"]
    assert [(r["stage"], r["round"]) for r in resumed["rounds"]] == [(0, 0), (1, 0)]
    assert [r["clients_used"] for r in resumed["rounds"]] == [r["clients_used"] for r in expected["rounds"]]
    assert all(len(r["clients_used"]) == 1 and r["clients_dropped"] == [] for r in resumed["rounds"])
    assert all(math.isfinite(w) for row in resumed["wer_matrix"] for w in row)
    # nothing lost: the same numbers as the uninterrupted run under the same seed
    assert resumed["wer_matrix"] == expected["wer_matrix"]
    assert resumed["cer_matrix"] == expected["cer_matrix"]
    assert resumed["initial_wer"] == expected["initial_wer"]
    assert [r["loss"] for r in resumed["rounds"]] == [r["loss"] for r in expected["rounds"]]
    assert resumed["base_checksum"] and resumed["base_checksum"] == expected["base_checksum"]
    assert killed["model"] == whole["model"]  # the final model, bit for bit
    # the dead run, stopped after the restart, stays stopped (its ServerApp never came back)
    assert status[killed["killed_run"]]["status"] == "finished:stopped", status[killed["killed_run"]]


@pytest.mark.slow
def test_supernode_killed_in_stage_one_rejoins_in_stage_two_and_trains(restarts):
    seen, ids = restarts["supernode"], restarts["node_ids"]
    node_a, node_b = ids["factory-a"], ids["factory-b"]
    results = seen["results"]
    assert restarts["status"][seen["run_id"]]["status"] == "finished:completed" and results["complete"]
    assert all(math.isfinite(w) for row in results["wer_matrix"] for w in row)
    rounds = results["rounds"]
    assert [(r["stage"], r["round"]) for r in rounds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first, second, third, last = rounds
    # round 1: sent to both, factory-a killed while it trained: dropped with the SuperLink's answer
    assert sorted(first["sent_to"]) == sorted([node_a, node_b]) and first["clients_used"] == ["factory-b"]
    [drop] = first["clients_dropped"]
    assert drop["node"] == node_a and "Node Unavailable" in drop["reason"], drop
    # rounds 2 and 3 (the first of stage 2, during which it was restarted): offline, not sampled
    assert [r["sent_to"] for r in (second, third)] == [[node_b]] * 2
    assert [r["clients_used"] for r in (second, third)] == [["factory-b"]] * 2
    # restarted with the same key: the same node id, online again beside factory-b
    assert seen["new_pid"] != seen["old_pid"] and seen["new_node_id"] == node_a
    assert seen["online_after_restart"] == {node_a, node_b}
    # round 4: back, and trained on the server's current weights (sent in full: it was forgotten)
    assert sorted(last["sent_to"]) == sorted([node_a, node_b])
    assert sorted(last["clients_used"]) == SITES and last["clients_dropped"] == []
    assert (
        last["bytes_down"] > 3 * third["bytes_down"]
    )  # factory-b's adapter, and factory-a's plus the weights
    assert last["site_checksums"]["factory-a"] == seen["base_at_return"]
    assert last["site_checksums"]["factory-a"] == last["site_checksums"]["factory-b"]
    assert seen["base_at_return"] != first["site_checksums"]["factory-b"]  # stage 1 changed the base


@pytest.mark.slow
def test_every_started_process_is_gone(restarts):
    killed_link, killed_node = restarts["superlink"]["killed"], restarts["supernode"]["killed"]
    # both SuperLinks, the old and the new factory-a SuperNode, factory-b's, and all they spawned
    assert len(restarts["started"]) == 5
    assert {restarts["supernode"]["old_pid"], restarts["supernode"]["new_pid"]} <= restarts["started"]
    every = [*restarts["started"], *killed_link, *killed_node, *restarts["stopped"]]
    assert all(is_gone(pid) for pid in every)
