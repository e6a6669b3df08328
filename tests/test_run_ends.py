"""Every run concludes: `inv` stopped at every phase of a run (SIGKILL, SIGHUP, SIGSTOP), two attaches at
once, Ctrl-C in exp.attach, exp.killall --run, exp.logs after a kill during the download, cluster.destroy
mid-run. After each: nothing of the run on any host (asked over SSH), the lock free, and run.json says
what happened. Through real `inv` processes and real signals against the local cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime

import pytest

from conftest import INV, REPO, no_traceback
from test_attach import lock_state, ps_rows
from test_clean_runs import Running, add_benchmarks, gate
from test_exp_runs import DSUM_DIR, Exp

# Whatever these tests start: dsum, the gate master's loop, the stalls below, and the tail that follows a master.
LEFTOVERS = "[d]sum -i|[g]ate-|[s]leep 3[0-9]|[t]ail -n .* -F"
STALL = "sh -c 'echo starting; exec sleep 33'"  # a role that never gets ready


@pytest.fixture
def exp(local_cluster, tmp_path):
    e = Exp(local_cluster, tmp_path)
    try:
        yield e
    finally:
        e.killall(*(name for name in ("dsum", "gate", "stallm", "stallw", "bigmaster") if name in e.registry.benchmarks))
        e.remote("rm -f ~/cloister/runs/*/*/state.json ~/cloister/runs/run.lock ~/gate-*", nodes=[e.info.master])


def settled(exp: Exp, benchmark: str, status: str) -> dict:
    """Nothing of any run is left on any host, the lock is free, no run is in flight and run.json says
    ``status``; the record."""
    assert exp.leftovers(LEFTOVERS) == {}
    assert lock_state(exp) == "free"
    assert ps_rows(exp) == []
    record = exp.record(benchmark)
    assert record["status"] == status, record
    assert record["ended"] and "running" not in {r["status"] for r in record["roles"]}, record
    return record


def state_on_master(exp: Exp, benchmark: str) -> dict:
    text = exp.remote(f"cat ~/cloister/runs/{benchmark}/*/state.json 2>/dev/null || true",
                      nodes=[exp.info.master])[exp.info.master.host]
    return json.loads(text) if text.strip() else {}


def wait_phase(exp: Exp, benchmark: str, phase: str, run: Running | None = None) -> None:
    deadline = time.monotonic() + 60
    while state_on_master(exp, benchmark).get("phase") != phase:
        assert run is None or run.proc.poll() is None, "inv ended first"
        assert time.monotonic() < deadline, f"the run never reached {phase}"
        time.sleep(0.1)


@pytest.mark.parametrize("benchmark, phase, sig", [("stallm", "manager", signal.SIGKILL),
                                                   ("stallw", "workers", signal.SIGHUP)])
def test_inv_dying_during_start_up_leaves_a_run_that_attach_ends(exp, benchmark, phase, sig):
    add_benchmarks(exp, stallm={"dir": DSUM_DIR, "binary": "./dsum", "commands": {"manager": STALL}},
                   stallw={"dir": DSUM_DIR, "binary": "./dsum", "ready": {"log": "^never$"}, "ready_timeout": 120,
                           "commands": {"worker": STALL}})
    run = Running(exp, "--benchmark", benchmark, "-k", "2", "-p", "1")
    try:
        wait_phase(exp, benchmark, phase, run)
        time.sleep(1)  # its processes are started
        run.proc.send_signal(sig)
        run.proc.wait(timeout=30)
    finally:
        run.stop()
    run_id, _ = exp.only_run(benchmark)
    rows = ps_rows(exp)
    assert len(rows) == 1 and run_id in rows[0] and f"({phase})" in rows[0], rows
    assert lock_state(exp) == "held"
    proc = exp.inv("exp.attach", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    assert f"run {run_id} interrupted" in proc.stderr
    record = settled(exp, benchmark, "interrupted")
    assert f"while starting the {phase}" in record["error"]
    assert "killed" in {r["status"] for r in record["roles"]}, record["roles"]  # what had started


def test_killall_run_ends_a_detached_run_and_records_it(exp):
    benchmark, _ = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    proc = exp.inv("exp.run", "--benchmark", "gate", "-k", "2", "-p", "1", "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id, run_dir = exp.only_run("gate")
    proc = exp.inv("exp.killall", "--run", run_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"gate run {run_id}: killed" in proc.stdout
    record = settled(exp, "gate", "killed")
    assert record["error"] == "killed by exp.killall --run"
    assert (run_dir / exp.info.master.host / f"master_{run_id}.log").exists()
    assert record["resources"]["hosts"]


def test_sigkill_during_the_download_is_completed_by_exp_logs(exp):
    # A master that leaves 150 MB of random bytes in the run folder: the download takes seconds.
    big = ("sh -c 'head -c 150000000 /dev/urandom > \"$CLOISTER_RUN_DIR\"/big.bin; echo master done'")
    add_benchmarks(exp, bigmaster={"dir": DSUM_DIR, "binary": "./dsum", "commands": {"master": big}})
    run = Running(exp, "--benchmark", "bigmaster", "-k", "1", "-p", "1")
    try:
        run.wait_for("[master] master done")
        time.sleep(1.0)
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(timeout=30)
    finally:
        run.stop()
    run_id, run_dir = exp.only_run("bigmaster")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    rows = ps_rows(exp)  # still listed: its record is not written
    assert len(rows) == 1 and run_id in rows[0], rows
    proc = exp.inv("exp.logs", "--benchmark", "bigmaster", "--run", run_id, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run.json completed: ok" in proc.stdout
    record = settled(exp, "bigmaster", "ok")
    assert record["exit_codes"]["master"] == 0 and record["resources"]["hosts"]
    assert (run_dir / exp.info.master.host / f"master_{run_id}.log").read_text().strip() == "master done"
    exp.remote(f"rm -rf ~/cloister/runs/bigmaster/{run_id}")


def test_a_frozen_inv_is_taken_over_by_attach_force(exp):
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    run = Running(exp, "--benchmark", "gate", "-k", "1", "-p", "1")
    try:
        run.wait_for("[master] master started")
        run_id, _ = exp.only_run("gate")
        run.proc.send_signal(signal.SIGSTOP)  # a closed lid: the TCP connection stays open
        gate_at = time.time()
        exp.remote(f"touch {gate_file}", nodes=[exp.info.master])
        time.sleep(12)  # past the heartbeat's staleness
        proc = exp.inv("exp.attach", "--run", run_id)
        assert proc.returncode == 1 and "has not answered for" in proc.stderr and "--force" in proc.stderr, proc.stderr
        proc = exp.inv("exp.attach", "--run", run_id, "--force", timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        record = settled(exp, "gate", "ok")
        # Timed by the master's host: it ended right after the gate, not when the run was taken over.
        assert record["timings"]["master_s"] < gate_at - datetime.fromisoformat(record["started"]).timestamp() + 1
        assert datetime.fromisoformat(record["ended"]).timestamp() < gate_at + 1
        run.proc.send_signal(signal.SIGCONT)  # the laptop wakes up: it must leave the run alone
        code, _, stderr = run.end()
        assert code == 1 and f"run {run_id} incomplete" in stderr and "taken over" in stderr, stderr
        assert exp.record("gate") == record  # the record of the session that finished it stays
        assert exp.leftovers(LEFTOVERS) == {}
    finally:
        run.proc.send_signal(signal.SIGCONT)
        run.stop()


def test_two_attaches_at_once_one_follows(exp):
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    proc = exp.inv("exp.run", "--benchmark", "gate", "-k", "1", "-p", "1", "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id, _ = exp.only_run("gate")
    attaches = [subprocess.Popen([INV, "exp.attach", "--run", run_id], cwd=REPO, env=exp.env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        time.sleep(4)
        exp.remote(f"touch {gate_file}", nodes=[exp.info.master])
        results = sorted((a.wait(timeout=120), a.stderr.read()) for a in attaches)
    finally:
        for a in attaches:
            if a.poll() is None:
                a.kill()
    assert results[0][0] == 0 and results[1][0] == 1, results
    assert "followed by a live session" in results[1][1], results
    settled(exp, "gate", "ok")


def test_ctrl_c_in_attach_stops_following_and_twice_ends_the_run(exp):
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    proc = exp.inv("exp.run", "--benchmark", "gate", "-k", "1", "-p", "1", "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id, _ = exp.only_run("gate")

    def attach_then_interrupt(times: int) -> tuple[int, str]:
        att = subprocess.Popen([INV, "exp.attach", "--run", run_id], cwd=REPO, env=exp.env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert att.stdout.readline().startswith("attaching to")
            assert att.stdout.readline().startswith("[master]")
            for _ in range(times):
                att.send_signal(signal.SIGINT)
                time.sleep(0.3)
            return att.wait(timeout=60), att.stderr.read()
        finally:
            if att.poll() is None:
                att.kill()

    code, stderr = attach_then_interrupt(1)
    assert code == 130 and "stopped following" in stderr and f"inv exp.killall --run {run_id}" in stderr, stderr
    no_traceback(subprocess.CompletedProcess([], code, "", stderr))
    rows = ps_rows(exp)
    assert len(rows) == 1 and "master 1/1" in rows[0], rows  # it goes on
    code, stderr = attach_then_interrupt(2)
    assert code == 130 and f"run {run_id} ended: interrupted" in stderr, stderr
    settled(exp, "gate", "interrupted")


def test_destroy_mid_run_collects_the_logs_first(own_cluster, tmp_path):
    cluster = own_cluster("radestroy", nworkers=2)
    exp = Exp(cluster, tmp_path)
    benchmark, _ = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    proc = exp.inv("exp.run", "--benchmark", "gate", "-k", "2", "-p", "1", "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id, run_dir = exp.only_run("gate")
    proc = exp.inv("cluster.destroy", "--yes", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ending it and collecting its logs before destroying" in proc.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["error"]) == ("killed", "killed by cluster.destroy")
    assert (run_dir / cluster.info.master.host / f"master_{run_id}.log").read_text().startswith("master started")
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {cluster.info.master.host,
                                                                 *(w.host for w in cluster.info.workers)}


def test_attach_finds_a_master_whose_start_was_not_saved(exp):
    # inv died after the master's start command ran but before the master's PID reached state.json.
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    proc = exp.inv("exp.run", "--benchmark", "gate", "-k", "1", "-p", "1", "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = state_on_master(exp, "gate")
    for p in state["procs"]:
        if p["role"] == "master":
            p.update(pid=None, status="starting")
    exp.remote(f"cat > ~/cloister/runs/gate/{state['run_id']}/state.json <<'EOF'\n{json.dumps(state)}\nEOF\n"
               f"touch {gate_file}", nodes=[exp.info.master])
    proc = exp.inv("exp.attach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[master] master done" in proc.stdout.splitlines()
    settled(exp, "gate", "ok")
