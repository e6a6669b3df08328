"""exp.* through `inv` subprocesses against the real sshd hosts of the local cluster (no SSH mocks).

Every test writes its runs into its own tmp_path (INVOKE_CLOISTER_RUNS_DIR) and uses a test registry
(INVOKE_CLOISTER_EXPERIMENTS) made of the repository's defaults and dsum plus a few test benchmarks
that live in the dsum directory every local host has. Whatever a test starts is killed at its end.
"""

from __future__ import annotations

import json
import queue
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import cloister
from cloister.cluster import lifecycle as lib
from cloister.transport import hosts
from cloister import runs as runlib
from cloister.runs.experiments import load_registry
from cloister.providers.local.machines import LocalCluster
from conftest import INV, REPO, no_traceback, one_line_error

DSUM_DIR = "~/clamor/experiments/cpp/dsum"
OTHER_DIR = "~/other-bench"
# dsum's master reading dsum.weld whatever the benchmark is called.
DSUM_MASTER = ("{binary} -i {host} -p {master_port} -m master -d {manager} -l dsum.weld -t {nprocs} "
               "-w {worker_hosts} -x {partitions} {args}")
N = 2000000
SUM_LINE = "dsum: N={n} partitions={parts} workers={parts} sum={s} expected={s} ok"
RUN_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")
# Anything a test run may leave behind: dsum processes (and their bash wrappers) and the slow master.
LEFTOVER_PATTERN = "[d]sum -i|[s]leep 37"
OTHER_PORTS = {"manager": 41000, "master": 46000, "worker_base": 51000}


def make_registry(path: Path, *, cluster_hosts: list[str]) -> Path:
    data = yaml.safe_load((REPO / "experiments.yaml").read_text())
    common = {"dir": DSUM_DIR, "binary": "./dsum"}
    bad_host = cluster_hosts[-1]
    data["benchmarks"].update({
        # every worker exits 1 at start-up after one line on stderr
        "crash": {**common, "ready_timeout": 60, "commands": {"worker": "sh -c 'echo boom >&2; exit 1'"}},
        # a master that never ends by itself
        "slow": {**common, "commands": {"master": "sh -c 'echo master started; exec sleep 37'"}},
        # workers answer wrong sums: the master exits 2
        "faulty": {**common, "env": {"DSUM_FAULT": "1"}, "commands": {"master": DSUM_MASTER}},
        # readiness by a log line instead of a listening port
        # \d and (?:...) are Python re syntax (not grep -E): the log is matched with the syntax it is validated with.
        "logready": {**common, "ready": {"log": r"^worker listening on (?:\d+\.){3}\d+:\d+$"}, "commands": {"master": DSUM_MASTER}},
        # the same binary name in another directory, on other ports
        "other": {"dir": OTHER_DIR, "binary": "./dsum", "ports": OTHER_PORTS},
        # workers that listen, then exit 7 while the master is still running
        "dying": {"dir": "~/dying", "binary": "./dying.sh",
                  "commands": {"worker": "{binary} {host} {port}", "master": "sleep 3"}},
        # a build that fails on one host only
        "mkfail": {**common, "build": f'if [ "$(hostname)" = {bad_host} ]; then echo oops >&2; exit 2; fi'},
    })
    path.write_text(yaml.safe_dump(data))
    return path


