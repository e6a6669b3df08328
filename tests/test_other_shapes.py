"""Benchmarks of other shapes than Clamor's: optional roles, one worker per host, the run's own MPI
hostfile, the run's mark in every process (CPU accounting and clean-up of what a launcher started),
extra log paths, a grace before KILL, kept runs in exp.ps, and the examples that run real systems
(Dask distributed, an Open MPI C program) with exp.run and exp.sweep on the local cluster.
"""

from __future__ import annotations

import csv
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cloister.cluster.servers import ClusterInfo, Node
from cloister.runs import resources as res
from cloister.runs import start_script
from cloister.runs.experiments import STOP_GRACE, RunShape, load_registry, render
from cloister.runs.scripts import extra_logs_script, kill_script
from cloister.runs.spec import RunSpec
from cloister.runs.sweep import SweepState, combos
from cloister.settings import Settings
from cloister.cluster import lifecycle
from conftest import REPO, make_cluster, no_traceback
from test_exp_runs import Exp, listening
from test_experiments import THIS_MACHINE, bench, registry_error

RUN_ID = "20260101-000000-abcd"
# Outside every home and /tmp, which local hosts have of their own (a clone under /tmp is invisible to them).
HOSTS_VENV = Path(os.environ.get("CLOISTER_HOSTS_VENV", "/opt/cloister/hosts-venv"))


# ------------------------------------------------------------ experiments.yaml: the new keys


def test_an_mpi_program_is_a_master_only(tmp_path):
    b = bench(tmp_path, commands={"manager": None, "worker": None,
                                  "master": "mpirun --hostfile {hostfile} -np {partitions} {binary}"})
    assert not b.has("manager") and not b.has("worker") and b.has("master")
    shape = RunShape(run_id=RUN_ID, k=2, nprocs=3, manager="10.0.0.1", worker_hosts=["10.0.0.2", "10.0.0.3"],
                     worker_endpoints=[])
    assert render(b, "master", shape, host="10.0.0.1") == \
        'mpirun --hostfile "$CLOISTER_RUN_DIR"/hostfile -np 6 ./bench'


@pytest.mark.parametrize("entry, key, words", [
    ({"commands": {"master": None}}, "commands.master", ["expected a command template"]),
    ({"commands": {"worker": ""}}, "commands.worker", ["command template or null"]),
    ({"ready": {"log": ""}}, "ready.log", ["non-empty regex"]),
    ({"workers_per_host": "two"}, "workers_per_host", ["nprocs", "one", "'two'"]),
    ({"workers_per_host": 1}, "workers_per_host", ["nprocs", "one"]),
    ({"logs": "/tmp/x"}, "logs", ["list of paths"]),
    ({"logs": ["relative/logs"]}, "logs", ["absolute paths or ~/paths", "'relative/logs'"]),
    ({"logs": ["/"]}, "logs", ["absolute paths"]),
    ({"logs": ["~/"]}, "logs", ["absolute paths"]),
    ({"logs": ["/tmp/../etc"]}, "logs", ["'..'"]),
    ({"logs": ["/tmp/./x"]}, "logs", ["'.'"]),
    ({"logs": ["/tmp/a\nb"]}, "logs", ["newline"]),
    ({"logs": [["x"]]}, "logs", ["absolute paths"]),
    ({"stop_grace": -1}, "stop_grace", ["seconds between TERM and KILL"]),
    ({"stop_grace": "5s"}, "stop_grace", ["seconds between TERM and KILL"]),
    ({"stop_grace": True}, "stop_grace", ["seconds between TERM and KILL"]),
    ({"stop_grace": 1000}, "stop_grace", ["0-60"]),
])
def test_bad_new_keys_are_one_line_naming_benchmark_and_key(tmp_path, entry, key, words):
    message = registry_error(tmp_path, {"mybench": entry})
    assert "benchmark 'mybench'" in message and f"key '{key}'" in message, message
    for word in words:
        assert word in message, message


