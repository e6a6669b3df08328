"""Resource time series: the /proc sampler on this machine and on the local cluster's real hosts, its
parser, resources.csv, resources.png, run.json's summary and the sweep's columns."""

from __future__ import annotations

import csv
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

from cloister.cluster import lifecycle as lib
from cloister.runs import sweep as sweeplib
from cloister.errors import ConfigError
from cloister.runs.experiments import load_registry
from cloister.runs import GitState, RunHosts, RunRecord
from cloister.runs import draw
from cloister.runs import resources as res
from conftest import INV, REPO, no_traceback, one_line_error

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PORTS = {"manager": 42100, "master": 47100, "worker_base": 52100}
# Worker 0 spins; every other worker listens and waits. Both listen, so readiness is by port.
BURN = """#!/bin/sh
exec python3 - "$1" "$2" "$3" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
if sys.argv[3] == "0":
    while True:
        pass
s.accept()
PY
"""


def raw(*samples: str, interval: str = "1") -> str:
    head = [f"interval {interval}", "hz 100", "page 4096", "epoch 1000.5 100.0", "vendor Amazon EC2",
            "machine m5.large", "cpu_model Intel Xeon"]
    return "\n".join(head + list(samples)) + "\n"


# uptime ticks rss procs self mem_total mem_avail rx tx rd_sectors wr_sectors cpus
SAMPLES = ("s 100.0 0 100 2 0 1000 600 0 0 0 0 cpu:0:200 cpu0:0:100 cpu1:0:100",
           "s 101.0 100 200 2 1 1000 500 1000 2000 8 16 cpu:150:400 cpu0:100:200 cpu1:50:200",
           "garbage line cut by a kill",
           "s 102.0 150 150 1 2 1000 550 3000 2500 8 16 cpu:200:600 cpu0:150:300 cpu1:50:300",
           "s 102.5 0 0 0 2 1000 900 3000 2500 8 16 cpu:200:700 cpu0:150:350 cpu1:50:350")


def test_parser_rates_and_summary():
    host = res.parse_raw(raw(*SAMPLES))
    assert len(host.samples) == 4
    rows = res.host_rows(host, start=1000.5)
    at = {(t, metric): value for t, metric, value in rows}
    assert at[(1.0, "cpu_pct")] == 75.0 and at[(1.0, "cpu0_pct")] == 100.0 and at[(1.0, "cpu1_pct")] == 50.0
    assert at[(1.0, "run_cpu_pct")] == 100.0  # 100 ticks at 100 Hz in one second: one whole core
    assert at[(1.0, "net_rx_bytes_s")] == 1000 and at[(1.0, "disk_write_bytes_s")] == 16 * 512
    assert at[(0.0, "mem_used_bytes")] == 400 * 1024 and at[(0.0, "run_rss_bytes")] == 100 * 4096
    # The processes ended before the last sample: their CPU left the sum, so that interval has no run CPU.
    assert (2.5, "run_cpu_pct") not in at
    summary = res.summarize(host)
    assert summary["instance_type"] == "m5.large" and summary["cores"] == 2 and summary["samples"] == 4
    assert summary["cpu_peak_pct"] == 75.0 and summary["cpu_mean_pct"] == 40.0
    assert summary["run_cpu_peak_pct"] == 100.0 and summary["run_cpu_mean_pct"] == 75.0
    assert summary["mem_peak_bytes"] == 500 * 1024 and summary["run_rss_peak_bytes"] == 200 * 4096
    assert (summary["net_rx_bytes"], summary["net_tx_bytes"]) == (3000, 2500)
    assert (summary["disk_read_bytes"], summary["disk_write_bytes"]) == (8 * 512, 16 * 512)
    assert summary["sampler_cpu_pct"] == 0.8  # 2 ticks in 2.5 s


def test_a_restarted_sampler_starts_a_new_segment():
    text = raw(*SAMPLES[:2]) + "epoch 2000.0 500.0\n" + SAMPLES[1].replace("101.0", "500.0") + "\n"
    host = res.parse_raw(text)
    assert [s.segment for s in host.samples] == [1, 1, 2]
    assert host.samples[-1].t == 2000.0
    assert res.summarize(host)["cpu_mean_pct"] == 75.0  # no rate across the two samplers


