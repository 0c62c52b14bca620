"""The Deployment Engine for real: a `flower-superlink` and two `flower-supernode` processes on
127.0.0.1 with TLS and SuperNode authentication, one `flwr run . <federation>` of a one-stage tiny
scenario, results.json checked, a SuperNode with an unregistered key turned away, and every process
the test started gone afterwards. Plus quick checks of the certificates and of node config `data`.

Fault tolerance, each fault done for real to the real processes, each run compared with the
uninterrupted one above (same config and seed, same federation):
- the ServerApp process SIGKILLed right after round 1's checkpoint, the run submitted again with
  resume=true: it ends exactly like the uninterrupted run;
- the SuperLink (started with `--database`, SQLite) SIGKILLed with the SuperExec and ServerApp it
  spawned (a crash of the coordinator's machine) as soon as round 1's checkpoint is on disk, down
  4 s (longer than a SuperNode's 3 s between pulls), then started again on the same port with the
  same database and certificates. What Flower 1.42 does then:
  - the killed run is still `running` in the database: nothing restarts its ServerApp (the
    SuperExec launches pending runs only). Left alone, the restarted SuperLink fails it
    (`finished:failed`, "No heartbeat received from the task") once its ServerApp's last heartbeat
    is HEARTBEAT_PATIENCE x 30 s = 60 s old; until then its messages pushed before the crash (round
    2's) are still handed out, and a reconnected SuperNode was seen held ~40 s by one before it
    served the resumed run. So the test, as an operator would, `flwr stop`s the dead run
    (`finished:stopped`; SuperNodes then ignore its messages) before resuming;
  - the registered keys and node ids survive, and both SuperNodes, left running, reconnect by
    themselves (their HTTP client retries with exponential backoff: "Connection successful after
    ... tries" in their logs); they need no restart;
  - `flwr run` again with resume=true continues from the checkpoint and ends exactly like the
    uninterrupted run (wer/cer matrices, losses, base checksum, the final model's checksum).
A SuperNode killed mid-round and restarted a stage later, and bad audio, are in
test_deployment_faults.py.
"""

import json
import math
import re
import ssl
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from safetensors.torch import load_file

from cl_fed.config import make_config
from cl_fed.continual import state_checksum
from cl_fed.data.scenario import scenario_path
from clients.site import load_site, node_data
from deploy.certs import make_supernode_key, make_tls
from deploy.federation import (
    is_gone,
    kill_tree,
    local_federation,
    online_supernodes,
    restart_superlink,
    spawned_process,
    start_supernode,
    stop_run,
    submit_run,
)
from server.checkpoint import CHECKPOINT
from simulations.flower import flwr_run, run_status
from simulations.superlink import free_port

SITES = ["factory-a", "factory-b"]


