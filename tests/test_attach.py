"""Runs that outlive their `inv`: exp.run SIGKILLed mid-run and finished by exp.attach, exp.run --detach
then exp.attach, and exp.ps during a run and after it; through `inv` against the local cluster."""

from __future__ import annotations

import json
import re

import pytest

from conftest import no_traceback
from test_clean_runs import Running, add_benchmarks, gate
from test_exp_runs import Exp, log_names


@pytest.fixture
def exp(local_cluster, tmp_path):
    e = Exp(local_cluster, tmp_path)
    try:
        yield e
    finally:
        e.killall(*(name for name in ("dsum", "gate") if name in e.registry.benchmarks))
        # A run a failed test left in flight must not be the next test's latest run.
        e.remote("rm -f ~/cloister/runs/*/*/state.json", nodes=[e.info.master])


def lock_state(exp: Exp) -> str:
    return exp.remote("test -e ~/cloister/runs/run.lock && echo held || echo free", nodes=[exp.info.master])[
        exp.info.master.host].strip()


def ps_rows(exp: Exp) -> list[str]:
    proc = exp.inv("exp.ps")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    return [line for line in proc.stdout.splitlines() if re.search(r"\d{8}-\d{6}-[0-9a-f]{4}", line)]


def assert_complete(exp: Exp, run_id: str, *, k: int) -> dict:
    """run.json says ok with every exit code, and every host's logs are in the run folder."""
    _, run_dir = exp.only_run("gate")
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["run_id"], record["status"], record["error"]) == (run_id, "ok", None)
    assert record["exit_codes"]["master"] == 0 and set(record["exit_codes"]) == {
        "manager", "master", *(f"worker{i}" for i in range(k))}
    assert {r["status"] for r in record["roles"]} == {"ok"}
    assert {"workers_ready_s", "master_started_s", "master_s", "total_s"} <= set(record["timings"])
    assert record["resources"]["hosts"].keys() == {exp.info.master.host, *(w.host for w in exp.info.workers[:k])}
    assert log_names(run_dir / exp.info.master.host) == {f"manager_{run_id}.log", f"master_{run_id}.log"}
    for i, node in enumerate(exp.info.workers[:k]):
        assert log_names(run_dir / node.host) == {f"worker{i}_{run_id}.log"}
    assert "master done" in (run_dir / exp.info.master.host / f"master_{run_id}.log").read_text()
    assert exp.leftovers() == {}
    assert lock_state(exp) == "free"
    return record


def test_attach_finishes_a_run_whose_inv_was_sigkilled(exp):
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    run = Running(exp, "--benchmark", "gate", "-k", "2", "-p", "1")
    try:
        run.wait_for("[master] master started")
    finally:
        run.stop()  # SIGKILL: no clean-up of any kind
    run_id, _ = exp.only_run("gate")
    assert lock_state(exp) == "held"  # the run goes on, and so does its lock
    rows = ps_rows(exp)
    assert len(rows) == 1 and run_id in rows[0] and "2 x 1" in rows[0], rows
    assert "worker 2/2" in rows[0] and "master 1/1" in rows[0] and "master started" in rows[0], rows
    exp.remote(f"touch {gate_file}", nodes=[exp.info.master])
    proc = exp.inv("exp.attach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    assert "[master] master done" in proc.stdout.splitlines()
    assert_complete(exp, run_id, k=2)
    assert ps_rows(exp) == []
    proc = exp.inv("exp.attach", "--run", run_id)
    assert proc.returncode == 1 and f"no run {run_id} in flight" in proc.stderr
    no_traceback(proc)


def test_detach_then_attach(exp):
    benchmark, gate_file = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    proc = exp.inv("exp.run", "--benchmark", "gate", "-k", "1", "-p", "1", "--detach", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id, _ = exp.only_run("gate")
    assert f"inv exp.attach --run {run_id}" in proc.stdout
    assert ps_rows(exp) and lock_state(exp) == "held"
    exp.remote(f"touch {gate_file}", nodes=[exp.info.master])
    proc = exp.inv("exp.attach", "--run", run_id, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[master] master started" in proc.stdout.splitlines()  # what came before is shown again
    assert_complete(exp, run_id, k=1)
    assert ps_rows(exp) == []


def test_attach_refuses_a_run_its_exp_run_still_follows_and_killall_ends_one_run(exp):
    benchmark, _ = gate(exp)
    add_benchmarks(exp, gate=benchmark)
    run = Running(exp, "--benchmark", "gate", "-k", "1", "-p", "1")
    try:
        run.wait_for("[master] master started")
        run_id, _ = exp.only_run("gate")
        proc = exp.inv("exp.attach", "--run", run_id)
        assert proc.returncode == 1 and "followed by a live session" in proc.stderr, proc.stderr
        no_traceback(proc)
        proc = exp.inv("exp.killall", "--run", run_id)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        code, _, stderr = run.end()
        assert code == 1 and f"run {run_id} killed" in stderr, stderr
        assert exp.record("gate")["status"] == "killed"
    finally:
        run.stop()
    assert exp.leftovers() == {} and ps_rows(exp) == [] and lock_state(exp) == "free"


def test_a_run_state_reads_back_as_written():
    from cloister.runs.detached import RunState
    from cloister.runs.record import GitState, Proc, RunHosts

    state = RunState(benchmark="gate", run_id="20260101-000000-abcd", k=2, p=3, args=["-n", "5"], manager=True,
                     keep=False, timeout=None, resources=0.5, lock=True, config="c.json",
                     hosts=RunHosts(master="m", workers=["w1", "w2"]), started="2026-01-01T00:00:00.000+00:00",
                     t0=1.5, timings={"master_started_s": 0.25}, git=GitState(commit=None, dirty=None),
                     procs=[Proc(role="master", host="m", index=None, port=45000, command="sh -c 'x'", pid=7)],
                     prepared={"m": [{"item": "aslr", "status": "done", "detail": ""}]})
    assert RunState.from_json(state.to_json()) == state
    with pytest.raises(ValueError):
        RunState.from_json('{"benchmark": "gate"}')
