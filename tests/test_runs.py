"""cloister.runs without SSH: the probe script and its parser, run.json records, run specs."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from cloister.errors import ExperimentError
from cloister.runs.experiments import load_registry
from cloister.runs import GitState, Proc, RunHosts, RunRecord, RunSpec, local_runs, manager_here, parse_probe
from cloister.runs.readiness import excerpt
from cloister.runs.scripts import TAIL_BYTES, LOG_MARKER, parse_pids, probe_script
from cloister.cluster.servers import ClusterInfo, Node
from cloister.settings import Settings
from conftest import REPO

RUN_ID = "20260101-000000-abcd"


def registry(tmp_path: Path, **entry):
    data = yaml.safe_load((REPO / "experiments.yaml").read_text())
    data["benchmarks"] = {"b": {"dir": str(tmp_path), **entry}}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_registry(path).get("b")


# ---------------------------------------------------------------- parse_probe


def test_parse_probe_of_nothing():
    probe = parse_probe("")
    assert (probe.alive, probe.exits, probe.listening, probe.sockets, probe.logs) == (set(), {}, {}, {}, {})


def test_parse_probe_skips_what_it_does_not_understand():
    text = "\n".join([
        # a leader and a member of its group; a zombie leader is dead; a bare PID (a process that ended
        # mid-read) and other odd lines are skipped
        "12 S 12", "15 R 12", "13 Z 13", "14", "16 S", "x R x", "", "   ",
        "--sock", "12 1001", "12 1002", "12", "12 x", "y 7",
        "--exit", "worker0.exit 0", "worker1.exit -3", "worker2.exit", "worker3.exit oops", "a b c",
        "--net", "0100007F:1F90 1001", "00000000000000000000000001000000:0050 1002",
        "0000000000000000FFFF00000100007F:0051 1003", "0100007F:1F91", "nothex:1F90 5", "0100007F 6",
        "0100007F:zz 7", "01007F:0050 8", "0100007F:1F92 x",
        "--unknown", "99 S 99",
    ])
    probe = parse_probe(text)
    assert probe.alive == {12}
    assert probe.sockets == {12: {1001, 1002}}
    assert probe.exits == {"worker0": 0, "worker1": -3}
    assert probe.listening == {1001: ("127.0.0.1", 8080), 1002: ("::1", 80), 1003: ("127.0.0.1", 81)}
    assert probe.listens(12) == {("127.0.0.1", 8080), ("::1", 80)}
    assert probe.listens(13) == set()
    assert probe.logs == {}


def test_parse_probe_keeps_log_lines_that_look_like_sections():
    text = (f"12 S 12\n--exit\n--net\n{LOG_MARKER}worker0_x.log\n--exit\nworker0.exit 5\n13 S 13\n"
            f"{LOG_MARKER}worker1_x.log\n")
    probe = parse_probe(text)
    assert probe.alive == {12} and probe.exits == {}
    assert probe.logs == {"worker0_x.log": "--exit\nworker0.exit 5\n13 S 13\n", "worker1_x.log": ""}


LISTENER = "import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(30)"


def test_probe_script_through_bash(tmp_path):
    """The script and its parser together, on this machine: a live process group whose child listens,
    an exit code, a listener outside the run, the tail of a process that ended."""
    bench = registry(tmp_path, ready={"log": "^ready$"})
    run_dir = tmp_path / "cloister" / "runs" / "b" / RUN_ID
    run_dir.mkdir(parents=True)
    # A group leader (as the start script makes one) whose child holds the socket.
    leader = subprocess.Popen(["setsid", "bash", "-c", f"python3 -c {shlex.quote(LISTENER)}; true"],
                              stdout=subprocess.PIPE, text=True)
    stranger = socket.socket()
    try:
        port = int(leader.stdout.readline())
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        (run_dir / "pids").write_text(f"{leader.pid} worker 0 {port}\n999999999 worker 1 2\n")
        (run_dir / "worker1.exit").write_text("7\n")
        (run_dir / f"worker0_{RUN_ID}.log").write_text("starting\nready\n")
        (run_dir / f"worker1_{RUN_ID}.log").write_text("".join(f"line {i}\n" for i in range(9)))
        result = subprocess.run(["bash", "-c", probe_script(bench, RUN_ID, with_logs=False, tails=True)],
                                capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
        assert result.returncode == 0, result.stderr
        probe = parse_probe(result.stdout)
        assert leader.pid in probe.alive and 999999999 not in probe.alive
        assert probe.exits == {"worker1": 7}
        assert probe.listens(leader.pid) == {("127.0.0.1", port)}
        assert stranger.getsockname() in probe.listening.values()
        # The end of every recorded process's log, running or not.
        assert probe.logs == {f"worker0_{RUN_ID}.log": "starting\nready\n\n",
                              f"worker1_{RUN_ID}.log": "".join(f"line {i}\n" for i in range(9)) + "\n"}

        result = subprocess.run(["bash", "-c", probe_script(bench, RUN_ID, with_logs=True)], capture_output=True,
                                text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
        assert parse_probe(result.stdout).logs[f"worker0_{RUN_ID}.log"] == "starting\nready\n\n"
    finally:
        stranger.close()
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_probe_of_a_host_without_the_run_is_empty(tmp_path):
    bench = registry(tmp_path)
    result = subprocess.run(["bash", "-c", probe_script(bench, RUN_ID, with_logs=True)], capture_output=True,
                            text=True, timeout=30, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0 and result.stdout == ""


def test_parse_pids_skips_odd_lines():
    assert parse_pids("12 worker 0 50000\n13 manager - 40000\nnoise\n14 worker 1\nx worker 2 3\n") == {
        "worker0": 12, "manager": 13}


# ---------------------------------------------------------------- RunRecord


def make_record(**changes) -> RunRecord:
    fields = dict(benchmark="b", run_id=RUN_ID, status="ok", error=None, k=1, p=2, args=["-n", "5"], manager=True,
                  keep=False, timeout_s=60.0, hosts=RunHosts(master="m", workers=["w1"]), cluster="c",
                  provider="local", config="configs/local.json", git=GitState(commit="a" * 40, dirty=False),
                  cloister_version="0.1.0", started="2026-01-01T00:00:00.000+00:00",
                  ended="2026-01-01T00:00:01.000+00:00", timings={"total_s": 1.0}, exit_codes={"master": 0},
                  roles=[Proc(role="master", host="m", index=None, port=45000, command="./b", pid=12, status="ok",
                              exit=0)],
                  failures={}, metric=0.5)
    return RunRecord(**{**fields, **changes})


def test_record_round_trip_and_keys():
    record = make_record()
    text = record.to_json()
    assert RunRecord.from_json(text) == record
    assert list(json.loads(text)) == [
        "benchmark", "run_id", "status", "error", "k", "p", "args", "manager", "keep", "timeout_s", "hosts",
        "cluster", "provider", "config", "git", "cloister_version", "started", "ended", "timings", "exit_codes",
        "roles", "failures", "metric", "preparation", "resources"]
    assert json.loads(text)["roles"][0] == {"role": "master", "host": "m", "index": None, "port": 45000,
                                            "command": "./b", "pid": 12, "status": "ok", "exit": 0}


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("metric"),
    lambda d: d.update(extra=1),
    lambda d: d.update(hosts="m"),
    lambda d: d.update(roles=[{"role": "master"}]),
    lambda d: d.update(git={"commit": None}),
])
def test_an_incomplete_record_is_refused(edit):
    data = json.loads(make_record().to_json())
    edit(data)
    with pytest.raises(ValueError, match="not a run record"):
        RunRecord.from_json(json.dumps(data))


def test_a_record_written_before_runs_listed_their_preparation_still_loads():
    data = json.loads(make_record(preparation={"declared": {}, "hosts": {}}).to_json())
    del data["preparation"]
    assert RunRecord.from_json(json.dumps(data)).preparation == {}


def test_local_runs_lists_records_oldest_first_and_skips_broken_ones(tmp_path):
    for run_id in ("20260102-000000-bbbb", "20260101-000000-aaaa"):
        (tmp_path / "b" / run_id).mkdir(parents=True)
        make_record(run_id=run_id).write(tmp_path / "b" / run_id)
    (tmp_path / "b" / "broken").mkdir()
    (tmp_path / "b" / "broken" / "run.json").write_text('{"run_id": "x"}')
    (tmp_path / "other" / "20260103-000000-cccc").mkdir(parents=True)
    (tmp_path / "other" / "20260103-000000-cccc" / "run.json").write_text("{")
    assert [r.run_id for r in local_runs(tmp_path)] == ["20260101-000000-aaaa", "20260102-000000-bbbb"]
    assert local_runs(tmp_path, benchmark="other") == []


# ---------------------------------------------------------------- RunSpec


INFO = ClusterInfo(provider="local", cluster_name="c", user="u", ssh_key="k",
                   nodes=[Node(role="master", id="0", host="127.0.0.1", private="10.0.0.1"),
                          Node(role="worker", id="1", host="127.0.0.2", private="10.0.0.2"),
                          Node(role="worker", id="2", host="127.0.0.3")])


@pytest.mark.parametrize("changes, message", [
    ({"k": 3}, "-k 3: the cluster has 2 workers"),
    ({"k": 0}, "-k 0: the cluster has 2 workers"),
    ({"nprocs": 0}, "-p 0: expected 1..15536 processes per host"),
    ({"run_id": "latest"}, "run id 'latest': expected YYYYMMDD-HHMMSS-xxxx"),
    ({"info": ClusterInfo(provider="local", cluster_name="c", user="u", ssh_key="k", nodes=[])},
     "the cluster has no master"),
])
def test_a_bad_run_spec_is_refused(tmp_path, changes, message):
    fields = dict(info=INFO, bench=registry(tmp_path), k=1, nprocs=1, run_id=RUN_ID, settings=Settings())
    with pytest.raises(ExperimentError, match=message):
        RunSpec(**{**fields, **changes})


@pytest.mark.parametrize("ports, p, key, port", [
    ({"worker_base": 39999}, 2, "manager", 40000),
    ({"master": 50003}, 4, "master", 50003),
])
def test_a_role_port_among_the_worker_ports_is_refused(tmp_path, ports, p, key, port):
    bench = registry(tmp_path, ports=ports)
    with pytest.raises(ExperimentError) as info:
        RunSpec(info=INFO, bench=bench, k=1, nprocs=p, run_id=RUN_ID, settings=Settings())
    assert str(info.value).startswith(f"{tmp_path / 'experiments.yaml'}: benchmark 'b': key 'ports.{key}': {port} is "
                                      f"also worker process {port - bench.worker_base}'s port with -p {p}")
    RunSpec(info=INFO, bench=bench, k=1, nprocs=port - bench.worker_base, run_id=RUN_ID, settings=Settings())


def test_run_spec_shape_and_the_local_manager_command(tmp_path):
    bench = registry(tmp_path, env={"Q": "it's"},
                     commands={"manager": 'echo {host} {worker_endpoints} {k} {run_id} "$Q" "$PUBLIC_HOSTNAME"; '
                                          'cat /proc/self/personality'})
    spec = RunSpec(info=INFO, bench=bench, k=2, nprocs=2, run_id=RUN_ID, settings=Settings(runs_dir=str(tmp_path)))
    assert spec.shape.worker_hosts == ["10.0.0.2", "127.0.0.3"]
    assert spec.shape.worker_endpoints == [("10.0.0.2", 50000), ("10.0.0.2", 50001), ("127.0.0.3", 50000),
                                           ("127.0.0.3", 50001)]
    assert spec.local_dir == tmp_path / "b" / RUN_ID
    assert spec.master_timeout == bench.timeout
    out = subprocess.run(["bash", "-c", manager_here(spec)], capture_output=True, text=True, timeout=30)
    # The master's address recorded in servers/ is its public one; ASLR is off for the manager started here.
    assert out.stdout.split() == ["10.0.0.1", "10.0.0.2:50000,10.0.0.2:50001,127.0.0.3:50000,127.0.0.3:50001",
                                  "2", RUN_ID, "it's", "127.0.0.1", "00040000"]


CHAINED = """starting worker 3
Traceback (most recent call last):
  File "w.py", line 5, in main
    s.bind(('0.0.0.0', 50000))
