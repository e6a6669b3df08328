"""exp.show and exp.compare: on records written here, and on real runs of dsum on the local cluster."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from cloister.errors import ExperimentError
from cloister.runs import GitState, Proc, RunHosts, RunRecord
from cloister.runs import present
from conftest import INV, REPO, no_traceback, one_line_error, run_inv

RUN_A, RUN_B = "20260101-000000-aaaa", "20260101-000100-bbbb"
SUMMARY = {"samples": 10, "instance_type": "m5.large", "cpu_model": "Intel Xeon", "cores": 2, "cpu_peak_pct": 80.0,
           "cpu_mean_pct": 40.0, "run_cpu_peak_pct": 150.0, "run_cpu_mean_pct": 90.0, "mem_peak_bytes": 2 << 30,
           "run_rss_peak_bytes": 300 << 20, "net_rx_bytes": 5 << 20, "net_tx_bytes": 1 << 20,
           "disk_read_bytes": 0, "disk_write_bytes": 4096, "sampler_cpu_pct": 0.4}


def make_record(run_id: str = RUN_A, **changes) -> RunRecord:
    fields = dict(
        benchmark="dsum", run_id=run_id, status="ok", error=None, k=1, p=2, args=["-n", "5"], manager=True,
        keep=False, timeout_s=60.0, hosts=RunHosts(master="m", workers=["w1"]), cluster="c", provider="ec2",
        config="configs/me.json", git=GitState(commit="a" * 40, dirty=False), cloister_version="0.1.0",
        started="2026-01-01T00:00:00.000+00:00", ended="2026-01-01T00:00:05.000+00:00",
        timings={"manager_ready_s": 0.5, "workers_started_s": 0.5, "workers_ready_s": 1.0, "master_started_s": 1.0,
                 "master_s": 3.0, "total_s": 4.5},
        exit_codes={"manager": None, "worker0": None, "worker1": None, "master": 0},
        roles=[Proc(role="manager", host="m", index=None, port=40000, command="./dsum", pid=10, status="killed"),
               Proc(role="worker", host="w1", index=0, port=50000, command="./dsum", pid=11, status="killed"),
               Proc(role="worker", host="w1", index=1, port=50001, command="./dsum", pid=12, status="killed"),
               Proc(role="master", host="m", index=None, port=45000, command="./dsum", pid=13, status="ok", exit=0)],
        failures={}, metric=0.25, resources={"interval_s": 1.0, "hosts": {"m": SUMMARY, "w1": SUMMARY}})
    return RunRecord(**{**fields, **changes})


def cells(sections: list) -> dict[str, list[str]]:
    """Every row of every section by its first cell."""
    return {row[0]: row for _, _, rows in sections for row in rows}


def test_show_has_every_part_of_the_record(tmp_path):
    rows = cells(present.show(make_record(), folder=tmp_path))
    assert rows["k"][1] == "1" and rows["p"][1] == "2" and rows["args"][1] == "-n 5"
    assert rows["commit"][1] == "a" * 12 and rows["metric"][1] == "0.25"
    assert rows["resources"][1] == "sampled every 1s"
    assert rows["master"][1:] == ["m", "1", "ok", "0"]
    assert rows["worker"][1:] == ["w1", "2", "killed", "-"]
    assert rows["all ready"][1:] == ["1.00s", "+0.50s"]
    assert rows["master ended"][1:] == ["4.00s", "+3.00s"]
    assert rows["killed, logs collected"][1:] == ["4.50s", "+0.50s"]
    assert rows["m"][1:4] == ["master", "m5.large", "80% / 40%"]
    assert rows["w1"][6] == "300.0 MiB" and rows["w1"][7] == "5.0 MiB / 1.0 MiB"


def test_compare_marks_what_differs():
    a = make_record()
    b = make_record(RUN_B, p=4, args=[], git=GitState(commit="b" * 40, dirty=True), metric=0.5,
                    timings={**a.timings, "master_s": 6.0, "total_s": 7.5},
                    resources={"interval_s": 1.0, "hosts": {"m": SUMMARY,
                                                            "w1": {**SUMMARY, "instance_type": "c5.xlarge",
                                                                   "cpu_mean_pct": 60.0}}})
    sections, differing = present.compare(a, b)
    assert differing == ["p", "args", "commit", "worker machines"]
    rows = cells(sections)
    assert rows["p"] == ["p", "2", "4", "≠"] and rows["k"][3] == ""
    assert rows["commit"][2] == "b" * 12 + " (uncommitted changes)"
    assert rows["metric"][3] == "+100%" and rows["master"][3] == "+100%" and rows["total"][3] == "+67%"
    assert rows["worker1: CPU mean"][1:] == ["40%", "60%", "+50%"]
    assert rows["master: CPU mean"][3] == ""
    assert [title for title, _, _ in sections] == ["runs", "durations", "resources"]


def test_compare_of_an_unsampled_run_from_before_resources():
    old = make_record(resources={}, timings={"workers_ready_s": 1.0, "master_s": 3.0, "total_s": 4.5})
    sections, differing = present.compare(old, make_record(RUN_B))
    assert "master machine" in differing
    rows = cells(sections)
    assert rows["master machine"][1:3] == ["-", "m5.large"]
    assert rows["master"][1:] == ["3.00s", "3.00s", ""]


def test_runs_are_found_by_id_or_folder(tmp_path):
    folder = tmp_path / "runs" / "dsum" / RUN_A
    folder.mkdir(parents=True)
    make_record().write(folder)
    assert present.find_run(RUN_A, runs_dir=tmp_path / "runs") == folder
    assert present.find_run(str(folder), runs_dir=tmp_path / "elsewhere") == folder
    with pytest.raises(ExperimentError, match=f"no run {RUN_B} in"):
        present.find_run(RUN_B, runs_dir=tmp_path / "runs")
    with pytest.raises(ExperimentError, match="neither a run folder"):
        present.find_run("latest", runs_dir=tmp_path / "runs")
    (tmp_path / "runs" / "other" / RUN_A).mkdir(parents=True)
    make_record().write(tmp_path / "runs" / "other" / RUN_A)
    with pytest.raises(ExperimentError, match="in 2 folders"):
        present.find_run(RUN_A, runs_dir=tmp_path / "runs")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text("{}")
    with pytest.raises(ExperimentError, match="unreadable"):
        present.load_run(str(broken), runs_dir=tmp_path)


def test_unknown_runs_are_one_line_errors(tmp_path):
    env = {"INVOKE_CLOISTER_RUNS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    assert f"no run {RUN_A} in" in one_line_error(run_inv("exp.show", RUN_A, env=env))
    assert "neither a run folder" in one_line_error(run_inv("exp.compare", "nope", RUN_A, env=env))


# ---------------------------------------------------------------- real runs


def exp(cluster, runs_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**cluster.env(), "INVOKE_CLOISTER_RUNS_DIR": str(runs_dir), "COLUMNS": "200"}
    return subprocess.run([INV, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_show_and_compare_two_dsum_runs(local_cluster, tmp_path):
    runs_dir = tmp_path / "runs"
    first = exp(local_cluster, runs_dir, "exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    second = exp(local_cluster, runs_dir, "exp.run", "--benchmark", "dsum", "-k", "1", "-p", "2", "--args", "-x 8")
    assert second.returncode == 0, second.stdout + second.stderr
    run_a, run_b = sorted(p.name for p in (runs_dir / "dsum").iterdir())

    shown = exp(local_cluster, runs_dir, "exp.show", run_a)
    assert shown.returncode == 0, shown.stderr
    no_traceback(shown)
    record = json.loads((runs_dir / "dsum" / run_a / "run.json").read_text())
    master, worker = local_cluster.info.master.host, local_cluster.info.workers[0].host
    for text in (f"dsum run {run_a}: ok", "phases", "master ended", "resources per host", "sampled every 1s",
                 str(record["metric"]), master, worker, "resources.png"):
        assert text in shown.stdout, text
    row = r"master\s*│\s*" + re.escape(master) + r"\s*│\s*1\s*│\s*ok\s*│\s*0"
    assert re.search(row, shown.stdout), shown.stdout

    # A folder works as well as an id.
    compared = exp(local_cluster, runs_dir, "exp.compare", str(runs_dir / "dsum" / run_a), run_b)
    assert compared.returncode == 0, compared.stderr
    no_traceback(compared)
    assert compared.stdout.strip().splitlines()[-1] == "differ in: p, args"
    assert re.search(r"│ p\s*│ 1\s*│ 2\s*│ ≠", compared.stdout), compared.stdout
    assert re.search(r"│ args\s*│ -\s*│ -x 8\s*│ ≠", compared.stdout), compared.stdout
    assert "worker1: run CPU mean" in compared.stdout
