"""Warm connections: one OpenSSH master per host, kept between `inv` invocations, private, reused, replaced
when stale, closed by cluster.destroy and after ssh_idle seconds unused. Real sshd hosts; no timing."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from cloister.cluster import lifecycle as lib
from cloister.providers.local.machines import LocalCluster
from cloister.transport import shared
from conftest import INV, REPO, no_traceback, run_inv

RULE = "-" * 15


def folder(env) -> Path:
    return Path(lib.sharing(env.info, settings=env.settings).directory)


def sockets(env) -> list[Path]:
    where = folder(env)
    return sorted(p for p in where.iterdir() if p.is_socket()) if where.is_dir() else []


def master_pid(path: Path) -> int | None:
    """The PID of the master serving ``path`` (OpenSSH says it), None when none answers."""
    check = subprocess.run(["ssh", "-F", "none", "-o", f"ControlPath={path}", "-O", "check", "cloister"],
                           capture_output=True, text=True, timeout=30)
    found = re.search(r"pid=(\d+)", check.stderr)
    return int(found.group(1)) if check.returncode == 0 and found else None


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def accepted(env) -> dict[str, int]:
    """How many SSH connections each host's sshd has accepted so far."""
    lc = LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name)
    return {n.name: (lc.host_dir(n.name) / "sshd.log").read_text(errors="replace").count("Accepted publickey")
            for n in env.info.cluster_nodes}