def one_stage_scenario(folder: Path) -> Path:
    """The packaged tiny scenario cut to its first stage: one stage (of two rounds) keeps the runs short."""
    scenario = yaml.safe_load(scenario_path("tiny").read_text())
    scenario["name"], scenario["stages"] = "tiny-one-stage", scenario["stages"][:1]
    path = folder / "tiny-one-stage.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Path:
    return one_stage_scenario(tmp_path_factory.mktemp("scenario"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, scenario):
    """Everything happens here, once; the tests below check what it recorded."""
    work = tmp_path_factory.mktemp("deployment")
    seen = {}
    database = work / "federation" / "superlink" / "state.db"  # what survives a SuperLink restart
    with local_federation(work / "federation", SITES, str(scenario), database=database) as federation:
        ca = federation.certs["ca.crt"]
        seen["plain_http_refused"] = _refused(f"http://{federation.address}/health")
        seen["https_with_ca"] = httpx.get(
            f"https://{federation.address}/health", verify=_context(ca)
        ).status_code
        # a SuperNode with a key nobody registered tries to join while the run starts (the server
        # wants exactly one SuperNode per site, so had it joined the run would fail)
        key, _ = make_supernode_key(work / "intruder-keys", "intruder")
        intruder = start_supernode(
            federation.work,
            "intruder",
            federation.address,
            free_port(),
            {"site": "factory-b", "data": str(scenario)},
            ca,
            key,
        )
        federation.processes["supernode:intruder"] = intruder  # stopped with the rest if it lingers
        # one epoch: a round costs mostly its ClientApp processes starting
        config = {
            "scenario": str(scenario),
            "rounds-per-stage": 2,
            "local-epochs": 1,
            "output-dir": str(work / "runs"),
        }
        run_dir = flwr_run(
            {**config, "run-name": "whole"},
            superlink=federation.name,
            env=federation.cli_env,
            stream=False,
            timeout=600,
        )
        seen["intruder_exit"] = intruder.wait(timeout=120)
        seen["intruder_log"] = (federation.work / "intruder" / "supernode.log").read_text()
        seen["online"] = len(online_supernodes(federation.name, federation.cli_env))
        seen["server_killed"] = kill_server_after_round_one_and_resume(
            federation, {**config, "run-name": "killed"}
        )
        seen["started"] = {label: p.pid for label, p in federation.processes.items()}
        seen["superlink_killed"] = kill_superlink_after_round_one_and_resume(
            federation, {**config, "run-name": "superlink-killed"}
        )
        seen["restarted_superlink"] = federation.processes["superlink"].pid
    seen["stopped"] = federation.stopped
    seen["results"] = json.loads((run_dir / "results.json").read_text())
    seen["model"] = state_checksum(load_file(run_dir / "model" / "model.safetensors"))
    seen["scenario"] = str(scenario)
    return seen


def kill_server_after_round_one_and_resume(federation, config: dict) -> dict:
    """Submit the run, SIGKILL its ServerApp process (the SuperLink spawned it) as soon as round 1's
    checkpoint is on disk, stop the dead run (else the SuperLink waits up to 60 s for its heartbeat
    and may hand its round-2 messages to the SuperNodes meanwhile), then submit it again with
    resume=true to the same federation."""
    run_dir = Path(config["output-dir"]) / config["run-name"]
    run_id = submit_run(federation, config)
    wait_for_file(run_dir / CHECKPOINT, timeout=600)
    server = spawned_process(federation.processes["superlink"].pid, "flwr-serverapp", timeout=10)
    seen = {"killed": kill_tree(server.pid), "results_when_killed": (run_dir / "results.json").exists()}
    stop_run(federation, run_id)
    seen["killed_run"] = run_status(run_id, federation.cli_env, federation.name)
    flwr_run(
        {**config, "resume": True},
        superlink=federation.name,
        env=federation.cli_env,
        stream=False,
        timeout=600,
    )
    seen["online_after"] = len(online_supernodes(federation.name, federation.cli_env))
    seen["results"] = json.loads((run_dir / "results.json").read_text())
    seen["model"] = state_checksum(load_file(run_dir / "model" / "model.safetensors"))
    return seen


def kill_superlink_after_round_one_and_resume(federation, config: dict) -> dict:
    """Submit the run; as soon as round 1 is checkpointed, SIGKILL the SuperLink with its ServerApp
    and start it again; leave the SuperNodes alone; stop the dead run and submit the run again with
    resume=true."""
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
    seen["killed_run_after_restart"] = run_status(run_id, federation.cli_env, federation.name)
    stop_run(federation, run_id)
    seen["killed_run"] = run_status(run_id, federation.cli_env, federation.name)
    # back online: each SuperNode, left alone, logs that it reached the SuperLink again
    seen["reconnected"] = {
        s: wait_for_log(log, offsets[s], RECONNECTED, timeout=60) for s, log in logs.items()
    }
    seen["supernodes_alive"] = all(federation.processes[f"supernode:{s}"].poll() is None for s in SITES)
    flwr_run(
        {**config, "resume": True},
        superlink=federation.name,
        env=federation.cli_env,
        stream=False,
        timeout=600,
    )
    seen["results"] = json.loads((run_dir / "results.json").read_text())
    seen["model"] = state_checksum(load_file(run_dir / "model" / "model.safetensors"))
    return seen


def tail(log: Path, offset: int) -> str:
    """A log from byte `offset` on."""
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


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)


def _context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=5.0)
    except httpx.HTTPError:
        return True
    return False


@pytest.mark.slow
def test_run_over_tls_with_authenticated_supernodes_completes(deployment):
    results = deployment["results"]
    assert results["complete"] and results["strategy"] == "centralization"
    assert results["config"]["scenario"] == deployment["scenario"]
    assert results["stages"] == ["en-welding"]
    assert len(results["wer_matrix"]) == 1 and len(results["wer_matrix"][0]) == 1
    assert all(math.isfinite(w) and 0 <= w for row in results["wer_matrix"] for w in row)
    assert len(results["rounds"]) == 2
    assert all(sorted(r["clients_used"]) == SITES and r["clients_dropped"] == [] for r in results["rounds"])
    assert all(r["rows_skipped"] == {} for r in results["rounds"])
    assert [r["merged"] for r in results["rounds"]] == [False, True] and results["bytes_up"] > 0
    # the SuperLink speaks TLS only, with a certificate our CA signed
    assert deployment["plain_http_refused"] and deployment["https_with_ca"] == 200


@pytest.mark.slow
def test_supernode_with_unregistered_key_is_rejected(deployment):
    assert deployment["intruder_exit"] != 0
    assert "Failed to activate SuperNode" in deployment["intruder_log"]
    assert deployment["online"] == 2  # only the registered SuperNodes joined (and trained: see above)