def test_the_new_keys_have_their_defaults(tmp_path):
    b = bench(tmp_path)
    assert (b.workers_per_host, b.logs, b.stop_grace) == ("nprocs", (), 5.0)
    assert b.has("manager") and b.has("worker")
    b = bench(tmp_path, workers_per_host="one", logs=["/tmp/ray/session_latest/logs", "~/my logs"], stop_grace=0)
    assert (b.workers_per_host, b.logs, b.stop_grace) == ("one", ("/tmp/ray/session_latest/logs", "~/my logs"), 0.0)


def test_the_repository_defaults_mirror_the_librarys():
    defaults = yaml.safe_load((REPO / "experiments.yaml").read_text())["defaults"]
    assert (defaults["stop_grace"], defaults["workers_per_host"], defaults["logs"]) == (STOP_GRACE, "nprocs", [])


def test_the_repository_declares_the_examples_with_the_new_keys_only():
    registry = load_registry(REPO / "experiments.yaml")
    mpi, dask = registry.get("mpi_pi"), registry.get("dask_sum")
    assert set(mpi.commands) == {"master"} and "{hostfile}" in mpi.commands["master"]
    assert set(dask.commands) == {"manager", "worker", "master"}
    assert mpi.env == dask.env == {}  # what a machine needs (interfaces, a venv) is not in the entry


def test_the_dask_client_refuses_bad_usage_in_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "dask_sum" / "client.py"), "--scheduler",
                           "tcp://127.0.0.1:1", "--workers", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "must be positive" in proc.stderr.strip().splitlines()[-1], proc.stderr


INFO = ClusterInfo(provider="local", cluster_name="c", user="u", ssh_key="k",
                   nodes=[Node(role="master", id="0", host="127.0.0.1", private="10.0.0.1"),
                          Node(role="worker", id="1", host="127.0.0.2", private="10.0.0.2"),
                          Node(role="worker", id="2", host="127.0.0.3")])


def test_one_worker_per_host_is_given_p(tmp_path):
    b = bench(tmp_path, workers_per_host="one", commands={"worker": "raylet --num-cpus {nprocs} --port {port}"})
    spec = RunSpec(info=INFO, bench=b, k=2, nprocs=4, run_id=RUN_ID, settings=Settings())
    assert spec.worker_processes == 1
    assert spec.shape.worker_endpoints == [("10.0.0.2", 50000), ("127.0.0.3", 50000)]
    assert spec.command("worker", INFO.workers[1], port=b.worker_base, index=1) == "raylet --num-cpus 4 --port 50000"
    # The run's hostfile: its K workers (the address the others reach them at), P slots each.
    assert spec.hostfile == "10.0.0.2 slots=4 max-slots=4\n127.0.0.3 slots=4 max-slots=4\n"
    mpi = bench(tmp_path, "mpi", commands={"manager": None, "worker": None})
    mpi_spec = RunSpec(info=INFO, bench=mpi, k=1, nprocs=2, run_id=RUN_ID, settings=Settings())
    assert (mpi_spec.worker_processes, mpi_spec.with_manager) == (0, False)


# ------------------------------------------------------------ hostile values reach the shell as words


HOSTILE = "/tmp/x y/$(touch PWNED)/`touch PWNED2`;touch PWNED3 'q\"\\"