def test_the_sampler_ends_by_itself_when_the_runs_processes_are_gone(tmp_path):
    """POSIX sh and awk on this machine: samples while the run's process lives, then stops on its own."""
    worker = subprocess.Popen(["sleep", "1.5"], start_new_session=True)
    (tmp_path / "pids").write_text(f"{worker.pid} worker 0 1\n")
    sampler = subprocess.Popen(["setsid", "sh", "-c", res._SAMPLER, "sampler", str(tmp_path), "0.2",
                                "CLOISTER_RUN_ID=20260101-000000-abcd", "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        assert worker.wait(timeout=30) == 0
        sampler.wait(timeout=30)
    finally:
        for proc in (worker, sampler):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    host = res.parse_raw((tmp_path / res.RAW_FILE).read_text())
    assert len(host.samples) >= 2, (tmp_path / res.RAW_FILE).read_text()
    assert host.facts["interval"] == "0.2" and host.facts["hz"].isdigit()
    assert {"cpu", "cpu0"} <= set(host.samples[0].cpus)


@pytest.mark.parametrize("value, expected", [(None, 1.0), (0.5, 0.5), (False, 0.0), ("off", 0.0), ("soon", None),
                                             (0.01, None)])
def test_the_interval_is_declared_per_benchmark(tmp_path, value, expected):
    data = yaml.safe_load((REPO / "experiments.yaml").read_text())
    data["defaults"].pop("resources")
    data["benchmarks"]["dsum"] = {} if value is None else {"resources": value}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(data))
    if expected is None:
        with pytest.raises(ConfigError, match="key 'resources': expected seconds between resource samples"):
            load_registry(path)
    else:
        assert load_registry(path).get("dsum").resources == expected


def test_a_record_without_resources_still_loads():
    record = RunRecord(benchmark="b", run_id="20260101-000000-abcd", status="ok", error=None, k=1, p=1, args=[],
                       manager=True, keep=False, timeout_s=60.0, hosts=RunHosts(master="m", workers=["w"]),
                       cluster="c", provider="local", config="", git=GitState(commit=None, dirty=None),
                       cloister_version="0", started="2026-01-01T00:00:00.000+00:00", ended=None, timings={},
                       exit_codes={}, roles=[], failures={}, metric=None)
    data = json.loads(record.to_json())
    del data["resources"]
    assert RunRecord.from_json(json.dumps(data)).resources == {}


def test_sweep_rows_carry_the_resource_summary(tmp_path):
    host = res.summarize(res.parse_raw(raw(*SAMPLES)))
    combos = sweeplib.combos(ks=[1], ps=[1, 2], grid={}, repeat=1)
    state = sweeplib.SweepState(tmp_path / "s", {"benchmark": "b", "k": [1], "p": [1, 2], "grid": {}})
    base = json.loads(RunRecord(
        benchmark="b", run_id="20260101-000000-abcd", status="ok", error=None, k=1, p=1, args=[], manager=True,
        keep=False, timeout_s=60.0, hosts=RunHosts(master="m", workers=["w"]), cluster="c", provider="local",
        config="", git=GitState(commit=None, dirty=None), cloister_version="0", started="", ended="",
        timings={"total_s": 1.0}, exit_codes={}, roles=[], failures={}, metric=None).to_json())
    sampled = RunRecord.from_json(json.dumps({**base, "resources": {"interval_s": 1.0,
                                                                    "hosts": {"m": host, "w": host}}}))
    state.finish(combos[0], sampled)
    state.finish(combos[1], RunRecord.from_json(json.dumps(base)))
    with open(state.csv_path, newline="") as src:
        rows = list(csv.DictReader(src))
    assert rows[0]["cpu_peak_pct"] == "75.0" and rows[0]["net_bytes"] == str(2 * 5500)
    assert rows[0]["run_cpu_mean_pct"] == "75.0" and rows[0]["mem_peak_bytes"] == str(500 * 1024)
    assert all(rows[1][name] == "" for name in res.SWEEP_FIELDS)


# ---------------------------------------------------------------- on the local cluster


class Bench:
    """`inv` against the shared local cluster with a registry holding dsum and the burn benchmark."""

    def __init__(self, cluster, tmp_path: Path):
        self.cluster, self.info = cluster, cluster.info
        self.runs_dir = tmp_path / "runs"
        data = yaml.safe_load((REPO / "experiments.yaml").read_text())
        data["benchmarks"]["burn"] = {"dir": "~/burn", "binary": "./burn.sh", "ports": PORTS, "resources": 0.5,
                                      "commands": {"worker": "{binary} {host} {port} {index}", "master": "sleep 4"}}
        self.registry = tmp_path / "experiments.yaml"
        self.registry.write_text(yaml.safe_dump(data))

    def inv(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**self.cluster.env(), "INVOKE_CLOISTER_RUNS_DIR": str(self.runs_dir),
               "INVOKE_CLOISTER_EXPERIMENTS": str(self.registry), "COLUMNS": "200"}
        return subprocess.run([INV, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    def remote(self, command: str) -> dict[str, str]:
        outputs = lib.run(self.info, command, nodes=self.info.cluster_nodes, settings=self.cluster.settings,
                          timeout=30)
        for out in outputs:
            assert out.error is None, f"[{out.host}] {out.error}"
        return {out.host: out.stdout for out in outputs}

    def only_run(self, benchmark: str) -> Path:
        runs = sorted((self.runs_dir / benchmark).iterdir())
        assert len(runs) == 1, runs
        return runs[0]


@pytest.fixture
def bench(local_cluster, tmp_path):
    b = Bench(local_cluster, tmp_path)
    b.remote(f"mkdir -p ~/burn && printf %s {shlex.quote(BURN)} > ~/burn/burn.sh && chmod +x ~/burn/burn.sh")
    try:
        yield b
    finally:
        b.remote("pkill -f '[b]urn.sh' || true; rm -rf ~/burn")


def test_a_cpu_burning_worker_shows_on_its_host_only(bench):
    proc = bench.inv("exp.run", "--benchmark", "burn", "-k", "2", "-p", "1", "--no-manager")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    run_dir = bench.only_run("burn")
    master, burner, idle = bench.info.master.host, bench.info.workers[0].host, bench.info.workers[1].host
    for host in (master, burner, idle):
        assert (run_dir / host / res.RAW_FILE).stat().st_size > 0, host

    record = json.loads((run_dir / "run.json").read_text())
    assert record["resources"]["interval_s"] == 0.5
    hosts = record["resources"]["hosts"]
    assert set(hosts) == {master, burner, idle}
    assert all(s["samples"] >= 2 for s in hosts.values()), hosts
    # The spinning worker is the run's CPU on its host, and only there (on a loaded 2-core machine it gets
    # only its share of a core: what is tested is that the CPU is counted, and counted on the right host).
    assert hosts[burner]["run_cpu_mean_pct"] > 10, hosts
    assert hosts[burner]["run_cpu_mean_pct"] > 5 * max(hosts[idle]["run_cpu_mean_pct"],
                                                       hosts[master]["run_cpu_mean_pct"], 1), hosts
    assert hosts[burner]["run_rss_peak_bytes"] > 0 and hosts[idle]["run_rss_peak_bytes"] > 0

    with open(run_dir / res.CSV_FILE, newline="") as src:
        rows = list(csv.DictReader(src))
    assert {r["host"] for r in rows} == {master, burner, idle}
    metrics = {r["metric"] for r in rows}
    assert {"cpu_pct", "cpu0_pct", "run_cpu_pct", "mem_used_bytes", "run_rss_bytes", "net_rx_bytes_s",
            "net_tx_bytes_s", "disk_read_bytes_s", "disk_write_bytes_s"} <= metrics
    # Drawn by a detached process after inv has returned: it comes, without inv.
    image = wait_for_file(run_dir / res.PNG_FILE)
    assert image.startswith(PNG_SIGNATURE) and len(image) > 20_000
    width, height = int.from_bytes(image[16:20], "big"), int.from_bytes(image[20:24], "big")
    assert 800 <= width <= 2000 and 400 <= height <= 2000, (width, height)

    # Nothing of the run, the sampler included, outlives it on any host.
    run_id = run_dir.name
    pattern = shlex.quote(f"[{run_id[0]}]{run_id[1:]}")
    assert not any(bench.remote(f"pgrep -af {pattern} || true").values())
    assert not any(bench.remote("pgrep -af '[b]urn.sh' || true").values())


def wait_for_file(path: Path, *, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)
    return path.read_bytes()


def short_run(folder: Path, *, samples: int) -> RunRecord:
    """A run folder as a 1.2 s run leaves it: ``samples`` samples of two hosts, run.json, resources.csv."""
    record = RunRecord(benchmark="dsum", run_id="20260101-000000-abcd", status="ok", error=None, k=1, p=2, args=[],
                       manager=True, keep=False, timeout_s=60.0, hosts=RunHosts(master="m", workers=["w"]),
                       cluster="c", provider="local", config="", git=GitState(commit=None, dirty=None),
                       cloister_version="0", started="2026-01-01T00:00:00+00:00", ended="", exit_codes={}, roles=[],
                       failures={}, metric=None,
                       timings={"workers_started_s": 0.2, "workers_ready_s": 0.5, "master_started_s": 0.5,
                                "master_s": 0.6, "total_s": 1.2})
    folder.mkdir(parents=True)
    record.write(folder)
    rows = {host: [(round(0.1 + i * 0.5, 3), metric, value) for i in range(samples)
                   for metric, value in (("cpu_pct", 40.0 + i), ("cpu0_pct", 30.0), ("run_cpu_pct", 12.5 * (host == "w")),
                                         ("mem_used_bytes", 2e9), ("run_rss_bytes", 3e7), ("net_rx_bytes_s", 0.0),
                                         ("net_tx_bytes_s", 0.0), ("disk_read_bytes_s", 0.0),
                                         ("disk_write_bytes_s", 0.0))]
            for host in ("m", "w")}
    res.write_csv(folder / res.CSV_FILE, series=rows)
    return record


@pytest.mark.parametrize("samples", [1, 2, 40])
def test_a_short_runs_figure_draws_what_moved_and_names_what_did_not(tmp_path, samples):
    folder = tmp_path / "runs" / "dsum" / "20260101-000000-abcd"
    short_run(folder, samples=samples)
    figure = draw.ensure(folder)
    image = figure.read_bytes()
    assert figure == folder / res.PNG_FILE and image.startswith(PNG_SIGNATURE)
    # Five panels that moved and the legend: three rows, not five rows of mostly empty panels.
    drawn, flat = draw.panels(draw.read_csv(folder / res.CSV_FILE))
    assert [metric for metric, *_ in drawn] == ["cpu_pct", "cpu*", "run_cpu_pct", "mem_used_bytes", "run_rss_bytes"]
    assert flat == ["network in", "network out", "disk read", "disk written"]
    height = int.from_bytes(image[20:24], "big")
    assert height == int(72 * max(6.0, 2.6 * 3 + 1.2)), height
    # Drawn once: a second call finds it.
    before = figure.stat().st_mtime_ns
    assert draw.ensure(folder) == figure and figure.stat().st_mtime_ns == before


def test_the_background_drawer_outlives_its_parent(tmp_path):
    """The process inv starts to draw is in a session of its own: it draws after its parent has gone."""
    folder = tmp_path / "runs" / "dsum" / "20260101-000000-abcd"
    short_run(folder, samples=3)
    parent = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                             "from cloister.runs import draw; draw.in_background(Path(sys.argv[1]))", str(folder)],
                            cwd=tmp_path, timeout=30)
    assert parent.returncode == 0 and not (folder / res.PNG_FILE).exists()
    assert wait_for_file(folder / res.PNG_FILE).startswith(PNG_SIGNATURE)


def test_sampling_switched_off_by_flag(bench):
    proc = bench.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1", "--resources", "off")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = bench.only_run("dsum")
    assert not list(run_dir.glob(f"*/{res.RAW_FILE}"))
    assert not (run_dir / res.CSV_FILE).exists() and not (run_dir / res.PNG_FILE).exists()
    assert json.loads((run_dir / "run.json").read_text())["resources"] == {}


def test_a_bad_interval_is_a_one_line_error(bench):
    proc = bench.inv("exp.run", "--benchmark", "dsum", "-k", "1", "--resources", "soon")
    assert "--resources 'soon': expected seconds between resource samples" in one_line_error(proc)


def test_a_sweep_writes_each_runs_resource_summary(bench):
    proc = bench.inv("exp.sweep", "--benchmark", "dsum", "-k", "1,2", "-p", "1", "--name", "res")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(bench.runs_dir / "sweeps" / "res" / "results.csv", newline="") as src:
        rows = list(csv.DictReader(src))
    assert len(rows) == 2
    for row in rows:
        record = json.loads((bench.runs_dir / "dsum" / row["run_id"] / "run.json").read_text())
        hosts = record["resources"]["hosts"]
        assert len(hosts) == 1 + int(row["k"])
        assert float(row["cpu_peak_pct"]) == max(h["cpu_peak_pct"] for h in hosts.values())
        assert int(row["mem_peak_bytes"]) > 0 and row["net_bytes"] != "" and row["disk_bytes"] != ""
