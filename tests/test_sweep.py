"""exp.sweep: grid parsing, resumable state, and real sweeps of dsum on the local cluster."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cloister.runs import sweep as sweeplib
from cloister.errors import ExperimentError
from cloister.runs import GitState, RunHosts, RunRecord

from cloister.providers.local.machines import LocalCluster
from conftest import INV, REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(run_id: str, status: str, *, total_s: float | None = None, metric: float | None = None) -> RunRecord:
    """A run's record with what a sweep reads from it; the rest is filler."""
    return RunRecord(benchmark="b", run_id=run_id, status=status, error=None, k=1, p=1, args=[], manager=True,
                     keep=False, timeout_s=60.0, hosts=RunHosts(master="m", workers=["w"]), cluster="c",
                     provider="local", config="", git=GitState(commit=None, dirty=None), cloister_version="0",
                     started="", ended="", timings={} if total_s is None else {"total_s": total_s}, exit_codes={},
                     roles=[], failures={}, metric=metric)


def test_parse_int_list():
    assert sweeplib.parse_int_list("4,1,2,2", flag="-k") == [1, 2, 4]
    for bad in ("", "1,x", "0", "-1", "1.5"):
        with pytest.raises(ExperimentError, match="-k"):
            sweeplib.parse_int_list(bad, flag="-k")


def test_parse_args_grid():
    grid = sweeplib.parse_args_grid(["-n=10,20", "mode=a,b"])
    assert grid == {"-n": ["10", "20"], "--mode": ["a", "b"]}
    for bad in ("n", "=1,2", "n=", "; rm=1", "$(x)=1"):
        with pytest.raises(ExperimentError, match="--args-grid"):
            sweeplib.parse_args_grid([bad])


def test_combos_cover_the_grid():
    combos = sweeplib.combos(ks=[1, 2], ps=[1, 4], grid={"-n": ["10", "20"]}, repeat=3)
    assert len(combos) == 2 * 2 * 2 * 3
    assert len({c.key for c in combos}) == len(combos)
    assert sweeplib.combos(ks=[1], ps=[1], grid={}, repeat=1)[0].args == ()
    assert ("-n", "20") in {c.args for c in combos}


def test_state_resumes_and_refuses_another_grid(tmp_path):
    spec = {"benchmark": "b", "k": [1, 2], "p": [1], "grid": {}}
    combos = sweeplib.combos(ks=[1, 2], ps=[1], grid={}, repeat=1)
    state = sweeplib.SweepState(tmp_path / "s", spec)
    state.begin(combos[0], "20260101-000000-aaaa")
    state.finish(combos[0], record("20260101-000000-aaaa", "ok", total_s=1.5, metric=0.25))
    state.begin(combos[1], "20260101-000001-bbbb")  # then the process "dies"

    again = sweeplib.SweepState(tmp_path / "s", spec)
    assert again.current == {"key": combos[1].key, "run_id": "20260101-000001-bbbb"}
    assert [c.key for c in sweeplib.pending(again, combos)] == [combos[1].key]
    cleaned = []
    ran = []
    rows = sweeplib.run_sweep(state=again, all_combos=combos, fail_fast=False,
                              cleanup_interrupted=cleaned.append,
                              run_one=lambda combo, run_id: ran.append(combo) or record(run_id, "failed"))
    assert cleaned == ["20260101-000001-bbbb"]
    assert ran == [combos[1]]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["metric"] == "0.25" and rows[0]["duration_s"] == "1.5000"
    with pytest.raises(ExperimentError, match="another grid"):
        sweeplib.SweepState(tmp_path / "s", {**spec, "k": [1, 2, 4]})
    assert again.drop_failed() == 1 and [r["status"] for r in again.rows] == ["ok"]
    assert [c.key for c in sweeplib.pending(sweeplib.SweepState(tmp_path / "s", spec), combos)] == [combos[1].key]


def test_a_larger_repeat_adds_runs_to_the_same_sweep(tmp_path):
    spec = {"benchmark": "b", "k": [1], "p": [1, 2], "grid": {}}
    state = sweeplib.SweepState(tmp_path / "s", spec)
    once = sweeplib.combos(ks=[1], ps=[1, 2], grid={}, repeat=1)
    for combo in once:
        state.finish(combo, record(f"20260101-000000-000{combo.p}", "ok"))
    twice = sweeplib.combos(ks=[1], ps=[1, 2], grid={}, repeat=2)
    todo = list(sweeplib.pending(sweeplib.SweepState(tmp_path / "s", spec), twice))
    assert [(c.p, c.repeat) for c in todo] == [(1, 2), (2, 2)]


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    combos = sweeplib.combos(ks=[1, 2, 3], ps=[1], grid={}, repeat=1)
    state = sweeplib.SweepState(tmp_path / "s", {"x": 1})
    with pytest.raises(ExperimentError, match="fail-fast"):
        sweeplib.run_sweep(state=state, all_combos=combos, fail_fast=True, cleanup_interrupted=lambda r: None,
                           run_one=lambda combo, run_id: record(run_id, "failed"))
    assert len(state.rows) == 1