def test_a_hostile_logs_path_is_copied_literally_and_nothing_runs(tmp_path):
    home = tmp_path / "home"
    source = home / "odd $(touch PWNED) dir;x" / "logs"
    source.mkdir(parents=True)
    (source / "a.log").write_text("hello\n")
    rdir = home / "cloister" / "runs" / "bench" / RUN_ID
    rdir.mkdir(parents=True)
    b = bench(tmp_path, logs=[f"~/{source.relative_to(home)}", HOSTILE])
    result = subprocess.run(["bash", "-c", extra_logs_script(b, RUN_ID)], cwd=tmp_path, env={**os.environ, "HOME": str(home)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    copied = list((rdir / "logs").iterdir())
    assert len(copied) == 1 and (copied[0] / "a.log").read_text() == "hello\n", copied
    assert not list(tmp_path.rglob("PWNED*")) and not list(rdir.rglob("PWNED*"))


def test_the_hostfile_is_written_literally_in_the_run_folder(tmp_path):
    home = tmp_path / "home"
    (home / "b").mkdir(parents=True)
    b = bench(tmp_path, dir="~/b", prepare={"disable_aslr": False, "sysctl": {}})
    text = "10.0.0.2 slots=2 max-slots=2\n$(touch PWNED) 'x' slots=2\n"
    script = start_script(b, RUN_ID, [], node=THIS_MACHINE, hostfile=text)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**os.environ, "HOME": str(home)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (home / "cloister" / "runs" / "bench" / RUN_ID / "hostfile").read_text() == text
    assert not list(tmp_path.rglob("PWNED*"))


# ------------------------------------------------------------ the run's mark, the grace before KILL


def test_the_sampler_counts_processes_that_carry_the_runs_mark(tmp_path):
    """A host with no role process of its own (a launcher started them): the sampler counts the marked
    processes, waits for them to come and ends once they have gone."""
    (tmp_path / "pids").write_text("")
    mark = f"CLOISTER_RUN_ID={RUN_ID}"
    sampler = subprocess.Popen(["setsid", "sh", "-c", res._SAMPLER, "sampler", str(tmp_path), "0.2", mark, "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    busy = None
    try:
        time.sleep(0.6)
        assert sampler.poll() is None, "a host with no process yet must wait for the launcher's"
        # One second of CPU, however long a loaded machine takes to give it.
        busy = subprocess.Popen(["python3", "-c", "import time\nwhile time.process_time() < 1.0: pass"],
                                env={**os.environ, "CLOISTER_RUN_ID": RUN_ID}, start_new_session=True)
        assert busy.wait(timeout=30) == 0
        sampler.wait(timeout=30)
    finally:
        for proc in (busy, sampler):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    host = res.parse_raw((tmp_path / res.RAW_FILE).read_text())
    # Nothing else is in the run: without the mark its CPU would be 0.
    assert res.summarize(host)["run_cpu_peak_pct"] > 5, (tmp_path / res.RAW_FILE).read_text()


LOCKING_SERVER = """
import os, signal, sys, time
lock = sys.argv[1]
open(lock, "w").close()
def stop(*_):
    time.sleep(1.5)  # a server's orderly shutdown
    os.remove(lock)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("up", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("grace, removed", [(5, True), (0, False)])
def test_the_runs_end_gives_term_a_grace_before_kill(tmp_path, grace, removed):
    home = tmp_path / "home"
    rdir = home / "cloister" / "runs" / "bench" / RUN_ID
    rdir.mkdir(parents=True)
    lock = tmp_path / "server.lock"
    # One process in the run's recorded group, one only marked (as a launcher's would be).
    grouped = subprocess.Popen(["python3", "-c", LOCKING_SERVER, str(lock)], stdout=subprocess.PIPE,
                               start_new_session=True)
    marked = subprocess.Popen(["python3", "-c", LOCKING_SERVER, str(lock) + "2"], stdout=subprocess.PIPE,
                              env={**os.environ, "CLOISTER_RUN_ID": RUN_ID}, start_new_session=True)
    try:
        assert grouped.stdout.readline() == b"up\n" and marked.stdout.readline() == b"up\n"
        (rdir / "pids").write_text(f"{grouped.pid} worker 0 50000\n")
        b = bench(tmp_path, stop_grace=grace)
        result = subprocess.run(["bash", "-c", kill_script(b, RUN_ID)], env={**os.environ, "HOME": str(home)},
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "killed 2", result.stdout + result.stderr
        assert grouped.wait(timeout=10) is not None and marked.wait(timeout=10) is not None
        assert (not lock.exists(), not Path(str(lock) + "2").exists()) == (removed, removed)
    finally:
        for proc in (grouped, marked):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------ sweeps: the metric's column, the reason


def test_the_sweeps_metric_column_is_named_by_the_metric_and_failures_say_why(tmp_path):
    from test_sweep import record

    grid = {"benchmark": "b", "k": [1], "p": [1, 2], "grid": {}}
    c1, c2 = combos(ks=[1], ps=[1, 2], grid={}, repeat=1)
    state = SweepState(tmp_path / "s", grid, metric="time_s")
    state.finish(c1, record("20260101-000000-aaaa", "ok", total_s=1.0, metric=0.5))
    failed = record("20260101-000000-bbbb", "failed")
    state.finish(c2, type(failed)(**{**failed.__dict__, "error": "[m] master exited with 2\nmore"}))
    with open(state.csv_path, newline="") as src:
        rows = list(csv.DictReader(src))
    assert "time_s" in rows[0] and "metric" not in rows[0]
    assert rows[0]["time_s"] == "0.5" and rows[1]["error"] == "[m] master exited with 2"
    # A metric named like another column keeps the plain name.
    assert SweepState(tmp_path / "t", grid, metric="status").metric == "metric"


# ------------------------------------------------------------ real systems on the local cluster


def shares_loopback(info) -> bool:
    """Local hosts in loopback mode (127.0.0.0/8) share this machine's loopback; by default each has a network
    of its own."""
    return ipaddress.ip_address(info.master.private or info.master.host).is_loopback


@pytest.fixture(scope="session")
def hosts_venv() -> Path:
    """The Python environment with Dask that the local hosts can run (what make test builds)."""
    if not (HOSTS_VENV / "bin" / "dask").exists():
        made = subprocess.run([str(REPO / "scripts" / "hosts-venv.sh"), str(HOSTS_VENV)], capture_output=True,
                              text=True, timeout=600)
        if made.returncode != 0:
            pytest.skip(f"no Python environment with Dask for the hosts (make test builds it): {made.stderr[-300:]}")
    return HOSTS_VENV


class Shapes(Exp):
    """The test registry plus the repository's examples, with what this machine needs in their env only."""

    def __init__(self, cluster, tmp_path: Path, *, venv: Path):
        super().__init__(cluster, tmp_path)
        data = yaml.safe_load(self.registry_path.read_text())
        repo = yaml.safe_load((REPO / "experiments.yaml").read_text())["benchmarks"]
        data["benchmarks"]["dask_sum"] = {**repo["dask_sum"], "env": {"DASK_VENV": str(venv)}}
        mpi_env = {}
        if shares_loopback(cluster.info):
            # Hosts that share one loopback: OpenMPI must use it (hosts with networks of their own need nothing).
            mpi_env = {"OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo"}
        data["benchmarks"]["mpi_pi"] = {**repo["mpi_pi"], "env": mpi_env}
        self.registry_path.write_text(yaml.safe_dump(data))
        self.registry = load_registry(self.registry_path)

    def runs(self, benchmark: str) -> list[Path]:
        return sorted((self.runs_dir / benchmark).iterdir())


@pytest.fixture(scope="module")
def shapes_cluster(tmp_path_factory):
    """A cluster of this module's own: its servers bind the workers' ports, which nothing another test file
    left on the shared cluster may hold."""
    env = make_cluster(tmp_path_factory.mktemp("shapes"), f"sh{os.getpid() % 100000}", dev=False)
    try:
        yield env
    finally:
        lifecycle.destroy(env.cfg, settings=env.settings)


@pytest.fixture
def shapes(shapes_cluster, tmp_path, hosts_venv):
    s = Shapes(shapes_cluster, tmp_path, venv=hosts_venv)
    try:
        yield s
    finally:
        s.killall("dask_sum", "mpi_pi", "dsum")


def sweep_rows(shapes: Shapes, proc) -> list[dict]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [folder] = list((shapes.runs_dir / "sweeps").iterdir())
    with open(folder / "results.csv", newline="") as src:
        return list(csv.DictReader(src))


def test_dask_distributed_runs_and_sweeps(shapes):
    info = shapes.info
    made = shapes.inv("exp.make", "--benchmark", "dask_sum", timeout=120)
    assert made.returncode == 0, made.stdout + made.stderr
    proc = shapes.inv("exp.run", "--benchmark", "dask_sum", "-k", "2", "-p", "2", "--args=--tasks 16", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    assert "[master] dask_sum: workers=4 tasks=16" in proc.stdout and " ok" in proc.stdout
    [run_dir] = shapes.runs("dask_sum")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok" and isinstance(record["metric"], float)
    assert set(record["exit_codes"]) == {"manager", "master", "worker0", "worker1", "worker2", "worker3"}
    run_id = record["run_id"]
    assert "Scheduler at:" in (run_dir / info.master.host / f"manager_{run_id}.log").read_text()
    for worker in info.workers[:2]:
        assert record["resources"]["hosts"][worker.host]["run_cpu_peak_pct"] > 0
    assert not listening(info.master.host, 8786)

    sweep = shapes.inv("exp.sweep", "--benchmark", "dask_sum", "-k", "1,2", "-p", "1,2", "--args-grid=tasks=8",
                       timeout=600)
    rows = sweep_rows(shapes, sweep)
    assert [(r["k"], r["p"], r["status"]) for r in rows] == [("1", "1", "ok"), ("1", "2", "ok"), ("2", "1", "ok"),
                                                             ("2", "2", "ok")]
    assert all(float(r["time_s"]) > 0 for r in rows)
    assert shapes.leftovers("[d]ask (scheduler|worker)|[c]lient.py") == {}


def test_an_open_mpi_program_runs_on_the_runs_hosts_and_sweeps(shapes):
    info = shapes.info
    made = shapes.inv("exp.make", "--benchmark", "mpi_pi", timeout=180)
    if made.returncode != 0 and "mpi.h" in made.stdout + made.stderr:
        pytest.skip("libopenmpi-dev is not installed (make test installs it)")
    assert made.returncode == 0, made.stdout + made.stderr
    proc = shapes.inv("exp.run", "--benchmark", "mpi_pi", "-k", "2", "-p", "2", "--args=-n 100000000 -r 10",
                      "--resources", "0.25", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    [run_dir] = shapes.runs("mpi_pi")
    record = json.loads((run_dir / "run.json").read_text())
    workers = info.workers[:2]
    # -k and -p choose where the ranks run: the run's hostfile, P slots on each of its K workers.
    hostfile = (run_dir / info.master.host / "hostfile").read_text()
    assert hostfile == "".join(f"{w.private or w.host} slots=2 max-slots=2\n" for w in workers)
    placed = [line.rsplit(" on ", 1)[1] for line in proc.stdout.splitlines() if " of 4 on " in line]
    assert sorted(placed) == sorted(w.name for w in workers for _ in range(2)), proc.stdout
    assert record["status"] == "ok" and set(record["exit_codes"]) == {"master"}
    # The ranks mpirun started over ssh count in their hosts' run CPU (no process of the run's own groups runs
    # there: without the mark it would be 0).
    hosts = record["resources"]["hosts"]
    assert set(hosts) == {info.master.host, *(w.host for w in workers)}
    for worker in workers:
        assert hosts[worker.host]["run_cpu_peak_pct"] > 5, hosts
    assert shapes.leftovers("[m]pi_pi|[o]rted") == {}

    sweep = shapes.inv("exp.sweep", "--benchmark", "mpi_pi", "-k", "1,2", "-p", "1,2", "--args-grid=-n=2000000",
                       timeout=600)
    rows = sweep_rows(shapes, sweep)
    assert [(r["k"], r["p"], r["status"]) for r in rows] == [("1", "1", "ok"), ("1", "2", "ok"), ("2", "1", "ok"),
                                                             ("2", "2", "ok")]
    assert all(float(r["time_s"]) > 0 for r in rows)


def test_a_failed_sweep_run_says_why(shapes):
    proc = shapes.inv("exp.sweep", "--benchmark", "faulty", "-k", "1", "-p", "1", timeout=120)
    assert proc.returncode == 1
    no_traceback(proc)
    assert f"failed: [{shapes.info.master.host}] master exited with 2" in proc.stderr, proc.stderr
    [folder] = list((shapes.runs_dir / "sweeps").iterdir())
    assert "master exited with 2" in (folder / "results.csv").read_text()


def test_a_sweep_honours_no_manager_and_a_benchmark_without_one(shapes):
    proc = shapes.inv("exp.sweep", "--benchmark", "dsum", "-k", "1", "-p", "1", "--no-manager", timeout=120)
    rows = sweep_rows(shapes, proc)
    assert rows[0]["status"] == "ok"
    [run_dir] = shapes.runs("dsum")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["manager"] is False and "manager" not in record["exit_codes"]


def test_a_role_the_benchmark_lacks_is_refused_when_started_by_hand(shapes):
    proc = shapes.inv("exp.workers", "--benchmark", "mpi_pi", "-k", "1", "-p", "1")
    assert proc.returncode == 1
    no_traceback(proc)
    assert "benchmark 'mpi_pi' has no workers (commands.worker is null in" in proc.stderr, proc.stderr
    assert not (shapes.runs_dir / "mpi_pi").exists()


WRITE_SERVER_LOG = ("import os, socket, sys; d = sys.argv[1] + '/logs'; os.makedirs(d, exist_ok=True); "
                    "open(d + '/server.log', 'w').write('from ' + socket.gethostname() + chr(10))")


def test_extra_logs_come_back_with_the_run(shapes, tmp_path):
    data = yaml.safe_load(shapes.registry_path.read_text())
    folder = "/tmp/sb extra $(touch PWNED)"
    data["benchmarks"]["extralogs"] = {
        **data["benchmarks"]["slow"], "logs": [f"{folder}/logs"],
        # The path reaches the program as one word: the program's own shell must not expand it either.
        "commands": {"master": "python3 -c " + shlex.quote(WRITE_SERVER_LOG) + " " + shlex.quote(folder)},
    }
    shapes.registry_path.write_text(yaml.safe_dump(data))
    try:
        proc = shapes.inv("exp.run", "--benchmark", "extralogs", "-k", "1", "-p", "1")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [run_dir] = shapes.runs("extralogs")
        master = shapes.info.master
        [copied] = list((run_dir / master.host / "logs").iterdir())
        assert (copied / "server.log").read_text() == f"from {master.name}\n"
        seen = shapes.remote("ls ~ /tmp ~/clamor/experiments/cpp/dsum | grep -cx PWNED || true", nodes=[master])
        assert seen[master.host].strip() == "0"
    finally:
        shapes.remote(f"rm -rf {shlex.quote(folder)}")


def test_a_kept_run_whose_master_ended_is_listed_until_killed(shapes):
    proc = shapes.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1", "--keep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run_dir] = shapes.runs("dsum")
    run_id = run_dir.name
    ps = shapes.inv("exp.ps")
    assert ps.returncode == 0, ps.stderr
    [row] = [line for line in ps.stdout.splitlines() if run_id in line]
    assert "kept" in row and "worker 1/1" in row, ps.stdout
    attach = shapes.inv("exp.attach", "--run", run_id)
    assert attach.returncode == 1 and f"exp.killall --run {run_id}" in attach.stderr, attach.stderr
    killed = shapes.inv("exp.killall", "--run", run_id)
    assert killed.returncode == 0, killed.stderr
    assert run_id not in shapes.inv("exp.ps").stdout
    assert shapes.leftovers() == {}