@pytest.mark.slow
def test_server_killed_after_a_round_resumes_to_the_same_results(deployment):
    killed, whole = deployment["server_killed"], deployment["results"]
    assert killed["killed"] and not killed["results_when_killed"]  # it died mid-run, after round 1
    resumed = killed["results"]
    assert resumed["complete"] and len(resumed["rounds"]) == 2
    assert all(sorted(r["clients_used"]) == SITES for r in resumed["rounds"])
    # nothing lost: the same numbers as the uninterrupted run under the same seed
    assert resumed["wer_matrix"] == whole["wer_matrix"] and resumed["cer_matrix"] == whole["cer_matrix"]
    assert resumed["initial_wer"] == whole["initial_wer"]
    assert [r["loss"] for r in resumed["rounds"]] == [r["loss"] for r in whole["rounds"]]
    assert killed["model"] == deployment["model"]  # the merged base, bit for bit
    assert resumed["base_checksum"] and resumed["base_checksum"] == whole["base_checksum"]
    # the dead ServerApp's run was stopped; the SuperNodes, untouched, served the resumed run
    assert killed["killed_run"]["status"] == "finished:stopped", killed["killed_run"]
    assert killed["online_after"] == 2


@pytest.mark.slow
def test_superlink_killed_mid_run_and_restarted_resumes_to_the_same_results(deployment):
    killed, whole = deployment["superlink_killed"], deployment["results"]
    # the SuperLink died with the ServerApp it ran, mid-run (after round 1, before the end)
    assert {killed["superlink"], killed["server"]} <= set(killed["killed"])
    assert not killed["results_when_killed"] and deployment["restarted_superlink"] != killed["superlink"]
    # the database kept the dead run, as still running: nothing restarts its ServerApp; stopped by
    # hand, it stays stopped
    assert killed["killed_run_after_restart"]["status"] == "running", killed["killed_run_after_restart"]
    assert killed["killed_run"]["status"] == "finished:stopped", killed["killed_run"]
    # the same SuperNode processes, never restarted, reconnected by themselves (logged) and served
    # the resumed run
    reconnected = killed["reconnected"]
    assert killed["supernodes_alive"] and set(reconnected) == set(SITES), reconnected
    assert all(RECONNECTED.fullmatch(line) for line in reconnected.values()), reconnected
    resumed = killed["results"]
    assert resumed["complete"] and [(r["stage"], r["round"]) for r in resumed["rounds"]] == [(0, 0), (0, 1)]
    assert all(sorted(r["clients_used"]) == SITES and r["clients_dropped"] == [] for r in resumed["rounds"])
    # nothing lost: the same numbers as the uninterrupted run under the same seed
    assert resumed["wer_matrix"] == whole["wer_matrix"] and resumed["cer_matrix"] == whole["cer_matrix"]
    assert resumed["initial_wer"] == whole["initial_wer"]
    assert [r["loss"] for r in resumed["rounds"]] == [r["loss"] for r in whole["rounds"]]
    assert resumed["base_checksum"] and resumed["base_checksum"] == whole["base_checksum"]
    assert killed["model"] == deployment["model"]  # the final model, bit for bit


@pytest.mark.slow
def test_every_started_process_is_gone(deployment):
    started = deployment["started"]
    assert set(started) == {"superlink", "supernode:intruder", *(f"supernode:{s}" for s in SITES)}
    # the long-running ones were stopped together with what they spawned (SuperExec processes);
    # the first SuperLink was killed, the restarted one stopped
    restarted = deployment["restarted_superlink"]
    assert {restarted, started["supernode:factory-a"], started["supernode:factory-b"]} < set(
        deployment["stopped"]
    )
    assert started["superlink"] in deployment["superlink_killed"]["killed"]
    every = [*started.values(), restarted, *deployment["superlink_killed"]["killed"], *deployment["stopped"]]
    assert all(is_gone(pid) for pid in every)


def test_certificates_fit_flower(tmp_path):
    tls = make_tls(tmp_path, hosts=["superlink.example.com"])
    ca = x509.load_pem_x509_certificate(tls["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(tls["server.crt"].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.com"}
    assert (
        make_tls(tmp_path)["server.crt"].read_bytes() == tls["server.crt"].read_bytes()
    )  # kept, not renewed
    private, public = make_supernode_key(tmp_path, "factory-a")
    key = load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode loads it
    assert key.curve.name == "secp384r1" and public.read_text().startswith("ecdsa-sha2-nistp384 ")
    from flwr.cli.supernode.register import try_load_public_key

    assert try_load_public_key(public)  # as `flwr supernode register` reads it


def test_node_config_data_overrides_the_scenario_for_that_node_only(tmp_path):
    cfg = make_config({"scenario": "tiny"})
    assert node_data(cfg, {"site": "factory-a"}) is cfg
    assert node_data(cfg, {"data": "default"}).scenario == "default"
    manifest = tmp_path / "site.jsonl"
    manifest.write_text("")
    assert node_data(cfg, {"data": str(manifest)}).scenario == str(manifest)
    with pytest.raises(ValueError, match="node-config data='data/site.jsonl': give an absolute path"):
        node_data(cfg, {"data": "data/site.jsonl"})
    with pytest.raises(FileNotFoundError, match="node-config data=.*missing.jsonl.*no such file"):
        node_data(cfg, {"data": str(tmp_path / "missing.jsonl")})
    with pytest.raises(ValueError, match="node-config data='no-such-scenario': .*no packaged scenario"):
        load_site(cfg, {"data": "no-such-scenario", "site": "factory-a"}, "run", 1)


# ---- a SuperNode killed mid-round, and a site with corrupt and missing audio -------------------------
