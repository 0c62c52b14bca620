"""Bring up a Deployment-Engine federation: a SuperLink, one SuperNode per site, the CLI's connection.

Flower 1.42 serves every SuperLink API (Fleet for SuperNodes, Control for the `flwr` CLI, and the
Runtime API its ServerApp process uses) over HTTP(S) on one port (`--host`/`--port`). TLS uses the
certificates of deploy/certs.py on that port; SuperNode authentication (`--enable-supernode-auth`,
which Flower only allows with TLS) admits only SuperNodes whose public key was registered through
the Control API (`flwr supernode register`); a SuperNode with any other key fails to activate and
exits. The Control API itself needs no login unless an account-auth plugin is configured.

Each process gets its own FLWR_HOME and log under the work directory, as on separate machines:
    <work>/superlink/       superlink.log, home/
    <work>/<site>/          supernode.log, home/    (one per site)
    <work>/cli-home/        config.toml with the connection `[superlink.<name>]` used by `flwr`
The plain functions below are used by deploy/local.py and tests/test_deployment.py, which also
uses the fault drills at the end (submit a run without waiting, find and SIGKILL a ServerApp or a
SuperNode with everything it spawned) and restarts the SuperLink (with `--database`);
tests/test_deployment_faults.py restarts a SuperNode as it was started (restart_supernode).
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cl_fed.config import make_config
from cl_fed.io import atomic_write_text
from cl_fed.paths import project_root
from deploy.certs import make_supernode_key, make_tls
from simulations.flower import BIN, flower_env, run_config_arg, toml_value
from simulations.superlink import free_port, wait_until_healthy


@dataclass
class Federation:
    """What `local_federation` started: enough to run the app against it and to stop it."""

    name: str  # the SuperLink connection's name in the CLI's config.toml
    address: str  # host:port of the SuperLink (all its APIs)
    work: Path
    cli_env: dict  # environment for `flwr` commands (FLWR_HOME = the CLI home)
    certs: dict[str, Path]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)  # "superlink", "supernode:<site>"
    node_ids: dict[str, int] = field(default_factory=dict)  # site -> node id it was registered under (auth)
    stopped: list[int] = field(default_factory=list)  # every PID stopped on exit, spawned ones included
    # how each process was started, so that restart_superlink / restart_supernode start it again alike
    port: int = 0
    auth: bool = True
    env: dict | None = None
    database: Path | None = None  # the SuperLink's SQLite state (None: in memory, lost on restart)
    supernodes: dict[str, dict] = field(default_factory=dict)  # site -> start_supernode's arguments


def _start(command: list[str], log: Path, home: Path, env: dict | None) -> subprocess.Popen:
    """A Flower process with its own FLWR_HOME, output to `log`, in a session of its own."""
    home.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(c) for c in command],
            env=flower_env({**(env or {}), "FLWR_HOME": str(home)}),
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_superlink(
    work: Path,
    port: int,
    certs: dict[str, Path] | None,
    auth: bool = True,
    env: dict | None = None,
    database: Path | None = None,
) -> subprocess.Popen:
    """`flower-superlink` on 127.0.0.1:<port>, TLS with `certs` (None = insecure), SuperNode auth on/off.

    Its ServerApp runs in a subprocess with this environment (CL_FED_CACHE, ...). State (registered
    SuperNode keys, runs) is in memory unless `database` names an SQLite file, which keeps it across
    restarts but, on a starved CPU, can stay locked past Flower's 5 s busy timeout: the SuperLink then
    answers 500 and a SuperNode that gets one exits (seen on a loaded 2-core machine)."""
    folder = work / "superlink"
    folder.mkdir(parents=True, exist_ok=True)
    command = [BIN / "flower-superlink", "--host", "127.0.0.1", "--port", port, "--isolation", "subprocess"]
    if database:
        command += ["--database", database]
    if certs is None:
        if auth:
            raise ValueError("SuperNode authentication needs TLS: pass the certificates of deploy/certs.py")
        command += ["--insecure"]
    else:
        command += [
            "--ssl-ca-certfile",
            certs["ca.crt"],
            "--ssl-certfile",
            certs["server.crt"],
            "--ssl-keyfile",
            certs["server.key"],
        ]
    if auth:
        command += ["--enable-supernode-auth"]
    return _start(command, folder / "superlink.log", folder / "home", env)


def wait_for_superlink(
    address: str, ca: Path | None, process: subprocess.Popen, log: Path, timeout: float = 60.0
) -> None:
    """Until GET /health answers (over TLS, verified against the CA, when `ca` is given)."""
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    wait_until_healthy(f"{'https' if ca else 'http'}://{address}/health", process, timeout, log, verify)


def write_cli_config(home: Path, name: str, address: str, ca: Path | None) -> Path:
    """$FLWR_HOME/config.toml of the `flwr` CLI with the one connection `name` (the default)."""
    lines = [
        "[superlink]",
        f"default = {toml_value(name)}",
        "",
        f"[superlink.{name}]",
        f"address = {toml_value(address)}",
    ]
    lines += [f"root-certificates = {toml_value(str(Path(ca).resolve()))}"] if ca else ["insecure = true"]
    path = home / "config.toml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def flwr_cli(args: list, cli_env: dict, timeout: float = 60.0) -> dict:
    """A `flwr ... --format json` command; its JSON answer, or an error with Flower's message."""
    done = subprocess.run(
        [str(BIN / "flwr"), *map(str, args), "--format", "json"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        answer = json.JSONDecoder().raw_decode(done.stdout[done.stdout.index("{") :])[0]
    except (ValueError, json.JSONDecodeError):
        answer = {}
    if done.returncode != 0 or not answer.get("success"):
        raise RuntimeError(
            f"flwr {' '.join(map(str, args))} failed (exit {done.returncode}): "
            f"{answer.get('error-message') or done.stdout[-2000:] + done.stderr[-2000:]}"
        )
    return answer


def register_supernode(public_key: Path, superlink: str, cli_env: dict, name: str | None = None) -> int:
    """Admit a SuperNode's public key (OpenSSH ECDSA) to the federation; returns its node id."""
    return int(
        flwr_cli(
            ["supernode", "register", public_key, superlink, *(["--name", name] if name else [])], cli_env
        )["node-id"]
    )


def online_supernodes(superlink: str, cli_env: dict) -> list[dict]:
    return [n for n in flwr_cli(["supernode", "ls", superlink], cli_env)["nodes"] if n["status"] == "online"]


def start_supernode(
    work: Path,
    site: str,
    superlink_address: str,
    port: int,
    node_config: dict,
    ca: Path | None = None,
    private_key: Path | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """`flower-supernode` for one site: `node_config` (e.g. site=..., data=...) reaches its ClientApp;
    `port` is its own ClientAppIo (Runtime) API port, one per SuperNode on a machine."""
    folder = work / site
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        BIN / "flower-supernode",
        "--superlink",
        superlink_address,
        "--port",
        port,
        "--isolation",
        "subprocess",
        "--node-config",
        " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items()),
    ]
    command += ["--root-certificates", ca] if ca else ["--insecure"]
    if private_key:
        command += ["--auth-supernode-private-key", private_key]
    return _start(command, folder / "supernode.log", folder / "home", env)


def wait_for_supernodes(
    count: int, superlink: str, cli_env: dict, processes: dict[str, subprocess.Popen], timeout: float = 60.0
) -> None:
    """Until `count` SuperNodes are online; a SuperNode that exits meanwhile is an error naming its log."""
    deadline = time.monotonic() + timeout
    while len(online_supernodes(superlink, cli_env)) < count:
        for label, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{label} exited with code {process.returncode}; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")
        time.sleep(0.5)


def stop_all(processes: list[subprocess.Popen], timeout: float = 20.0) -> list[int]:
    """SIGTERM each process (Flower shuts down cleanly), SIGKILL what is left after `timeout`, and the
    processes they spawned (SuperExec, ServerApp, ClientApps) too. Returns every PID it stopped."""
    family = {p.pid: p for process in processes for p in _family(process.pid)}
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(family.values()), timeout=timeout)
    _kill(alive)
    for process in processes:
        process.wait(timeout=5)  # reap our own children
    return sorted(family)


def _family(pid: int) -> list[psutil.Process]:
    """The process and everything it spawned (none if it is gone)."""
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill(processes: list[psutil.Process]) -> None:
    """SIGKILL these processes and wait until they are gone."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


@contextmanager
def local_federation(
    work: Path,
    sites: list[str],
    data: str | dict[str, str],
    *,
    tls: bool = True,
    auth: bool = True,
    env: dict | None = None,
    name: str = "deployment",
    timeout: float = 90.0,
    database: str | Path | None = None,
):
    """A SuperLink and one SuperNode per site on this machine (node config `site=<site> data=<data>`,
    `data` the same for all or one per site), with TLS and SuperNode authentication; yields the
    Federation and stops every process on exit. `database`: the SuperLink's SQLite file (its state,
    registered keys and runs, then survives restart_superlink)."""
    work = Path(work).resolve()
    if auth and not tls:
        raise ValueError(
            "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth without it)"
        )
    certs = make_tls(work / "certs") if tls else {}
    port = free_port()
    address = f"127.0.0.1:{port}"
    cli_home = work / "cli-home"
    write_cli_config(cli_home, name, address, certs.get("ca.crt"))
    federation = Federation(
        name,
        address,
        work,
        flower_env({**(env or {}), "FLWR_HOME": str(cli_home)}),
        certs,
        port=port,
        auth=auth,
        env=env,
        database=Path(database).resolve() if database else None,
    )
    try:
        superlink = federation.processes["superlink"] = start_superlink(
            work, port, certs or None, auth, env, federation.database
        )
        wait_for_superlink(
            address, certs.get("ca.crt"), superlink, work / "superlink" / "superlink.log", timeout
        )
        for site in sites:
            key = None
            if auth:
                key, public = make_supernode_key(work / "certs", site)
                federation.node_ids[site] = register_supernode(public, name, federation.cli_env, name=site)
            node_config = {"site": site, "data": data[site] if isinstance(data, dict) else data}
            federation.supernodes[site] = dict(
                superlink_address=address,
                port=free_port(),
                node_config=node_config,
                ca=certs.get("ca.crt"),
                private_key=key,
                env=env,
            )
            federation.processes[f"supernode:{site}"] = start_supernode(
                work, site, **federation.supernodes[site]
            )
        wait_for_supernodes(len(sites), name, federation.cli_env, federation.processes, timeout)
        yield federation
    finally:
        federation.stopped = stop_all(list(federation.processes.values()))


def restart_superlink(federation: Federation, downtime: float = 0.0, timeout: float = 90.0) -> list[int]:
    """SIGKILL the SuperLink with everything it spawned (its ServerApps: a crash of its machine),
    wait `downtime` seconds, and start it again alike: same port, certificates, auth and
    `--database`. Returns the PIDs killed. Only a federation with a database keeps its registered
    SuperNodes and runs across this; its SuperNodes, left running, reconnect by themselves (their
    HTTP client retries with exponential backoff, at most 20 s apart)."""
    old = federation.processes["superlink"]
    killed = kill_tree(old.pid)
    old.wait(timeout=10)
    time.sleep(downtime)
    superlink = federation.processes["superlink"] = start_superlink(
        federation.work,
        federation.port,
        federation.certs or None,
        federation.auth,
        federation.env,
        federation.database,
    )
    log = federation.work / "superlink" / "superlink.log"
    wait_for_superlink(federation.address, federation.certs.get("ca.crt"), superlink, log, timeout)
    return killed


def kill_supernode(federation: Federation, site: str) -> list[int]:
    """SIGKILL a site's SuperNode and its ClientApps (kill_tree); returns the PIDs killed."""
    process = federation.processes[f"supernode:{site}"]
    killed = kill_tree(process.pid)
    process.wait(timeout=10)
    return killed