def test_files_of_a_sweep_that_are_not_what_it_wrote_are_named(tmp_path):
    """state.json with wrong types, a line of garbage or a row cut short in results.csv: one line naming
    the file and the key or line, never a traceback and never a row counted as a run."""
    spec = {"benchmark": "b", "k": [1, 2], "p": [1], "grid": {}}
    combos = sweeplib.combos(ks=[1, 2], ps=[1], grid={}, repeat=1)
    state = sweeplib.SweepState(tmp_path / "s", spec)
    state.finish(combos[0], record("20260101-000000-aaaa", "ok", total_s=1.5))
    good_state, good_csv = state.state_path.read_text(), state.csv_path.read_text()

    def refused(text: str, *, where: Path, match: str) -> None:
        where.write_text(text)
        with pytest.raises(ExperimentError) as err:
            sweeplib.SweepState(tmp_path / "s", spec)
        message = str(err.value)
        assert message.startswith(f"{where}: ") and "\n" not in message and match in message, message
        state.state_path.write_text(good_state)
        state.csv_path.write_text(good_csv)

    for text, key in (("[]", "spec"), ('{"spec": "b"}', "spec"), (json.dumps({"spec": spec, "current": 5}), "current"),
                      (json.dumps({"spec": spec, "current": {"key": "k=1", "run_id": "; rm -rf ~"}}), "current"),
                      ("{", "unreadable")):
        refused(text, where=state.state_path, match=key)
    refused(good_csv + "garbage\n", where=state.csv_path, match="line 3: 1 fields where the header has")
    cut = good_csv + good_csv.splitlines()[1].replace("aaaa", "bbbb").rsplit(",", 5)[0] + "\n"
    refused(cut, where=state.csv_path, match="line 3:")
    refused(good_csv.replace("20260101-000000-aaaa", "not-a-run"), where=state.csv_path, match="line 2: column run_id")
    refused(good_csv.replace(",ok,", ",$(x),"), where=state.csv_path, match="line 2: column status")
    refused("a,b\n", where=state.csv_path, match="line 1: expected the header")
    # The state as written reads back.
    assert len(sweeplib.SweepState(tmp_path / "s", spec).rows) == 1


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as src:
        return list(csv.DictReader(src))


def _sweep_args(name: str) -> list[str]:
    return ["exp.sweep", "--benchmark", "dsum", "-k", "1,2", "-p", "1,2", "--repeat", "2", "--name", name]


def _accepted(local_cluster) -> dict[str, int]:
    """SSH connections each host's sshd has accepted so far (sshd -e logs one line for each)."""
    machines = LocalCluster(state_root=local_cluster.settings.state_dir, cluster=local_cluster.cfg.cluster_name)
    return {n.name: (machines.host_dir(n.name) / "sshd.log").read_text().count("Accepted publickey")
            for n in local_cluster.info.cluster_nodes}


def test_sweep_2x2x2_writes_csv_and_plot(local_cluster, tmp_path):
    env = {**local_cluster.env(), "INVOKE_CLOISTER_RUNS_DIR": str(tmp_path)}
    before = _accepted(local_cluster)
    proc = subprocess.run([INV, *_sweep_args("grid")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Eight runs over at most one connection per host, none when it was warm already (a run that
    # reconnects would show as more).
    opened = {name: count - before[name] for name, count in _accepted(local_cluster).items()}
    assert opened[local_cluster.info.master.name] <= 1, opened
    rows = _rows(tmp_path / "sweeps" / "grid" / "results.csv")
    assert len(rows) == 8
    assert {(r["k"], r["p"], r["repeat"]) for r in rows} == {(k, p, r) for k in "12" for p in "12" for r in "12"}
    # The metric's column is named by its group (time_s); no run failed, so no error is recorded.
    assert all(r["status"] == "ok" and float(r["time_s"]) > 0 and float(r["duration_s"]) > 0 and r["error"] == ""
               for r in rows)
    for row in rows:  # each combination kept its own complete run folder
        record = json.loads((tmp_path / "dsum" / row["run_id"] / "run.json").read_text())
        assert (record["k"], record["p"], record["status"]) == (int(row["k"]), int(row["p"]), "ok")
    png = (tmp_path / "sweeps" / "grid" / "plot.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_sweep_resumes_after_the_process_is_killed(local_cluster, tmp_path):
    env = {**local_cluster.env(), "INVOKE_CLOISTER_RUNS_DIR": str(tmp_path)}
    csv_path = tmp_path / "sweeps" / "resume" / "results.csv"
    first = subprocess.Popen([INV, *_sweep_args("resume")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not csv_path.exists() or len(_rows(csv_path)) < 3):
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    before = _rows(csv_path)
    done_before = len(before)
    assert 3 <= done_before < 8, "the sweep must be killed mid-way for this test to mean anything"

    second = subprocess.run([INV, *_sweep_args("resume")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    rows = _rows(csv_path)
    keys = [(r["k"], r["p"], r["args"], r["repeat"]) for r in rows]
    assert len(rows) == 8 and len(set(keys)) == 8
    assert rows[:done_before] == before  # finished combinations were not run again
    # Nothing of any run is left on the hosts, including the one the kill interrupted.
    left = local_cluster.inv("cluster.run", "pgrep -f 'dsum -i' || true")
    assert left.returncode == 0, left.stderr
    assert "dsum -i" not in left.stdout
    # Every run says how it ended: the one the kill interrupted too, and none is left in flight.
    recorded = {row["run_id"] for row in rows}
    records = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "dsum").glob("*/run.json")}
    interrupted = {run_id: r for run_id, r in records.items() if run_id not in recorded}
    assert {r["status"] for r in interrupted.values()} <= {"interrupted", "ok"}, interrupted
    assert all(r["status"] == "ok" for run_id, r in records.items() if run_id in recorded)
    ps = subprocess.run([INV, "exp.ps"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert ps.returncode == 0 and not re.search(r"\d{8}-\d{6}-[0-9a-f]{4}", ps.stdout), ps.stdout
