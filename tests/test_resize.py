"""cluster.resize, cluster.repair and exp.sweep --repair on real local clusters (sshd hosts in namespaces).

A host is killed through the local provider's own API (``LocalCluster.kill_host``: SIGKILL to the PID 1
it recorded), as a machine that dies would go; never by entering its namespaces.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cloister.cluster.servers import read_servers
from cloister.providers.local.machines import LocalCluster
from cloister.errors import ExperimentError, ProviderError
from cloister.runs import sweep as sweeplib
from conftest import INV, REPO, ClusterEnv, make_cluster, no_traceback, one_line_error
from test_exp_runs import DSUM_DIR, DSUM_MASTER
from test_sweep import record

SUFFIX = os.getpid() % 100000


@pytest.fixture
def cluster(tmp_path):
    """A local cluster of a master and 2 workers (prefix rr), with a registry holding a slower dsum."""
    made = make_cluster(tmp_path / "c", f"rr-{SUFFIX}", nworkers=2, dev=False)
    registry = yaml.safe_load((REPO / "experiments.yaml").read_text())
    # The master naps first, so that a run is in flight long enough for a host to die under it.
    registry["benchmarks"]["napsum"] = {"dir": DSUM_DIR, "binary": "./dsum",
                                        "commands": {"master": "sleep 1 && " + DSUM_MASTER}}
    (tmp_path / "experiments.yaml").write_text(yaml.safe_dump(registry))
    made.extra = {"INVOKE_CLOISTER_EXPERIMENTS": str(tmp_path / "experiments.yaml"),
                  "INVOKE_CLOISTER_RUNS_DIR": str(tmp_path / "runs"), "COLUMNS": "200"}
    try:
        yield made
    finally:
        from cloister.cluster import lifecycle as lib

        lib.destroy(made.cfg, settings=made.settings)


def inv(cluster: ClusterEnv, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([INV, *args], cwd=REPO, env={**cluster.env(), **cluster.extra}, capture_output=True,
                          text=True, timeout=timeout)


def servers(cluster: ClusterEnv):
    return read_servers(cluster.settings.servers_dir)


def machines(cluster: ClusterEnv) -> LocalCluster:
    return LocalCluster(state_root=cluster.settings.state_dir, cluster=cluster.cfg.cluster_name)


def check_size(cluster: ClusterEnv, count: int) -> None:
    """servers/ lists workers 1..count in order; exp.run -k count works; plain `ssh WORKER` (by name and by
    address) works from the master to every worker, with what copy-dns wrote there."""
    info = servers(cluster)
    name = cluster.cfg.cluster_name
    assert [w.name for w in info.workers] == [f"{name}-worker-{i}" for i in range(1, count + 1)]
    listed = (Path(cluster.settings.servers_dir) / "servers.txt").read_text().split()
    assert listed == [w.host for w in info.workers]
    targets = " ".join(shlex.quote(t) for w in info.workers for t in (w.name, w.host))
    proc = inv(cluster, "cluster.run", "--role", "master",
               f"for w in {targets}; do ssh $w hostname || echo FAILED $w; done; cat ~/cloister/servers/mpi_hosts.txt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout, proc.stdout
    for worker in info.workers:
        assert proc.stdout.splitlines().count(worker.name) == 2, proc.stdout
        assert f"{worker.host} slots=1" in proc.stdout, proc.stdout
    run = inv(cluster, "exp.run", "-b", "dsum", "-k", str(count), "-p", "1", "--resources", "off")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"partitions={count} workers={count}" in run.stdout, run.stdout


def test_resize_grows_and_shrinks_with_runs_at_each_size(cluster):
    check_size(cluster, 2)
    dry = inv(cluster, "cluster.resize", "--nworkers", "5", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    name = cluster.cfg.cluster_name
    assert f"local cluster '{name}': 2 -> 5 workers: start worker-3, worker-4, worker-5" in dry.stdout, dry.stdout
    assert "cost change: +$0.00/hour" in dry.stdout, dry.stdout
    assert len(servers(cluster).workers) == 2 and len(machines(cluster).state()["hosts"]) == 3

    grown = inv(cluster, "cluster.resize", "--nworkers", "5")
    assert grown.returncode == 0, grown.stdout + grown.stderr
    no_traceback(grown)
    assert "servers/ rewritten and copied to 6 nodes" in grown.stdout, grown.stdout
    before = servers(cluster).workers[:2]
    check_size(cluster, 5)
    assert servers(cluster).workers[:2] == before  # the workers that were there stay, in place

    shrunk = inv(cluster, "cluster.resize", "--nworkers", "3")
    assert shrunk.returncode == 0, shrunk.stdout + shrunk.stderr
    assert f"ended {name}-worker-4, {name}-worker-5" in shrunk.stdout, shrunk.stdout
    check_size(cluster, 3)
    assert sorted(machines(cluster).dead_hosts()) == [] and len(machines(cluster).state()["hosts"]) == 4
    assert not (Path(cluster.settings.state_dir) / "local" / name / "hosts" / f"{name}-worker-5").exists()
    same = inv(cluster, "cluster.resize", "--nworkers", "3")
    assert same.returncode == 0 and "nothing to do" in same.stdout, same.stdout


def test_resize_refuses_to_end_a_worker_a_run_uses(cluster):
    started = inv(cluster, "exp.run", "-b", "napsum", "-k", "2", "--detach", "--resources", "off")
    assert started.returncode == 0, started.stdout + started.stderr
    proc = inv(cluster, "cluster.resize", "--nworkers", "1")
    message = one_line_error(proc)
    busy = re.escape(servers(cluster).workers[1].host)
    assert re.search(rf"run \S+ of napsum is in flight on {busy}; wait for it to end", message), message
    assert len(servers(cluster).workers) == 2
    attached = inv(cluster, "exp.attach")
    assert attached.returncode == 0, attached.stdout + attached.stderr


def test_repair_replaces_a_dead_host_in_place(cluster):
    inv(cluster, "cluster.resize", "--nworkers", "3")
    before = servers(cluster)
    listed = (Path(cluster.settings.servers_dir) / "servers.txt").read_text()
    nothing = inv(cluster, "cluster.repair")
    assert nothing.returncode == 0 and "nothing to repair" in nothing.stdout, nothing.stdout
    victim = before.workers[1]
    assert machines(cluster).kill_host(victim.name)
    status = inv(cluster, "cluster.status")
    assert status.returncode == 1 and re.search(rf"{victim.name}\s.*dead", status.stdout), status.stdout

    refused = inv(cluster, "cluster.resize", "--nworkers", "4")
    assert "run inv cluster.repair first" in one_line_error(refused)

    repaired = inv(cluster, "cluster.repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert re.search(rf"^{victim.name} \({victim.id}, {re.escape(victim.host)}\): dead: its sshd \(PID \d+, the "
                     r"host's PID 1\) is no longer running", repaired.stdout, re.M), repaired.stdout
    assert "repaired 1 worker(s)" in repaired.stdout
    after = servers(cluster)
    assert [w.name for w in after.workers] == [w.name for w in before.workers]
    assert after.workers[0] == before.workers[0] and after.workers[2] == before.workers[2]
    # As a new machine would, the replacement has an address of its own, on the gone worker's line.
    lines = (Path(cluster.settings.servers_dir) / "servers.txt").read_text().splitlines()
    assert lines[1] == after.workers[1].host != victim.host and lines[::2] == listed.splitlines()[::2]
    assert machines(cluster).dead_hosts() == []
    check_size(cluster, 3)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as src:
        return list(csv.DictReader(src))


def sweep_args(name: str, *extra: str) -> list[str]:
    return ["exp.sweep", "-b", "napsum", "-k", "2", "-p", "1,2", "--repeat", "3", "--name", name, *extra]


def test_a_sweep_heals_when_a_host_dies_mid_sweep(cluster):
    before = servers(cluster)
    results = Path(cluster.extra["INVOKE_CLOISTER_RUNS_DIR"]) / "sweeps" / "heal" / "results.csv"
    sweep = subprocess.Popen([INV, *sweep_args("heal", "--repair")], cwd=REPO, env={**cluster.env(), **cluster.extra},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not results.exists() or len(rows(results)) < 2):
            time.sleep(0.05)
        time.sleep(0.5)  # into the next run's master nap
        killed_at = time.time()
        assert machines(cluster).kill_host(before.workers[1].name)
        out, err = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert sweep.returncode == 0, out + err
    found = rows(results)
    ok = [r for r in found if r["status"] == "ok"]
    lost = [r for r in found if r["status"] == sweeplib.LOST]
    assert len(ok) == 6 and len({(r["p"], r["repeat"]) for r in ok}) == 6, found
    assert len(lost) == 1, found
    assert re.fullmatch(rf"lost {before.workers[1].name} \(.*\): dead: its sshd .*", lost[0]["note"]), lost[0]
    (again,) = [r for r in ok if r["attempt"] == "2"]
    assert (again["p"], again["repeat"]) == (lost[0]["p"], lost[0]["repeat"])
    assert again["note"].startswith(f"repeats run {lost[0]['run_id']}, which lost {before.workers[1].name}")
    assert re.search(rf"^repeated: k=2 p={again['p']} args= repeat={again['repeat']} as run {again['run_id']} \(ok\)",
                     out, re.M), out
    assert [w.name for w in servers(cluster).workers] == [w.name for w in before.workers]
    started = json.loads((Path(cluster.extra["INVOKE_CLOISTER_RUNS_DIR"]) / "napsum" / again["run_id"]
                          / "run.json").read_text())["started"]
    from datetime import datetime

    print(f"host killed -> repeated run started: {datetime.fromisoformat(started).timestamp() - killed_at:.1f}s")


def test_a_sweep_without_repair_stops_with_the_commands_that_go_on(cluster):
    assert machines(cluster).kill_host(servers(cluster).workers[0].name)
    proc = inv(cluster, *sweep_args("stop"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    assert "lost" in lines[0] and lines[1] == "stopped; repair the cluster and resume the sweep with:", proc.stderr
    command = lines[2].strip()
    assert command == ("inv cluster.repair && inv exp.sweep --benchmark napsum -k 2 -p 1,2 --repeat 3 --name stop "
                       "--repair"), command
    for part in command.split(" && "):
        argv = shlex.split(part)
        done = inv(cluster, *argv[1:])
        assert done.returncode == 0, done.stdout + done.stderr
    found = rows(Path(cluster.extra["INVOKE_CLOISTER_RUNS_DIR"]) / "sweeps" / "stop" / "results.csv")
    assert [r["status"] for r in found].count("ok") == 6 and [r["status"] for r in found].count("lost-node") == 1


def test_sweep_healing_with_fakes(tmp_path):
    """run_sweep alone: a run that lost a node is recorded lost-node, repaired once, run again; the limit holds."""
    combos = sweeplib.combos(ks=[1], ps=[1, 2, 3], grid={}, repeat=1)
    state = sweeplib.SweepState(tmp_path / "s", {"x": 1})
    outcomes = iter(["ok", "failed", "ok", "failed", "failed"])
    repairs = []
    healing = sweeplib.Healing(lost=lambda rec: ["worker-1 (i-1): terminated: reclaimed"] if rec.status == "failed"
                               else [], repair=lambda: repairs.append(1), limit=1, resume="inv ...")
    with pytest.raises(Exception, match="already repaired the cluster 1 times"):
        sweeplib.run_sweep(state=state, all_combos=combos, fail_fast=False, cleanup_interrupted=lambda r: None,
                           run_one=lambda combo, run_id: record(run_id, next(outcomes)), healing=healing)
    assert [r["status"] for r in state.rows] == ["ok", "lost-node", "ok", "lost-node"]
    assert [r["attempt"] for r in state.rows] == ["1", "1", "2", "1"] and repairs == [1]
    assert [c.key for c in sweeplib.pending(state, combos)] == [combos[2].key]

    def refused():
        raise ProviderError("EC2 refused spot capacity for worker-1", provider="ec2")

    failing = sweeplib.Healing(lost=healing.lost, repair=refused, limit=3, resume="inv cluster.repair && inv x")
    with pytest.raises(ExperimentError, match=r"(?s)the repair failed: EC2 refused spot capacity for worker-1\n"
                                              r"once that is fixed, resume the sweep with:\n  inv cluster.repair"):
        sweeplib.run_sweep(state=state, all_combos=combos, fail_fast=False, cleanup_interrupted=lambda r: None,
                           run_one=lambda combo, run_id: record(run_id, "failed"), healing=failing)


def test_a_static_cluster_cannot_resize(local_cluster, tmp_path):
    info = local_cluster.info
    config = tmp_path / "static.json"
    config.write_text(json.dumps({"cluster_name": "lab", "provider": "static",
                                  "hosts": [info.master.host, info.workers[0].host],
                                  "ssh_key": info.ssh_key, "user": info.user}))
    env = {**local_cluster.env(), "INVOKE_CLOISTER_CONFIG": str(config),
           "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers"), "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "s")}
    for task, expected in ((["cluster.resize", "--nworkers", "3"], "provider static cannot resize a cluster"),
                           (["cluster.repair"], "provider static cannot repair a cluster"),
                           (["cluster.resize", "--nworkers=-1"], "--nworkers -1: expected 0 or more workers"),
                           (["cluster.resize", "--nworkers", "x"], "--nworkers 'x': expected an integer"),
                           (["cluster.resize"], "pass --nworkers N: how many workers the cluster should have")):
        proc = subprocess.run([INV, *task], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert one_line_error(proc).startswith(expected), (task, proc.stderr)


def test_the_resume_command_quotes_what_it_names():
    hostile = "/tmp/my configs/a;rm -rf ~.json"
    spec = {"benchmark": "dsum", "k": [1, 2], "p": [4], "grid": {"--mode": ["a b", "$(x)"]}}
    command = sweeplib.resume_command(spec=spec, name="n", repeat=2, config=hostile, timeout=30)
    repair, sweep = command.split(" && ")
    assert shlex.split(repair) == ["inv", "cluster.repair", "--config", hostile]
    assert shlex.split(sweep) == ["inv", "exp.sweep", "--config", hostile, "--benchmark", "dsum", "-k", "1,2", "-p",
                                  "4", "--args-grid", "--mode=a b,$(x)", "--repeat", "2", "--name", "n",
                                  "--timeout", "30", "--repair"]


def test_the_resume_command_keeps_no_manager():
    spec = {"benchmark": "mpi_pi", "k": [1], "p": [2], "grid": {}}
    command = sweeplib.resume_command(spec=spec, name="n", repeat=1, config=None, timeout=None, manager=False)
    assert shlex.split(command.split(" && ")[1])[-2:] == ["--no-manager", "--repair"]
