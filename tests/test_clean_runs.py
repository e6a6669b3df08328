"""exp.* paths that must end clean, through `inv` against the real sshd hosts of the local cluster: an
SSH session lost mid-run, a worker that takes a port on every address, hostile values in
experiments.yaml, two runs on one cluster, logs of a run that no host has."""

from __future__ import annotations

import json
import queue
import shlex
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import yaml

from cloister.runs.experiments import load_registry
from cloister.providers.local.machines import LocalCluster
from cloister.providers.local.procs import children, cmdline
from cloister.runs import lock as runlock
from conftest import INV, REPO, no_traceback, one_line_error
from test_exp_runs import DSUM_DIR, OTHER_DIR, OTHER_PORTS, Exp, log_names

DSUM_FILES = ("dsum", "dsum.weld", "experiment_vars")


@pytest.fixture
def exp(local_cluster, tmp_path):
    e = Exp(local_cluster, tmp_path)
    try:
        yield e
    finally:
        e.killall(*(name for name in ("dsum", "slow", "other", "gate", "beside", "anyaddr", "hostile", "stuck")
                    if name in e.registry.benchmarks))


def add_benchmarks(exp: Exp, **benchmarks: dict) -> None:
    data = yaml.safe_load(exp.registry_path.read_text())
    data["benchmarks"].update(benchmarks)
    exp.registry_path.write_text(yaml.safe_dump(data))
    exp.registry = load_registry(exp.registry_path)


class Running:
    """An `inv exp.run` in the background whose stdout lines can be awaited."""

    def __init__(self, exp: Exp, *args: str):
        self.proc = subprocess.Popen([INV, "exp.run", *args], cwd=REPO, env=exp.env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str) -> None:
        while True:
            line = self.lines.get(timeout=60)
            assert line is not None, "inv ended first: " + self.proc.stderr.read()
            if line.startswith(prefix):
                return

    def end(self) -> tuple[int, str, str]:
        stderr = self.proc.stderr.read()
        self.proc.wait(timeout=120)
        self.reader.join(timeout=10)
        return self.proc.returncode, "".join(self.stdout), stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def gate(exp: Exp) -> tuple[dict, str]:
    """A benchmark whose master runs until a file appears on the master, and that file's path."""
    path = f"~/gate-{uuid.uuid4().hex[:8]}"
    master = f"sh -c 'echo master started; while [ ! -e {path} ]; do sleep 0.1; done; echo master done'"
    return {"dir": DSUM_DIR, "binary": "./dsum", "commands": {"master": master}}, path


# ---------------------------------------------------------------- a lost SSH session


def kill_ssh_sessions(exp: Exp, name: str) -> list[int]:
    """SIGKILL every SSH session process of a host (the host's sshd is its namespace's PID 1; each
    connection is an `sshd: user` child of it, with its own `sshd:` children); the host stays up."""
    lc = LocalCluster(state_root=exp.cluster.settings.state_dir, cluster=exp.cluster.cfg.cluster_name)

    def sessions(pid: int) -> list[int]:
        found = []
        for child in children(pid):
            if cmdline(child).startswith("sshd"):
                found += [child, *sessions(child)]
        return found

    killed = sessions(lc.init_pid(name))
    for pid in killed:
        subprocess.run(["kill", "-KILL", str(pid)], check=False)
    return killed


@pytest.mark.parametrize("role", ["master", "worker"])
def test_a_lost_ssh_session_still_kills_and_collects_that_host(exp, role):
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    victim = exp.info.master if role == "master" else exp.info.workers[0]
    run = Running(exp, "--benchmark", "gate", "-k", "2", "-p", "1")
    try:
        run.wait_for("[master] master started")
        assert kill_ssh_sessions(exp, victim.name)
        if role == "worker":
            exp.remote(f"touch {gate_file}", nodes=[exp.info.master])  # the master ends by itself
        code, stdout, stderr = run.end()
    finally:
        run.stop()
        exp.remote(f"rm -f {gate_file}", nodes=[exp.info.master])
    assert code == 1, stdout + stderr
    assert "Traceback" not in stdout + stderr
    line = next(line for line in stderr.splitlines() if line.startswith(f"[{victim.host}] SSH session lost"))
    assert line.endswith("reconnected: its processes killed and its logs collected"), line
    record = exp.record("gate")
    assert record["status"] == "failed"
    assert f"[{victim.host}] SSH session lost" in record["error"]
    assert record["failures"][victim.host].startswith("SSH session lost")
    run_id, run_dir = exp.only_run("gate")
    expected = ({f"manager_{run_id}.log", f"master_{run_id}.log"} if role == "master" else {f"worker0_{run_id}.log"})
    assert log_names(run_dir / victim.host) == expected
    assert "running" not in {r["status"] for r in record["roles"]}, record["roles"]
    # Nothing of the run is left anywhere: its processes, nor the master's tail of the lost session.
    name = gate_file[2:]
    assert exp.leftovers_after_a_lost_session(f"[d]sum -i|[{name[0]}]{name[1:]}|[t]ail -n .1 -s") == {}


