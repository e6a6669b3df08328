"""The local provider (SPEC section 5) on real sshd hosts: isolation, idempotency, destroy, host keys, scale."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloister.cluster import lifecycle as lib
from cloister.transport import hosts
from cloister.errors import ProviderError
from cloister.providers.local.machines import LocalCluster
from cloister.providers.local.subnets import CLAIMS_DIR
from conftest import INV, REPO


def sh(info, node, command: str):
    """Run ``command`` on one node; the Result (warn=True, so a non-zero exit is returned, not raised)."""
    with hosts.connection(info, node, connect_timeout=5) as cxn:
        return cxn.run(command, timeout=20)


def local(env) -> LocalCluster:
    return LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name)


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_every_host_has_its_own_hostname(local_cluster):
    info = local_cluster.info
    names = {node.host: sh(info, node, "hostname").stdout.strip() for node in info.nodes}
    assert names == {node.host: node.name for node in info.nodes}
    assert len(set(names.values())) == len(info.nodes) >= 3


@pytest.mark.parametrize("folder", ["~", "/tmp"])
def test_a_file_on_one_host_is_not_on_another(local_cluster, folder):
    info = local_cluster.info
    writer, *others = info.nodes
    path = f"{folder}/isolation-{uuid.uuid4().hex}"
    assert sh(info, writer, f"echo here > {path} && test -s {path}").exited == 0
    try:
        seen = [node.name for node in others if sh(info, node, f"test -e {path}").exited == 0]
        assert seen == []
        # Nor is it in this machine's own /tmp or /home: each host has its own bind-mounted copies.
        assert not Path(path.replace("~", "/home/ubuntu")).exists()
    finally:
        sh(info, writer, f"rm -f {path}")


def test_processes_of_one_host_are_invisible_to_another(local_cluster):
    info = local_cluster.info
    one, two = info.workers[0], info.workers[1]
    start = sh(info, one, "cd /tmp; nohup sleep 300 > /dev/null 2>&1 < /dev/null &")
    assert start.exited == 0
    try:
        pids = sh(info, one, "pgrep -x sleep").stdout.split()
        assert len(pids) == 1
        # Inside its host, ps sees sshd as PID 1 and the sleep; the neighbour sees neither the sleep...
        assert sh(info, one, "ps -o comm= -p 1").stdout.strip() == "sshd"
        assert sh(info, two, "pgrep -x sleep").exited == 1
        assert "sleep" not in sh(info, two, "ps -e -o comm=").stdout.split()
        # ...nor can it kill it by name.
        assert sh(info, two, "pkill -x sleep").exited == 1
        assert sh(info, one, "pgrep -x sleep").stdout.split() == pids
    finally:
        sh(info, one, "pkill -x sleep")
    assert sh(info, one, "pgrep -x sleep").exited == 1


def test_launch_again_finds_the_same_cluster(local_cluster):
    lc = local(local_cluster)
    pids = {node.name: lc.init_pid(node.name) for node in local_cluster.info.nodes}
    again = lib.launch(local_cluster.cfg, settings=local_cluster.settings)
    assert again.created is False
    assert again.info.nodes == local_cluster.info.nodes
    # The very same host processes: nothing was restarted.
    assert {node.name: lc.init_pid(node.name) for node in again.info.nodes} == pids


def test_launch_with_another_size_is_refused(local_cluster):
    workers = len(local_cluster.info.workers)
    with pytest.raises(ProviderError) as err:
        lib.launch(local_cluster.cfg, settings=local_cluster.settings, nworkers=workers + 2)
    message = str(err.value)
    assert f"running with {workers} workers, not {workers + 2}" in message
    assert f"inv cluster.resize --nworkers {workers + 2} changes its size" in message and "\n" not in message
    assert local(local_cluster).dead_hosts() == []


def test_destroy_ends_every_process_and_removes_the_state(own_cluster):
    env = own_cluster("gone", nworkers=2)
    lc = local(env)
    names = [node.name for node in env.info.nodes]
    inits = {name: lc.init_pid(name) for name in names}
    assert all(pid and running(pid) for pid in inits.values())
    namespaces = {pid_namespace(pid) for pid in inits.values()}
    assert len(namespaces) == len(names)
    # A detached process on a worker: destroy must end it too, through its host's PID 1.
    worker = env.info.workers[0]
    assert sh(env.info, worker, "cd /tmp; nohup sleep 301 > /dev/null 2>&1 < /dev/null &").exited == 0
    members = [int(p) for p in os.listdir("/proc") if p.isdigit() and pid_namespace(int(p)) in namespaces]
    assert len(members) > len(names), "the detached sleep is not among the cluster's processes"

    lib.destroy(env.cfg, settings=env.settings)

    assert [pid for pid in inits.values() if running(pid)] == []
    assert [pid for pid in members if running(pid) and pid_namespace(pid) in namespaces] == []
    assert not lc.dir.exists()
    assert not (Path(env.settings.servers_dir) / "cluster.json").exists()
    assert lc.exists() is False


def wrong_key_line(address: str) -> str:
    public = Ed25519PrivateKey.generate().public_key()
    return f"{address} " + public.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode() + "\n"


def test_a_wrong_host_key_is_refused(local_cluster, tmp_path):
    info = local_cluster.info
    master, worker = info.master, info.workers[0]
    real = Path(info.known_hosts).read_text()
    # Everyone keeps their real key except the master, whose line is replaced by a stranger's.
    forged = "".join(line for line in real.splitlines(keepends=True) if not line.startswith(master.host + " "))
    forged += wrong_key_line(master.host)
    known = tmp_path / "known_hosts"
    known.write_text(forged)
    tampered = dataclasses.replace(info, known_hosts=str(known))

    grp = hosts.group(tampered, [master, worker], connect_timeout=5)
    try:
        result = hosts.call(grp, lambda cxn: cxn.run("hostname", timeout=10))
    finally:
        grp.close()
    failed = hosts.failures(result)
    assert list(failed) == [master.host]
    assert "host key mismatch" in failed[master.host] and "refusing" in failed[master.host]
    assert {cxn.host: v.stdout.strip() for cxn, v in result.items() if cxn.host != master.host} == \
        {worker.host: worker.name}
    # A refused key is not learnt.
    assert known.read_text() == forged


def test_sixteen_hosts_launch_and_destroy(own_cluster, capsys):
    start = time.monotonic()
    env = own_cluster("big", nworkers=15)
    launched = time.monotonic() - start
    info = env.info
    assert len(info.cluster_nodes) == 16
    outputs = lib.run(info, "hostname", nodes=info.cluster_nodes, settings=env.settings)
    assert sorted(o.stdout.strip() for o in outputs) == sorted(n.name for n in info.cluster_nodes)
    start = time.monotonic()
    lib.destroy(env.cfg, settings=env.settings)
    destroyed = time.monotonic() - start
    assert local(env).exists() is False
    with capsys.disabled():
        print(f"\n16 hosts: launch (incl. SSH wait and copy-dns) {launched:.2f}s, destroy {destroyed:.2f}s")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("when", ["hosts starting", "hosts up"])
def test_an_interrupted_launch_leaves_nothing_running(tmp_path, when):
    config = tmp_path / "intr.json"
    config.write_text(json.dumps({"cluster_name": "intr", "provider": "local", "nworkers": 30, "dev_host": False,
                                  "image": str(REPO / "examples" / "image"), "ttl": 0}))
    state = tmp_path / "state"
    env = {**os.environ, "INVOKE_CLOISTER_STATE_DIR": str(state), "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "srv")}
    proc = subprocess.Popen([INV, "cluster.launch", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hosts_dir = state / "local" / "intr" / "hosts"
    deadline = time.monotonic() + 30
    wanted = 5 if when == "hosts starting" else 31
    while time.monotonic() < deadline and len(list(hosts_dir.glob("*/init.pid" if wanted == 31 else "*/sshd.log"))) < wanted:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    assert err.strip().splitlines()[-1].startswith("interrupted: launch of 'intr' stopped")
    assert _processes_mentioning(str(hosts_dir)) == []
    # Nor any address claim (and so no bridge) of the cluster.
    claims = [c for c in CLAIMS_DIR.iterdir() if not c.name.startswith(".")]
    assert [c.name for c in claims if c.read_text().strip() == str((state / "local" / "intr").resolve())] == []
    assert not (state / "local" / "intr").exists()
    assert not (tmp_path / "srv" / "cluster.json").exists()


def test_more_ctrl_c_cannot_cut_the_launch_clean_up_short(tmp_path):
    """Ctrl-C once the hosts are up, then again and again while the clean-up ends them (a terminal sends
    SIGINT to the whole process group): every host is ended, the clean-up says once that it is cleaning
    up, and the last line counts what was really ended."""
    config = tmp_path / "rbtwice.json"
    config.write_text(json.dumps({"cluster_name": "rbtwice", "provider": "local", "nworkers": 12, "dev_host": False,
                                  "image": str(REPO / "examples" / "image"), "ttl": 0}))
    state = tmp_path / "state"
    env = {**os.environ, "INVOKE_CLOISTER_STATE_DIR": str(state), "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "srv")}
    proc = subprocess.Popen([INV, "cluster.launch", "--config", str(config)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hosts_dir = state / "local" / "rbtwice" / "hosts"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(hosts_dir.glob("*/init.pid"))) < 13:
        time.sleep(0.01)
    presses = 0
    try:
        while proc.poll() is None and presses < 40:
            os.killpg(proc.pid, signal.SIGINT)
            presses += 1
            time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
        assert presses > 1, "the launch ended before a second Ctrl-C"
        assert proc.returncode == 130, out + err
        assert "Traceback" not in out + err and "Socket exception" not in out + err
        lines = err.strip().splitlines()
        assert lines.count("cleaning up, please wait") <= 1, err
        assert lines[-1] == "interrupted: launch of 'rbtwice' stopped; ended the 13 hosts it had started", err
        assert _processes_mentioning(str(hosts_dir)) == []
        assert not (state / "local" / "rbtwice").exists()
    finally:  # a failure here must not leave 13 hosts behind
        LocalCluster(state_root=state, cluster="rbtwice").destroy()
