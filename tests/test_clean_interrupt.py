"""Ctrl-C in the tasks that touch hosts: one SIGINT to an `inv` started in its own process group (as a
terminal sends it) ends the task with exit 130 and one line, and leaves nothing running on any host."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from cloister.transport import hosts
from cloister.providers.local.machines import LocalCluster
from conftest import INV, REPO, ClusterEnv

RULE = "-" * 15


class Inv:
    """An `inv` subprocess in its own process group whose output is collected as it comes."""

    def __init__(self, env: ClusterEnv, *args: str, **extra_env: str):
        self.proc = subprocess.Popen([INV, *args], cwd=REPO, env={**env.env(), **extra_env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def interrupt(self, *, within: float = 15) -> int:
        """SIGINT to the whole process group, as Ctrl-C in a terminal; the exit status."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout=within)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for reader in self.readers:
            reader.join(5)
        return code

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


def processes(env: ClusterEnv, nodes, pattern: str) -> dict[str, list[str]]:
    """host -> the command lines on that host (its own PID namespace) that match ``pattern`` in full."""
    found: dict[str, list[str]] = {}
    with hosts.group(env.info, nodes, connect_timeout=5) as grp:
        result = hosts.check(hosts.call(grp, lambda cxn: cxn.run("ps -eo args=", timeout=20)))
    for cxn, value in result.items():
        found[cxn.host] = [line for line in value.stdout.splitlines() if re.fullmatch(pattern, line.strip())]
    return found


def wait_until(condition, *, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def left_on_hosts(env: ClusterEnv, nodes, pattern: str, *, grace: float = 5) -> dict[str, list[str]]:
    """What still matches ``pattern`` after ``grace`` seconds (the kill on a host may take a moment)."""
    deadline = time.monotonic() + grace
    while True:
        left = {host: lines for host, lines in processes(env, nodes, pattern).items() if lines}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def home(env: ClusterEnv, node) -> Path:
    return LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name).host_dir(node.name) / "home"


def test_ctrl_c_in_cluster_run_kills_every_remote_command_and_prints_what_came(local_cluster):
    nodes = local_cluster.info.cluster_nodes
    run = Inv(local_cluster, "cluster.run", "echo started on $(hostname); sleep 7777 & sleep 7777; wait")
    try:
        wait_until(lambda: all(len(v) == 2 for v in processes(local_cluster, nodes, "sleep 7777").values()),
                   what="sleep 7777 twice on every host")
    finally:
        code = run.interrupt()
    assert code == 130, run.stderr
    assert run.stderr.splitlines() == [f"interrupted: the command was stopped on {len(nodes)} hosts"]
    # Every host's block shows what it had printed so far.
    blocks = re.findall(rf"{RULE}\n(\S+) \((\d+)\)\n{RULE}\nerror: interrupted\n(.*?)(?=\n{RULE}|\Z)",
                        run.stdout, re.S)
    printed = {host: body.strip() for names, _, body in blocks for host in names.split(",")}
    assert printed == {n.host: f"started on {n.name}" for n in nodes}, run.stdout
    # Both sleeps are gone, the one in the background too: the whole process group was killed.
    assert left_on_hosts(local_cluster, nodes, "sleep 7777") == {}


def test_ctrl_c_stops_streaming_at_once(local_cluster):
    nodes = local_cluster.info.cluster_nodes
    run = Inv(local_cluster, "cluster.run", "--stream", "yes tick-7777")
    try:
        wait_until(lambda: run.out and all(processes(local_cluster, nodes, "yes tick-7777").values()),
                   what="every host streaming")
    finally:
        code = run.interrupt()
    assert code == 130, run.stderr
    assert run.stderr.splitlines() == [f"interrupted: the command was stopped on {len(nodes)} hosts"]
    # Whole lines, each under its host's prefix; a line a host had not finished comes last, cut short.
    for line in run.stdout.splitlines():
        match = re.fullmatch(r"\[(\S+)\] (.*)", line)
        assert match and "tick-7777".startswith(match.group(2)), line
    assert left_on_hosts(local_cluster, nodes, "yes tick-7777") == {}