# ---------------------------------------------------------------- readiness that cannot be fooled

ANY_ADDRESS_WORKER = """#!/bin/sh
exec python3 - "$@" <<'PY'
import socket, sys, time
host, port, first = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")[0]
if host != first:
    # Only once the first host's worker holds 0.0.0.0:port (which, on one shared network, is this port too).
    while True:
        try:
            socket.create_connection((first, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.02)
s = socket.socket()
try:
    s.bind(("0.0.0.0", port))
except OSError as err:
    print(f"bind 0.0.0.0:{port} on {host}: {err.strerror}", flush=True)
    sys.exit(1)
s.listen()
print(f"listening on 0.0.0.0:{port}", flush=True)
time.sleep(60)
PY
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("mode", ["netns", "loopback"])
def test_a_port_held_by_another_hosts_worker_is_not_ready(exp, own_cluster, tmp_path, mode):
    """Two workers bind 0.0.0.0 on the same port. Each local host a network host: both hold it, each is
    ready by its own socket. In loopback mode (one shared network) the second cannot bind, and the
    first's socket must not make it look ready."""
    port = 50000
    if mode == "loopback":
        (tmp_path / "loopexp").mkdir()
        exp = Exp(own_cluster("loopx", nworkers=2, network={"mode": "loopback"}), tmp_path / "loopexp")
        port = free_port()  # this machine's one network: any other program's 50000 would be in the way
    exp.remote(f"mkdir -p ~/anyaddr && printf %s {shlex.quote(ANY_ADDRESS_WORKER)} > ~/anyaddr/w.sh "
               "&& chmod +x ~/anyaddr/w.sh")
    add_benchmarks(exp, anyaddr={"dir": "~/anyaddr", "binary": "./w.sh", "commands": {
        "worker": "{binary} {host} {port} {worker_hosts}", "master": "echo the master ran"},
        "ports": {"manager": port - 2, "master": port - 1, "worker_base": port}})
    first, second = exp.info.workers[:2]
    try:
        proc = exp.inv("exp.run", "--benchmark", "anyaddr", "-k", "2", "-p", "1", "--no-manager")
        no_traceback(proc)
        if mode == "netns":
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "the master ran" in proc.stdout and "already in use" not in proc.stdout + proc.stderr
            run_id, run_dir = exp.only_run("anyaddr")
            for index, node in enumerate((first, second)):
                log = (run_dir / node.host / f"worker{index}_{run_id}.log").read_text()
                assert "listening on 0.0.0.0:50000" in log, log
        else:
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "the master ran" not in proc.stdout
            assert (f"[{second.host}] worker1 exited at start-up with exit 1: "
                    f"bind 0.0.0.0:{port} on {second.host}: Address already in use") in proc.stderr.splitlines()
            assert f"[{first.host}]" not in proc.stderr
            record = exp.record("anyaddr")
            assert {r["host"]: r["status"] for r in record["roles"]} == \
                {first.host: "killed", second.host: "exited early"}
        assert exp.leftovers("[w].sh|[p]ython3 -") == {}
    finally:
        exp.remote("rm -rf ~/anyaddr")


STUCK_WORKER = """#!/bin/sh
# Says why it cannot serve, in a chained traceback, and stays alive without listening.
echo "worker $1 starting"
cat <<'TB'
Traceback (most recent call last):
  File "w.py", line 5, in main
    s.bind(('0.0.0.0', 50000))
OSError: [Errno 98] Address already in use

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "w.py", line 9, in <module>
    main()
  File "w.py", line 7, in main
    raise RuntimeError('cannot serve')
RuntimeError: cannot serve
TB
echo "retrying in a while"
exec sleep 60
"""