OSError: [Errno 98] Address already in use

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "w.py", line 9, in <module>
    main()
  File "w.py", line 7, in main
    raise RuntimeError('worker could not start')
RuntimeError: worker could not start
"""


def test_a_log_excerpt_holds_the_error_and_the_last_lines():
    assert excerpt("boom\n\n") == "boom"
    assert excerpt("") == excerpt("\n \n") == "(empty log)"
    assert excerpt("".join(f"line {i}\n" for i in range(20))) == "line 17 | line 18 | line 19"
    # A chained traceback's cause sits above its last lines.
    assert excerpt(CHAINED) == ("OSError: [Errno 98] Address already in use | ... | File \"w.py\", line 7, in main | "
                                "raise RuntimeError('worker could not start') | RuntimeError: worker could not start")
    # An exception line that names no error word is still found as the traceback's last line.
    odd = "Traceback (most recent call last):\n  File \"x\", line 1\nStopIteration\n" + "".join(f"n{i}\n" for i in range(5))
    assert excerpt(odd) == "StopIteration | ... | n2 | n3 | n4"
    # A tail that starts mid-line loses that line; long lines are cut.
    long = "x" * (TAIL_BYTES - 10) + "\nbind: Address already in use\n" + "y" * 300 + "\n"
    shown = excerpt(long)
    assert not shown.startswith("x") and "Address already in use" in shown and shown.endswith("y" * 240 + "...")