def restart_supernode(federation: Federation, site: str) -> subprocess.Popen:
    """Start a site's SuperNode again as local_federation did (same key, node config and port; its
    log goes on in the same file), after kill_supernode or a crash; kills the old one if it lives."""
    label = f"supernode:{site}"
    if federation.processes[label].poll() is None:
        kill_supernode(federation, site)
    process = federation.processes[label] = start_supernode(
        federation.work, site, **federation.supernodes[site]
    )
    return process


def is_gone(pid: int) -> bool:
    """No such process any more (a zombie awaiting its parent counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---- fault drills ----------------------------------------------------------------------------------


def submit_run(federation: Federation, overrides: dict, app_dir: Path | None = None) -> str:
    """`flwr run <app> <federation>` without waiting for the run; returns its run id (follow it with
    simulations.flower.wait_for_run / run_status, passing federation.cli_env and federation.name)."""
    make_config(overrides)  # a bad key is an error here, before anything is submitted
    answer = flwr_cli(
        ["run", app_dir or project_root(), federation.name, "--run-config", run_config_arg(overrides)],
        federation.cli_env,
        timeout=120,
    )
    return str(answer["run-id"])


def stop_run(federation: Federation, run_id: str) -> None:
    """`flwr stop`: the SuperLink ends the run at once and SuperNodes ignore its remaining messages.
    Left alone, a run whose ServerApp died ends as finished:failed when its heartbeats stop (<= 60 s)."""
    flwr_cli(["stop", run_id, federation.name], federation.cli_env)


def spawned_process(pid: int, program: str, timeout: float = 120.0) -> psutil.Process:
    """A process below `pid` running `program` (`flwr-serverapp` under a SuperLink, `flwr-clientapp`
    under a SuperNode), once one exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if any(Path(arg).name == program for arg in child.cmdline()[:2]):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise TimeoutError(f"no {program} process below PID {pid} after {timeout:.0f} s")


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and everything it spawned at once, as a crash of its machine would (no
    clean shutdown, nothing told to the SuperLink). Returns the PIDs killed."""
    family = _family(pid)
    _kill(family)
    return [process.pid for process in family]