def test_a_worker_alive_but_not_listening_is_named_with_its_error(exp):
    exp.remote(f"mkdir -p ~/stuck && printf %s {shlex.quote(STUCK_WORKER)} > ~/stuck/w.sh && chmod +x ~/stuck/w.sh")
    add_benchmarks(exp, stuck={"dir": "~/stuck", "binary": "./w.sh", "ready_timeout": 2, "commands": {
        "worker": "{binary} {index}", "master": "echo the master ran"}})
    try:
        proc = exp.inv("exp.run", "--benchmark", "stuck", "-k", "2", "-p", "1", "--no-manager")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        no_traceback(proc)
        assert "the master ran" not in proc.stdout
        lines = proc.stderr.splitlines()
        for index, node in enumerate(exp.info.workers[:2]):
            assert (f"[{node.host}] worker{index} running but not ready after 2s (waiting for port 50000 to listen): "
                    f"OSError: [Errno 98] Address already in use | ... | raise RuntimeError('cannot serve') | "
                    f"RuntimeError: cannot serve | retrying in a while") in lines, proc.stderr
        assert lines[-1].endswith("failed: 2/3 hosts failed"), proc.stderr
        assert exp.leftovers("[w].sh|[s]leep 60") == {}
    finally:
        exp.remote("rm -rf ~/stuck")


# ---------------------------------------------------------------- hostile values in experiments.yaml


def hostile_benchmark(marker: str) -> tuple[dict, dict[str, str]]:
    """A benchmark whose every value that reaches a shell would run ``touch MARKER-KEY`` if it were not
    quoted; and the files each host needs for it (path under home -> copied from the dsum directory, or
    a line of shell)."""
    def pwn(key: str) -> str:
        return f"$(touch {marker}-{key})"

    folder = f"hostile {pwn('dir')} `touch {marker}-dir2`; touch {marker}-dir3"
    binary, worker_binary = f"dsum {pwn('binary')}", f"w;touch {marker}-worker_binary"
    vars_file, local_vars = f"vars {pwn('vars_file')}", f".lv {pwn('local_vars')}"
    master = ("sh -c 'printf \"arg:%s\\n\" \"$@\"; echo \"vars:$HOSTILE_VARS lv:$HOSTILE_LV env:$HOSTILE\"' master "
              "{args} && {binary} -i {host} -p {master_port} -m master -d {manager} -l {benchmark}.weld "
              "-t {nprocs} -w {worker_hosts} -x {partitions}")
    benchmark = {
        "dir": f"~/{folder}", "binary": f"./{binary}", "worker_binary": f"./{worker_binary}", "vars_file": vars_file,
        "env": {"HOSTILE": pwn("env")}, "args": f"'a;touch {marker}-args' '$HOME' '*'",
        "build": f"touch {marker}-build", "metric": f"(\\d+);touch {marker}-metric",
        "prepare": {"local_vars": f"~/{local_vars}"}, "commands": {"master": master},
    }
    files = {f"{folder}/{binary}": "dsum", f"{folder}/{worker_binary}": "dsum", f"{folder}/hostile.weld": "dsum.weld",
             f"{folder}/{vars_file}": "export HOSTILE_VARS=sourced", local_vars: "export HOSTILE_LV=yes"}
    return benchmark, files


def test_hostile_values_in_experiments_yaml_are_never_run(exp):
    marker = f"pwn{uuid.uuid4().hex[:8]}"
    benchmark, files = hostile_benchmark(marker)
    add_benchmarks(exp, hostile=benchmark)
    setup = []
    for path, source in files.items():
        target = '"$HOME"/' + shlex.quote(path)
        setup.append(f"mkdir -p -- \"$(dirname -- {target})\" && " + (
            f"cp {DSUM_DIR}/{source} {target}" if source in DSUM_FILES else f"echo {shlex.quote(source)} > {target}"))
    exp.remote(" && ".join(setup))
    cli_arg = f"b|touch {marker}-cli"
    try:
        proc = exp.inv("exp.run", "--benchmark", "hostile", "-k", "2", "-p", "1", "--args", shlex.quote(cli_arg))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for line in (f"arg:a;touch {marker}-args", "arg:$HOME", "arg:*", f"arg:{cli_arg}",
                     f"vars:sourced lv:yes env:$(touch {marker}-env)"):
            assert f"[master] {line}" in proc.stdout.splitlines(), proc.stdout
        assert " ok" in proc.stdout
        for task in (["exp.list"], ["exp.logs", "--benchmark", "hostile"], ["exp.killall", "--benchmark", "hostile"],
                     ["exp.clean", "--benchmark", "hostile"]):
            result = exp.inv(*task)
            assert result.returncode == 0, result.stdout + result.stderr
            no_traceback(result)
        # Refused where a shell would start (a bad directory) still runs nothing.
        add_benchmarks(exp, hostile={**benchmark, "dir": f"~/missing {marker} $(touch {marker}-dir4)"})
        proc = exp.inv("exp.run", "--benchmark", "hostile", "-k", "1", "-p", "1")
        assert proc.returncode == 1 and f"benchmark directory ~/missing {marker} $(touch {marker}-dir4) not found" \
            in proc.stderr
        # Before the clean-up: a marker would be in the benchmark directory, the processes' working directory.
        found = exp.remote(f"find ~ /tmp -name '{marker}-*' 2>/dev/null; true")
        assert found == {n.host: "" for n in exp.info.cluster_nodes}
        assert not [p for d in (Path("/tmp"), REPO, Path.home()) for p in d.glob(f"{marker}-*")]
    finally:
        exp.killall("hostile")
        exp.remote("rm -rf -- ~/hostile* ~/.lv*")