def wait_until(condition, *, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def names(proc) -> set[str]:
    return {line for line in proc.stdout.splitlines() if line and not line.startswith(RULE) and "(" not in line}


def test_sockets_are_private_one_per_host_and_reused_across_invocations(own_cluster, tmp_path):
    env = own_cluster("warm", nworkers=2)
    nodes = env.info.cluster_nodes
    first = env.inv("cluster.run", "hostname")
    assert first.returncode == 0, first.stderr
    where = folder(env)
    # In the state dir, or (a state dir too deep for a socket's path, as pytest's are) in a private temporary one.
    assert where.parent in (Path(env.settings.state_dir).resolve() / "ssh", Path(f"/tmp/cloister-{os.getuid()}"))
    for directory in (where, where.parent):
        st = directory.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid(), directory
    assert len(sockets(env)) == len(nodes)
    pids = {path: master_pid(path) for path in sockets(env)}
    assert all(pids.values()), pids

    before = accepted(env)
    again = env.inv("cluster.run", "hostname")
    assert again.returncode == 0, again.stderr
    assert names(again) == names(first) == {n.name for n in nodes}
    (tmp_path / "payload.txt").write_text("warm\n")
    assert env.inv("cluster.put", str(tmp_path / "payload.txt"), "warm/").returncode == 0
    got = env.inv("cluster.get", "warm/payload.txt", str(tmp_path / "got"))
    assert got.returncode == 0, got.stderr
    assert {p.read_text() for p in (tmp_path / "got").glob("*/payload.txt")} == {"warm\n"}
    # Three more invocations, not one new SSH connection: all went over the masters the first one opened.
    assert accepted(env) == before
    assert {path: master_pid(path) for path in sockets(env)} == pids


def test_a_stale_socket_is_replaced_by_a_fresh_connection_without_an_error(own_cluster):
    env = own_cluster("stale", nworkers=1)
    assert env.inv("cluster.run", "true").returncode == 0
    victim = sockets(env)[0]
    pid = master_pid(victim)
    os.kill(pid, signal.SIGKILL)  # a master this test's own inv started; its socket file stays behind
    wait_until(lambda: gone(pid), what="the master to die")
    assert victim.is_socket() and not shared.alive(str(victim))

    proc = env.inv("cluster.run", "hostname")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert proc.stderr == ""
    assert names(proc) == {n.name for n in env.info.cluster_nodes}
    fresh = master_pid(victim)
    assert fresh and fresh != pid


def test_destroy_closes_every_master(own_cluster):
    env = own_cluster("close", nworkers=1)
    assert env.inv("cluster.run", "true").returncode == 0
    pids = [master_pid(path) for path in sockets(env)]
    assert len(pids) == len(env.info.cluster_nodes) and all(pids)
    where = folder(env)
    proc = env.inv("cluster.destroy", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not where.exists()
    wait_until(lambda: all(gone(pid) for pid in pids), what="every master to end")


def test_an_unused_master_closes_after_ssh_idle_seconds(own_cluster):
    env = own_cluster("idle", nworkers=1)
    # The masters serve while the command runs; with ssh_idle 1 they end a second after it.
    run = subprocess.Popen([INV, "cluster.run", "sleep 3"], cwd=REPO, env={**env.env(), "INVOKE_CLOISTER_SSH_IDLE": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int | None] = []
    try:
        wait_until(lambda: len(sockets(env)) == len(env.info.cluster_nodes), what="the masters")
        pids = [master_pid(path) for path in sockets(env)]
    finally:
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert pids and all(pids)
    wait_until(lambda: all(gone(pid) for pid in pids), what="idle masters to close")
    assert not any(shared.alive(str(path)) for path in sockets(env))


def test_ssh_idle_zero_keeps_no_connection(own_cluster):
    env = own_cluster("cold", nworkers=1)
    proc = _inv_with(env, "0", "cluster.run", "hostname")
    assert proc.returncode == 0, proc.stderr
    assert names(proc) == {n.name for n in env.info.cluster_nodes}
    assert sockets(env) == []


def _inv_with(env, idle: str, *args: str) -> subprocess.CompletedProcess:
    return run_inv(*args, env={**env.env(), "INVOKE_CLOISTER_SSH_IDLE": idle})


def test_socket_paths_fit_and_sharing_can_be_turned_off(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="wc"))  # pytest's own folders are too deep for a socket path
    near = shared.sharing(str(short / "s"), cluster="c", provider="local", region=None, idle=5)
    deep = shared.sharing(str(tmp_path / ("d" * 80)), cluster="c", provider="local", region=None, idle=5)
    assert near.directory.startswith(str(short / "s" / "ssh"))
    short.rmdir()
    assert deep.directory.startswith(f"/tmp/cloister-{os.getuid()}/")
    for where in (near, deep):
        assert len(where.socket("ubuntu", "198.18.255.255")) <= shared.MAX_SOCKET_PATH
    assert shared.sharing(str(tmp_path), cluster="c", provider="local", region=None, idle=0) is None
    other = shared.sharing(str(short / "s"), cluster="other", provider="local", region=None, idle=5)
    assert other.directory != near.directory


def test_ssh_failures_read_as_paramiko_failures():
    assert isinstance(shared.failure("ssh: connect to host 10.0.0.1 port 22: Connection refused\n"),
                      ConnectionRefusedError)
    assert isinstance(shared.failure("ssh: connect to host h port 22: Connection timed out"), TimeoutError)
    assert shared.failure("ssh: connect to host h port 22: No route to host").strerror == "No route to host"
    assert "refusing to connect" in str(shared.failure("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\n"
                                                       "Host key verification failed.\n"))
    assert str(shared.failure("Permission denied (publickey).")).startswith("authentication failed")
    assert isinstance(shared.failure("Connection closed by 127.0.0.1 port 22"), ConnectionResetError)
    assert shared.failure("my command wrote this and exited 255") is None


def test_exp_run_opens_no_connection_on_a_warm_cluster_and_frees_its_lock(own_cluster, tmp_path):
    env = own_cluster("wexp", nworkers=2)
    runs = {**env.env(), "INVOKE_CLOISTER_RUNS_DIR": str(tmp_path / "runs")}
    first = run_inv("exp.run", "--benchmark", "dsum", "-k", "2", "-p", "1", "--resources", "off", env=runs, timeout=180)
    assert first.returncode == 0, first.stderr
    before = accepted(env)
    # The lock and the follower were held by the first run's keeper, which ended with it: no "in flight".
    second = run_inv("exp.run", "--benchmark", "dsum", "-k", "2", "-p", "1", "--resources", "off", env=runs,
                     timeout=180)
    assert second.returncode == 0, second.stderr
    ps = run_inv("exp.ps", env=runs, timeout=60)
    assert ps.returncode == 0 and "dsum" not in ps.stdout, ps.stdout + ps.stderr  # no run left in flight
    assert accepted(env) == before
