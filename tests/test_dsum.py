"""Run examples/dsum/dsum as real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

DSUM_DIR = Path(__file__).resolve().parent.parent / "examples" / "dsum"
DSUM = DSUM_DIR / "dsum"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("DSUM_")}
    e.update(extra)
    return e


class Proc:
    """A dsum server process whose stdout/stderr go to a log file."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], **envs: str):
        self.log = tmp_path / (name + ".log")
        self._fh = open(self.log, "wb")
        self.p = subprocess.Popen([sys.executable, str(DSUM), *args], cwd=DSUM_DIR,
                                  stdout=self._fh, stderr=subprocess.STDOUT, env=env(**envs))

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 5.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(), re.M)
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError("no %r in log (rc=%s):\n%s" % (pattern, self.p.poll(), self.text()))

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait(timeout=5)
        self._fh.close()


@pytest.fixture
def procs(tmp_path):
    started: list[Proc] = []

    def start(name: str, args: list[str], **envs: str) -> Proc:
        proc = Proc(tmp_path, name, args, **envs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


def start_worker(procs, name: str, port: int | None = None, extra: list[str] = (), **envs: str):
    port = port or free_port()
    w = procs(name, ["-i", HOST, "-m", "worker", "-p", str(port), *extra], **envs)
    w.wait_for(r"^worker listening on 127\.0\.0\.1:%d$" % port)
    return w, port


def master(args: list[str], timeout: float = 10.0, mode: str = "master", **envs: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DSUM), "-m", mode, *args], cwd=DSUM_DIR,
                          capture_output=True, text=True, timeout=timeout, env=env(**envs))


def spare_loopback() -> str:
    """A loopback address of its own, so Clamor's fixed ports (40000, 50000+i) are free on it."""
    while True:
        address = "127.%d.%d.%d" % (random.randint(200, 254), random.randint(0, 255), random.randint(1, 254))
        try:
            for port in (40000, 50000, 50001):
                with socket.socket() as s:
                    s.bind((address, port))
            return address
        except OSError:
            continue


def test_files_present():
    assert os.access(DSUM, os.X_OK)
    assert DSUM.read_text().startswith("#!/usr/bin/env python3\n")
    assert re.search(r"^N\s*=\s*\d+", (DSUM_DIR / "dsum.weld").read_text(), re.M)
    subprocess.run(["sh", "-n", str(DSUM_DIR / "experiment_vars")], check=True)


def test_two_workers_and_master_sum(procs):
    _, p1 = start_worker(procs, "w1")
    _, p2 = start_worker(procs, "w2", DSUM_CHUNK="0")  # closed formula on this one
    r = master(["-i", HOST, "-t", "2", "-l", "dsum.weld", "-x", "8",
                "-w", "%s:%d,%s:%d" % (HOST, p1, HOST, p2)])
    assert r.returncode == 0, r.stderr
    n = 2000000
    line = "dsum: N=%d partitions=8 workers=2 sum=%d expected=%d ok" % (n, n * (n + 1) // 2, n * (n + 1) // 2)
    assert line in r.stdout.splitlines()
    assert re.search(r"^dsum: duration_ms=[0-9.]+ time_s=[0-9.]+$", r.stdout, re.M)
    assert re.search(r"^result: time=[0-9.]+ s$", r.stdout, re.M)
    assert r.stderr == ""


def test_weld_parsing_and_default_partitions(procs, tmp_path):
    _, p1 = start_worker(procs, "w1")
    weld = tmp_path / "small.weld"
    weld.write_text("# N = 999 is a comment\n\nN: 1_000  # trailing\n")
    r = master(["-l", str(weld), "-w", "%s:%d" % (HOST, p1)])
    assert r.returncode == 0, r.stderr
    assert "dsum: N=1000 partitions=1 workers=1 sum=500500 expected=500500 ok" in r.stdout


def test_more_partitions_than_numbers(procs, tmp_path):
    _, p1 = start_worker(procs, "w1")
    weld = tmp_path / "tiny.weld"
    weld.write_text("N = 3\n")
    r = master(["-l", str(weld), "-x", "7", "-w", "%s:%d" % (HOST, p1)])
    assert r.returncode == 0, r.stderr
    assert "sum=6 expected=6 ok" in r.stdout


def test_dead_worker_fails_fast_naming_it(procs):
    _, p1 = start_worker(procs, "w1")
    dead = free_port()
    t0 = time.monotonic()
    r = master(["-l", "dsum.weld", "-x", "4", "-w", "%s:%d,%s:%d" % (HOST, p1, HOST, dead)])
    assert time.monotonic() - t0 < 4.0
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "%s:%d" % (HOST, dead) in lines[0] and "unreachable" in lines[0]


def test_faulty_worker_gives_mismatch(procs):
    _, p1 = start_worker(procs, "w1")
    _, p2 = start_worker(procs, "w2", DSUM_FAULT="1")
    r = master(["-l", "dsum.weld", "-w", "%s:%d,%s:%d" % (HOST, p1, HOST, p2)])
    assert r.returncode == 2
    assert "MISMATCH" in r.stdout
    assert "mismatch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_manager_runs_until_sigterm_and_logs_registrations(procs):
    mport = free_port()
    m = procs("manager", ["-i", HOST, "-m", "manager", "-r", str(mport)])
    m.wait_for(r"^manager listening on 127\.0\.0\.1:%d$" % mport)
    with socket.create_connection((HOST, mport), timeout=2) as s:
        s.sendall(b'{"register": "10.0.0.9:7001"}\n')
        assert json.loads(s.makefile("rb").readline()) == {"ok": True}
    m.wait_for(r"registered worker 10\.0\.0\.9:7001")
    # a worker registers itself; the master reports the result
    _, wport = start_worker(procs, "w1", extra=["-d", HOST, "-r", str(mport)])
    m.wait_for(r"registered worker 127\.0\.0\.1:%d" % wport)
    r = master(["-l", "dsum.weld", "-d", HOST, "-r", str(mport), "-w", "%s:%d" % (HOST, wport)])
    assert r.returncode == 0, r.stderr
    m.wait_for(r"job finished")
    time.sleep(0.3)
    assert m.p.poll() is None, "manager exited on its own"
    os.kill(m.p.pid, signal.SIGTERM)
    assert m.p.wait(timeout=5) == 0


def test_worker_exits_cleanly_on_sigterm_without_manager(procs):
    w, port = start_worker(procs, "w1", extra=["-d", HOST, "-r", str(free_port())])
    w.wait_for(r"not reachable.*continuing")
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(b'{"lo": 1, "hi": 10}\n{"lo": 5, "hi": 4}\n')
        f = s.makefile("rb")
        assert json.loads(f.readline()) == {"sum": 55}
        assert json.loads(f.readline()) == {"sum": 0}
    os.kill(w.p.pid, signal.SIGTERM)
    assert w.p.wait(timeout=5) == 0


def test_worker_binds_the_given_host_only(procs):
    w, port = start_worker(procs, "w1")
    # 127.0.0.2 is loopback too on Linux; a 0.0.0.0 bind would accept there
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=1).close()