# ---------------------------------------------------------------- one run at a time


def test_a_second_run_is_refused_while_one_is_in_flight(exp):
    benchmark, gate_file = gate(exp)
    # dsum on other ports: its master reaches the workers by endpoint, not by Clamor's fixed worker ports.
    beside = {"dir": OTHER_DIR, "binary": "./dsum", "ports": OTHER_PORTS, "commands": {
        "worker": "{binary} -i {host} -m worker -p {port} -d {manager} -r {manager_port} -l {benchmark}.weld",
        "master": "{binary} -i {host} -p {master_port} -m master -d {manager} -l {benchmark}.weld -t {nprocs} "
                  "-w {worker_endpoints} -x {partitions}"}}
    add_benchmarks(exp, gate=benchmark, beside=beside)
    exp.remote(f"rm -rf {OTHER_DIR} && cp -r {DSUM_DIR} {OTHER_DIR} && cp {OTHER_DIR}/dsum.weld {OTHER_DIR}/beside.weld")
    run = Running(exp, "--benchmark", "gate", "-k", "1", "-p", "1")
    try:
        run.wait_for("[master] master started")
        first_id, _ = exp.only_run("gate")
        line = one_line_error(exp.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1"))
        assert line.startswith(f"run {first_id} of gate is in flight on this cluster (its exp.run is connected"), line
        assert "--concurrent" in line and f"inv exp.killall --run {first_id}" in line
        assert not (exp.runs_dir / "dsum").exists()
        # Asked to, a run on other ports goes ahead beside it.
        proc = exp.inv("exp.run", "--benchmark", "beside", "-k", "2", "-p", "1", "--concurrent")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        exp.remote(f"touch {gate_file}", nodes=[exp.info.master])
        code, stdout, stderr = run.end()
        assert code == 0, stdout + stderr
    finally:
        run.stop()
        exp.remote(f"rm -rf {gate_file} {OTHER_DIR}")
    # The lock went with the run; a run left running holds it until its processes end.
    proc = exp.inv("exp.run", "--benchmark", "slow", "-k", "1", "-p", "1", "--keep", "--timeout", "1")
    assert "left running (--keep)" in proc.stderr
    slow_id, _ = exp.only_run("slow")
    line = one_line_error(exp.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1"))
    assert line.startswith(f"run {slow_id} of slow is in flight on this cluster (its processes are running"), line
    # What cluster.destroy warns about before it asks.
    assert runlock.in_flight_on(exp.info, connect_timeout=5) == f"slow run {slow_id}"
    assert exp.inv("exp.killall", "--benchmark", "slow").returncode == 0
    assert runlock.in_flight_on(exp.info, connect_timeout=5) is None
    proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert exp.remote("test -e ~/cloister/runs/run.lock && echo held || echo free", nodes=[exp.info.master]) == {
        exp.info.master.host: "free\n"}


# ---------------------------------------------------------------- logs of a run no host has


def test_logs_of_a_run_that_no_host_has_any_more_fail(exp):
    proc = exp.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1")
    assert proc.returncode == 0, proc.stderr
    run_id, run_dir = exp.only_run("dsum")
    assert exp.inv("exp.clean", "--benchmark", "dsum", "--run", run_id).returncode == 0
    line = one_line_error(exp.inv("exp.logs", "--benchmark", "dsum", "--run", run_id))
    assert line == f"no host has logs of dsum run {run_id} (~/cloister/runs/dsum/{run_id}/)"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "ok"  # the local copy is kept