class Exp:
    """`inv` aimed at the shared local cluster with a test registry and runs/ in tmp_path."""

    def __init__(self, cluster, tmp_path: Path):
        self.cluster = cluster
        self.info = cluster.info
        self.runs_dir = tmp_path / "runs"
        self.registry_path = make_registry(tmp_path / "experiments.yaml",
                                           cluster_hosts=[n.name for n in cluster.info.cluster_nodes])
        self.registry = load_registry(self.registry_path)
        self.started = False  # set when a role may have been left running (runs/ tells about exp.run)

    def env(self, **extra: str) -> dict[str, str]:
        env = self.cluster.env()
        env.update(INVOKE_CLOISTER_RUNS_DIR=str(self.runs_dir), INVOKE_CLOISTER_EXPERIMENTS=str(self.registry_path),
                   COLUMNS="200")
        env.update(extra)
        return env

    def inv(self, *args: str, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
        if args and args[0] in ("exp.workers", "exp.master", "exp.manager") and "--local" not in args:
            self.started = True
        return subprocess.run([INV, *args], cwd=REPO, env=self.env(**extra), capture_output=True, text=True,
                              timeout=timeout)

    def remote(self, command: str, nodes=None) -> dict[str, str]:
        """stdout of ``command`` per host (every cluster node by default); a failure to connect fails the test."""
        outputs = lib.run(self.info, command, nodes=nodes or self.info.cluster_nodes, settings=self.cluster.settings,
                          timeout=30)
        for out in outputs:
            assert out.error is None, f"[{out.host}] {out.error}"
        return {out.host: out.stdout for out in outputs}

    def leftovers(self, pattern: str = LEFTOVER_PATTERN) -> dict[str, str]:
        """Processes matching ``pattern`` still running, per host (empty when none anywhere)."""
        found = self.remote(f"pgrep -af {shlex.quote(pattern)} || true")
        return {host: text for host, text in found.items() if text.strip()}

    def leftovers_after_a_lost_session(self, pattern: str, *, within: float = 20.0) -> dict[str, str]:
        """``leftovers`` once the processes of a session that just died have been ended: their watcher sees
        the session's EOF at once, but ends them with TERM and a grace before KILL, later on a loaded host."""
        deadline = time.monotonic() + within
        while True:
            found = self.leftovers(pattern)
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def killall(self, *names: str) -> None:
        grp = hosts.group(self.info, self.info.cluster_nodes, connect_timeout=5)
        try:
            for name in names:
                runlib.killall(grp, bench=self.registry.get(name))
        finally:
            grp.close()

    def only_run(self, benchmark: str) -> tuple[str, Path]:
        runs = sorted((self.runs_dir / benchmark).iterdir())
        assert len(runs) == 1, runs
        return runs[0].name, runs[0]

    def record(self, benchmark: str) -> dict:
        _, path = self.only_run(benchmark)
        return json.loads((path / "run.json").read_text())


@pytest.fixture
def exp(local_cluster, tmp_path):
    e = Exp(local_cluster, tmp_path)
    try:
        yield e
    finally:
        if e.started or e.runs_dir.exists():
            e.killall("dsum", "slow", "other")


def accepted(cluster) -> dict[str, int]:
    """'Accepted publickey' lines in each host's sshd.log: SSH connections opened so far, per host name."""
    lc = LocalCluster(state_root=cluster.settings.state_dir, cluster=cluster.cfg.cluster_name)
    return {node.name: (lc.host_dir(node.name) / "sshd.log").read_text(errors="replace").count("Accepted publickey")
            for node in cluster.info.nodes}


@contextmanager
def no_ssh(cluster):
    before = accepted(cluster)
    yield
    assert accepted(cluster) == before, "an SSH connection was opened"


def listening(host: str, port: int) -> bool:
    """All local hosts share one network namespace: the test can connect to any host's ports directly."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def log_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.log")}


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("k, p", [(2, 2), (4, 1)])
def test_dsum_end_to_end(exp, k, p):
    info = exp.info
    before = accepted(exp.cluster)
    start = time.monotonic()
    proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", str(k), "-p", str(p))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    after = accepted(exp.cluster)

    run_id, run_dir = exp.only_run("dsum")
    assert RUN_ID_RE.fullmatch(run_id)
    s = N * (N + 1) // 2
    sum_line = SUM_LINE.format(n=N, parts=k * p, s=s)
    assert f"[master] {sum_line}" in proc.stdout.splitlines()

    master, workers = info.master, info.workers[:k]
    # Logs of every role, every name carrying this run's id, in one folder per host.
    assert log_names(run_dir / master.host) == {f"manager_{run_id}.log", f"master_{run_id}.log"}
    assert sum_line in (run_dir / master.host / f"master_{run_id}.log").read_text()
    for h, node in enumerate(workers):
        names = {f"worker{h * p + j}_{run_id}.log" for j in range(p)}
        assert log_names(run_dir / node.host) == names
        for j in range(p):
            text = (run_dir / node.host / f"worker{h * p + j}_{run_id}.log").read_text()
            assert f"worker listening on {node.host}:{50000 + j}" in text
    assert {d.name for d in run_dir.iterdir() if d.is_dir()} == {master.host, *(w.host for w in workers)}

    text = (run_dir / "run.json").read_text()
    assert runlib.RunRecord.from_json(text).to_json() == text
    record = json.loads(text)
    assert record["benchmark"] == "dsum" and record["run_id"] == run_id
    assert (record["k"], record["p"], record["status"], record["error"]) == (k, p, "ok", None)
    assert record["hosts"] == {"master": master.host, "workers": [w.host for w in workers]}
    assert record["config"] == str(exp.cluster.config_path) and record["cluster"] == info.cluster_name
    assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"])
    assert record["cloister_version"] == cloister.__version__
    assert record["started"] < record["ended"]
    assert set(record["exit_codes"]) == {"manager", "master", *(f"worker{i}" for i in range(k * p))}
    assert record["exit_codes"]["master"] == 0
    assert record["failures"] == {} and isinstance(record["metric"], float)
    assert 0 < record["timings"]["master_s"] < record["timings"]["total_s"] < elapsed

    assert exp.leftovers() == {}
    # At most one connection per host of the run (none when an earlier task left it warm), reused for
    # everything; no other host contacted.
    opened = {name: after[name] - before[name] for name in after}
    in_run = {master.name, *(w.name for w in workers)}
    assert all(opened[name] <= 1 for name in in_run), opened
    assert all(opened[name] == 0 for name in opened if name not in in_run), opened


def test_a_wrong_result_fails_the_run(exp):
    proc = exp.inv("exp.run", "--benchmark", "faulty", "-k", "1", "-p", "2")
    assert proc.returncode != 0
    no_traceback(proc)
    assert f"[{exp.info.master.host}] master exited with 2" in proc.stderr
    assert "MISMATCH" in proc.stdout
    record = exp.record("faulty")
    assert record["status"] == "failed" and record["exit_codes"]["master"] == 2
    assert exp.leftovers() == {}


DYING_WORKER = """#!/bin/sh
python3 - "$1" "$2" <<'PY'
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
time.sleep(1)
PY
exit 7
"""


def test_a_worker_dying_during_the_run_fails_it(exp):
    exp.remote(f"mkdir -p ~/dying && printf %s {shlex.quote(DYING_WORKER)} > ~/dying/dying.sh "
               "&& chmod +x ~/dying/dying.sh")
    try:
        proc = exp.inv("exp.run", "--benchmark", "dying", "-k", "2", "-p", "1", "--no-manager")
        assert proc.returncode != 0
        no_traceback(proc)
        for h, node in enumerate(exp.info.workers[:2]):
            assert f"[{node.host}] worker{h} died during the run (exit 7)" in proc.stderr, proc.stderr
        record = exp.record("dying")
        assert record["status"] == "failed" and record["exit_codes"]["master"] == 0
        assert {record["exit_codes"]["worker0"], record["exit_codes"]["worker1"]} == {7}
        run_id, run_dir = exp.only_run("dying")
        assert (run_dir / exp.info.workers[0].host / "final-state").exists()
    finally:
        exp.remote("rm -rf ~/dying")


def test_readiness_by_log_line(exp):
    proc = exp.inv("exp.run", "--benchmark", "logready", "-k", "1", "-p", "2")
    assert proc.returncode == 0, proc.stderr
    assert exp.record("logready")["status"] == "ok"
    assert exp.leftovers() == {}


# ---------------------------------------------------------------- failures: fast, named, cleaned up


def test_a_worker_crashing_at_start_up_fails_fast(exp):
    start = time.monotonic()
    proc = exp.inv("exp.run", "--benchmark", "crash", "-k", "2", "-p", "2")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    no_traceback(proc)
    assert elapsed < 20, f"took {elapsed:.1f}s: waited for the ready_timeout (60 s) instead of failing fast"
    # names every host and every process of each, each with its log tail
    errors = sorted(line for line in proc.stderr.splitlines() if "exited at start-up" in line)
    assert len(errors) == 2, proc.stderr
    for line, (h, node) in zip(errors, enumerate(exp.info.workers[:2])):
        assert line == (f"[{node.host}] worker{2 * h} exited at start-up with exit 1: boom; "
                        f"worker{2 * h + 1} exited at start-up with exit 1: boom"), line
    assert "0/" not in proc.stderr.splitlines()[-1], "the summary must not say no host failed"
    record = exp.record("crash")
    assert record["status"] == "failed" and "boom" in record["error"]
    assert "running" not in {r["status"] for r in record["roles"]}, record["roles"]
    run_id, run_dir = exp.only_run("crash")
    crashed = run_dir / exp.info.workers[0].host / f"worker0_{run_id}.log"
    assert "boom" in crashed.read_text()
    assert (run_dir / exp.info.master.host / f"manager_{run_id}.log").exists()
    assert exp.leftovers() == {}


def test_master_timeout_is_killed_and_logs_are_still_collected(exp):
    start = time.monotonic()
    proc = exp.inv("exp.run", "--benchmark", "slow", "-k", "2", "-p", "1", "--timeout", "1")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    no_traceback(proc)
    assert 1 <= elapsed < 30, f"took {elapsed:.1f}s: the master (sleep 37) was not killed at the 1 s timeout"
    assert "[master] master started" in proc.stdout
    assert "timeout" in proc.stderr
    record = exp.record("slow")
    assert record["status"] == "timeout" and record["ended"]
    run_id, run_dir = exp.only_run("slow")
    assert "master started" in (run_dir / exp.info.master.host / f"master_{run_id}.log").read_text()
    for h, node in enumerate(exp.info.workers[:2]):
        assert (run_dir / node.host / f"worker{h}_{run_id}.log").exists()
    assert exp.leftovers() == {}


def test_sigint_kills_the_remote_processes_and_collects_the_logs(exp):
    proc = subprocess.Popen([INV, "exp.run", "--benchmark", "slow", "-k", "2", "-p", "2"], cwd=REPO, env=exp.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    stdout: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            stdout.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "inv ended before the master started: " + proc.stderr.read()
            if line.startswith("[master] master started"):
                break
        # The master runs and the workers listen: now Ctrl-C.
        assert any(listening(w.host, 50000) for w in exp.info.workers[:2])
        # Ctrl-C, and again and again while the clean-up runs: it finishes all the same.
        presses = 0
        while proc.poll() is None and presses < 40:
            proc.send_signal(signal.SIGINT)
            presses += 1
            time.sleep(0.05)
        stderr = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert proc.returncode != 0
    assert "Traceback" not in stderr + "".join(stdout), stderr
    assert "interrupted" in stderr
    assert presses > 1 and stderr.splitlines().count("cleaning up, please wait") <= 1, stderr
    record = exp.record("slow")
    assert record["status"] == "interrupted" and record["ended"]
    assert {r["status"] for r in record["roles"]} <= {"killed", "ok"}, record["roles"]
    run_id, run_dir = exp.only_run("slow")
    assert log_names(run_dir / exp.info.master.host) == {f"manager_{run_id}.log", f"master_{run_id}.log"}
    for h, node in enumerate(exp.info.workers[:2]):
        assert log_names(run_dir / node.host) == {f"worker{h * 2 + j}_{run_id}.log" for j in range(2)}
    assert exp.leftovers() == {}
    assert not any(listening(w.host, port) for w in exp.info.workers[:2] for port in (50000, 50001))


# ---------------------------------------------------------------- killall


def test_killall_frees_the_ports_and_spares_another_benchmark(exp):
    info = exp.info
    w1, w2 = info.workers[:2]
    exp.remote(f"rm -rf {OTHER_DIR} && cp -r {DSUM_DIR} {OTHER_DIR} && cp {OTHER_DIR}/dsum.weld {OTHER_DIR}/other.weld")
    try:
        proc = exp.inv("exp.workers", "--benchmark", "other", "-k", "2", "-p", "2")
        assert proc.returncode == 0, proc.stderr
        proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", "2", "-p", "2", "--keep")
        assert proc.returncode == 0, proc.stderr
        dsum_ports = [(info.master.host, 40000)] + [(w.host, 50000 + j) for w in (w1, w2) for j in range(2)]
        other_ports = [(w.host, 51000 + j) for w in (w1, w2) for j in range(2)]
        assert all(listening(*hp) for hp in dsum_ports + other_ports)

        proc = exp.inv("exp.killall", "--benchmark", "dsum")
        assert proc.returncode == 0, proc.stderr
        no_traceback(proc)
        for host in (info.master.host, w1.host, w2.host):
            assert re.search(rf"^\[{re.escape(host)}\] dsum: killed [1-9]\d* process", proc.stdout, re.M), proc.stdout
        assert not any(listening(*hp) for hp in dsum_ports)
        assert all(listening(*hp) for hp in other_ports)
        still = exp.leftovers("[d]sum -i")
        assert set(still) == {w1.host, w2.host}
        assert all("other.weld" in text and "dsum.weld" not in text for text in still.values()), still

        # the ports are free: a new run starts right away
        proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", "2", "-p", "2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert all(listening(*hp) for hp in other_ports)

        proc = exp.inv("exp.killall", "--benchmark", "other")
        assert proc.returncode == 0, proc.stderr
        assert not any(listening(*hp) for hp in other_ports)
        assert exp.leftovers() == {}
        # idempotent: nothing to kill the second time
        proc = exp.inv("exp.killall", "--benchmark", "dsum")
        assert proc.returncode == 0, proc.stderr
        assert "killed" not in proc.stdout and "nothing left running" in proc.stdout
    finally:
        exp.killall("dsum", "other")
        exp.remote(f"rm -rf {OTHER_DIR}")


def test_killall_ends_a_role_whose_command_does_not_name_the_binary(exp):
    # The slow master is `sh -c ... sleep 37`: neither its name nor its directory give it away,
    # only the run folder recorded in its wrapper's environment does.
    proc = exp.inv("exp.run", "--benchmark", "slow", "-k", "1", "-p", "1", "--keep", "--timeout", "1")
    try:
        assert proc.returncode != 0  # the timeout; --keep left everything running
        assert set(exp.leftovers("[s]leep 37")) == {exp.info.master.host}
        proc = exp.inv("exp.killall", "--benchmark", "slow")
        assert proc.returncode == 0, proc.stderr
        assert exp.leftovers() == {}
    finally:
        exp.killall("slow")


# ---------------------------------------------------------------- refused before any SSH


@pytest.mark.parametrize("args, words", [
    (["exp.run", "--benchmark", "x; rm -rf ~"], "benchmark name"),
    (["exp.killall", "--benchmark", "x; rm -rf ~"], "benchmark name"),
    (["exp.workers", "--benchmark", "../dsum"], "benchmark name"),
    (["exp.run", "--benchmark", "$(touch PWNED)"], "benchmark name"),
    (["exp.run", "--benchmark", "dsum", "--args", "; touch PWNED"], "not allowed"),
    (["exp.run", "--benchmark", "dsum", "--args", "-n 1 && touch PWNED"], "not allowed"),
    (["exp.master", "--benchmark", "dsum", "--args", "$(touch PWNED)"], "not allowed"),
    (["exp.run", "--benchmark", "dsum", "--args", "`touch PWNED`"], "not allowed"),
])
def test_injection_attempts_are_refused_before_any_ssh(exp, args, words):
    marker = f"/tmp/pwned-{uuid.uuid4().hex[:8]}"
    args = [a.replace("PWNED", marker) for a in args]
    with no_ssh(exp.cluster):
        proc = exp.inv(*args)
    assert words in one_line_error(proc)
    assert not Path(marker).exists()
    assert exp.remote(f"test -e {marker} && echo present || echo absent") == {
        n.host: "absent\n" for n in exp.info.cluster_nodes}
    assert not exp.runs_dir.exists()


@pytest.mark.parametrize("text, words", [
    ("defaults: {}\nbenchmarks:\n  dsum: {dir: [1, 2}\n", ["invalid YAML at line 3, column"]),
    (None, ["no such file"]),
    ("PATCH:timout: 5", ["benchmark 'dsum'", "key 'timout'", "did you mean 'timeout'"]),
    ("PATCH:ports: {master: 70000}", ["benchmark 'dsum'", "key 'ports.master'", "70000"]),
    ("PATCH:commands: {worker: '{binary} -i {hots}'}", ["benchmark 'dsum'", "key 'commands.worker'", "{hots}"]),
])
@pytest.mark.parametrize("task", [["exp.run", "--benchmark", "dsum"], ["exp.list"]])
def test_registry_errors_are_one_line(exp, tmp_path, text, words, task):
    path = tmp_path / "bad.yaml"
    if text is not None and text.startswith("PATCH:"):
        data = yaml.safe_load((REPO / "experiments.yaml").read_text())
        data["benchmarks"]["dsum"].update(yaml.safe_load(text[len("PATCH:"):]))
        text = yaml.safe_dump(data)
    if text is not None:
        path.write_text(text)
    with no_ssh(exp.cluster):
        proc = exp.inv(*task, INVOKE_CLOISTER_EXPERIMENTS=str(path))
    line = one_line_error(proc)
    assert line.startswith(str(path)), line
    for word in words:
        assert word in line


@pytest.mark.parametrize("k, message", [("5", "-k 5: the cluster has 4 workers"),
                                        ("0", "-k '0': expected a positive integer")])
def test_k_out_of_range_is_refused_before_anything_starts(exp, k, message):
    with no_ssh(exp.cluster):
        proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", k, "-p", "1")
    assert message in one_line_error(proc)
    assert not exp.runs_dir.exists()


# ---------------------------------------------------------------- logs, clean, list, make, manager --local


def test_list_logs_and_clean_of_a_past_run(exp):
    proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", "2", "-p", "1")
    assert proc.returncode == 0, proc.stderr
    run_id, run_dir = exp.only_run("dsum")

    # exp.list: the benchmarks of the registry and this run
    proc = exp.inv("exp.list")
    assert proc.returncode == 0, proc.stderr
    for name in ("dsum", "slow", "other", "~/clamor/experiments/cpp/dsum", "40000/45000/50000+"):
        assert name in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if run_id in line)
    assert re.search(r"dsum\s*│\s*" + run_id + r"\s*│\s*2\s*│\s*1\s*│\s*ok\s*│", row), row

    # exp.logs: downloads the latest run again
    hosts_ = [exp.info.master, *exp.info.workers[:2]]
    files = {node.host: sorted(p.name for p in (run_dir / node.host).iterdir()) for node in hosts_}
    for node in hosts_:
        for path in (run_dir / node.host).iterdir():
            path.unlink()
        (run_dir / node.host).rmdir()

    proc = exp.inv("exp.logs", "--benchmark", "dsum")
    assert proc.returncode == 0, proc.stderr
    assert run_id in proc.stdout
    assert {node.host: sorted(p.name for p in (run_dir / node.host).iterdir()) for node in hosts_} == files
    assert "sum=" in (run_dir / exp.info.master.host / f"master_{run_id}.log").read_text()

    # exp.clean: removes the run from the hosts, keeps the local copy
    remote_dir = f"~/cloister/runs/dsum/{run_id}"
    check = f"test -d {remote_dir} && echo present || echo absent"
    assert exp.remote(check, hosts_) == {n.host: "present\n" for n in hosts_}
    proc = exp.inv("exp.clean", "--benchmark", "dsum", "--run", run_id)
    assert proc.returncode == 0, proc.stderr
    assert exp.remote(check) == {n.host: "absent\n" for n in exp.info.cluster_nodes}
    assert (run_dir / "run.json").exists() and (run_dir / exp.info.master.host).is_dir()  # local copies kept


def test_make_builds_on_every_host(exp):
    proc = exp.inv("exp.make", "--benchmark", "dsum")
    assert proc.returncode == 0, proc.stderr
    nodes = exp.info.cluster_nodes
    for node in nodes:
        assert f"[{node.host}] dsum: built" in proc.stdout
    assert f"dsum: built on {len(nodes)}/{len(nodes)} hosts" in proc.stdout

    proc = exp.inv("exp.make", "--benchmark", "mkfail")
    assert proc.returncode != 0
    no_traceback(proc)
    bad = nodes[-1]
    assert f"[{bad.host}] mkfail: exit 2: oops" in proc.stderr
    assert f"mkfail: built on {len(nodes) - 1}/{len(nodes)} hosts" in proc.stdout


def test_manager_local_runs_through_c_run_here(exp, tmp_path):
    """exp.manager --local runs the manager on this machine (as if logged in to the master): no SSH."""
    bench_dir = tmp_path / "here"
    bench_dir.mkdir()
    (bench_dir / "experiment_vars").write_text('export FROM_VARS="sourced here"\n')
    data = yaml.safe_load(exp.registry_path.read_text())
    data["benchmarks"]["here"] = {
        "dir": str(bench_dir), "env": {"QUOTED": "it's $(not run)"},
        "commands": {"manager": 'echo manager {host} {manager_port} {worker_hosts} {worker_endpoints} {partitions} '
                                '"$FROM_VARS" "$QUOTED"; pwd'},
    }
    exp.registry_path.write_text(yaml.safe_dump(data))
    with no_ssh(exp.cluster):
        proc = exp.inv("exp.manager", "--local", "--benchmark", "here", "-k", "2", "-p", "2")
    assert proc.returncode == 0, proc.stderr
    w1, w2 = (w.host for w in exp.info.workers[:2])
    endpoints = f"{w1}:50000,{w1}:50001,{w2}:50000,{w2}:50001"
    assert proc.stdout.splitlines() == [
        f"manager {exp.info.master.host} 40000 {w1},{w2} {endpoints} 4 sourced here it's $(not run)", str(bench_dir)]


def test_logs_and_clean_of_a_run_that_does_not_exist(exp):
    missing = "20991125-002233-8543"
    proc = exp.inv("exp.logs", "--benchmark", "dsum", "--run", missing)
    assert one_line_error(proc) == f"no host has logs of dsum run {missing} (~/cloister/runs/dsum/{missing}/)"
    assert not (exp.runs_dir / "dsum" / missing).exists()
    proc = exp.inv("exp.clean", "--benchmark", "dsum", "--run", missing)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"no host had {missing}; nothing to remove"