def test_clamor_convention_hosts_in_w_and_ports_from_t(procs):
    """What a Clamor binary is given: -w lists hosts without ports, workers listen on 50000+i for i < -t,
    and -d names the manager, whose port is Clamor's fixed 40000."""
    hosts = [spare_loopback(), spare_loopback()]
    manager_host = spare_loopback()
    m = procs("manager", ["-i", manager_host, "-m", "manager", "-r", "40000", "-t", "2", "-l", "dsum.weld",
                          "-w", ",".join(hosts), "-x", "4"])
    m.wait_for(r"^manager listening on %s:40000$" % re.escape(manager_host))
    for h, host in enumerate(hosts):
        for i in range(2):
            w = procs("w%d%d" % (h, i), ["-i", host, "-m", "worker", "-p", str(50000 + i), "-d", manager_host,
                                         "-l", "dsum.weld"])
            w.wait_for(r"^worker listening on %s:%d$" % (re.escape(host), 50000 + i))
    r = master(["-i", manager_host, "-p", "45000", "-d", manager_host, "-l", "dsum.weld", "-t", "2",
                "-w", ",".join(hosts), "-x", "4"])
    assert r.returncode == 0, r.stderr
    assert "partitions=4 workers=4" in r.stdout and " ok" in r.stdout
    for host in hosts:
        for i in range(2):
            m.wait_for(r"registered worker %s:%d" % (re.escape(host), 50000 + i))
    m.wait_for(r"job finished")


def test_driver_is_the_older_name_of_master(procs):
    _, port = start_worker(procs, "w1")
    r = master(["-l", "dsum.weld", "-w", "%s:%d" % (HOST, port)], mode="driver")
    assert r.returncode == 0 and "sum=" in r.stdout, r.stderr


@pytest.mark.parametrize("args, needle", [
    ([], "-m"),
    (["-m", "bogus"], "invalid choice"),
    (["-m", "worker", "-i", HOST, "-p", "1", "-z"], "unrecognized"),
    (["-m", "worker", "-i", HOST], "-p PORT"),
    (["-m", "master", "-l", "dsum.weld"], "-w"),
    (["-m", "master", "-w", "hostonly", "-l", "dsum.weld"], "hostonly names a host without a port: give -t NPROCS"),
    (["-m", "master", "-w", "127.0.0.1:1", "-l", "missing.weld"], "missing.weld"),
    (["-m", "master", "-w", "h:notaport", "-l", "dsum.weld"], "h:notaport"),
])
def test_usage_errors_are_one_line_exit_1(args, needle):
    r = subprocess.run([sys.executable, str(DSUM), *args], cwd=DSUM_DIR,
                       capture_output=True, text=True, timeout=10, env=env())
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsum: error:") and needle in lines[0], r.stderr
    assert r.stdout == ""