def test_ctrl_c_in_put_stops_every_rsync(local_cluster, tmp_path):
    nodes = local_cluster.info.cluster_nodes
    big = tmp_path / "big-7777.bin"
    with open(big, "wb") as out:
        out.truncate(4 << 30)  # sparse: 4 GiB that no node receives before the interrupt
    run = Inv(local_cluster, "cluster.put", str(big), "interrupted-put/")
    try:
        wait_until(lambda: all(any((home(local_cluster, n) / "interrupted-put").glob(".big-7777*")) for n in nodes),
                   what="every node receiving")
    finally:
        code = run.interrupt()
    assert code == 130, run.stderr
    assert run.stderr.splitlines() == ["interrupted: put stopped (Ctrl-C)"]
    assert not local_rsyncs(str(big))
    assert left_on_hosts(local_cluster, nodes, r"rsync .*") == {}


def test_ctrl_c_in_get_stops_every_rsync(local_cluster, tmp_path):
    master = local_cluster.info.master
    big = home(local_cluster, master) / "big-7777.bin"
    with open(big, "wb") as out:
        out.truncate(4 << 30)
    try:
        run = Inv(local_cluster, "cluster.get", "--role", "master", "big-7777.bin", str(tmp_path / "got"))
        try:
            wait_until(lambda: any((tmp_path / "got" / master.host).glob(".big-7777*")), what="the download")
        finally:
            code = run.interrupt()
        assert code == 130, run.stderr
        assert run.stderr.splitlines() == ["interrupted: get stopped (Ctrl-C)"]
        assert not local_rsyncs("big-7777.bin")
        assert left_on_hosts(local_cluster, [master], r"rsync .*") == {}
    finally:
        big.unlink()


def local_rsyncs(fragment: str, *, grace: float = 5) -> list[str]:
    """This machine's rsync/ssh command lines that mention ``fragment``, after up to ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            text = " ".join(a.decode(errors="replace") for a in args)
            if args[0] in (b"rsync", b"ssh") and fragment in text and state != "Z":
                found.append(text)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.mark.parametrize("flags", [[], ["--stream"]])
def test_a_command_that_ends_normally_keeps_its_background_children(local_cluster, flags):
    """The group is killed only when the session goes away: a daemon a command starts on purpose stays."""
    master = local_cluster.info.master
    proc = local_cluster.inv("cluster.run", *flags, "--role", "master",
                             "nohup sleep 7778 >/dev/null 2>&1 </dev/null & echo started")
    assert proc.returncode == 0, proc.stderr
    try:
        assert processes(local_cluster, [master], "sleep 7778")[master.host] == ["sleep 7778"]
    finally:
        local_cluster.inv("cluster.run", "--role", "master", "pkill -x -f 'sleep 7778'")


def test_ctrl_c_in_exp_make_stops_the_build_everywhere(local_cluster, tmp_path):
    """exp.* tasks get the same: the build runs through cluster.run's machinery, the exit is the decorator's."""
    nodes = local_cluster.info.cluster_nodes
    registry = yaml.safe_load((REPO / "experiments.yaml").read_text())
    registry["benchmarks"] = {"slowmake": {"dir": "~", "binary": "./none", "build": "echo building; sleep 7777"}}
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(registry))
    run = Inv(local_cluster, "exp.make", "--benchmark", "slowmake",
              INVOKE_CLOISTER_EXPERIMENTS=str(tmp_path / "experiments.yaml"),
              INVOKE_CLOISTER_RUNS_DIR=str(tmp_path / "runs"))
    try:
        wait_until(lambda: all(processes(local_cluster, nodes, "sleep 7777").values()), what="the build everywhere")
    finally:
        code = run.interrupt()
    assert code == 130, run.stderr
    assert run.stderr.splitlines() == ["interrupted: make stopped (Ctrl-C)"]
    assert left_on_hosts(local_cluster, nodes, "sleep 7777") == {}


def test_paramikos_socket_errors_never_reach_the_terminal():
    """paramiko's transport thread logs a reset connection ("Socket exception: ...") on its logger; with
    no handler of its own that would print through logging's last resort in the middle of a task."""
    import sys

    code = ("import logging, cloister.transport.hosts; "
            "logging.getLogger('paramiko.transport').error('Socket exception: Connection reset by peer (104)'); "
            "logging.getLogger('cloister').warning('cloister itself still speaks')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "cloister itself still speaks\n", proc.stderr
