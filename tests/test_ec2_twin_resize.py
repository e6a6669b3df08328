"""cluster.resize, cluster.repair and exp.sweep --repair with provider ec2 on the EC2 twin, through `inv`.

A cluster of spot workers runs from an image of a dev instance that holds the sample benchmark (as a
researcher's AMI does), so every worker started later has the code too. The twin reclaims a spot
worker as EC2 does (terminated, StateReason Server.SpotInstanceTermination, the machine gone at once).
The tests run in order on one cluster: resize 2 -> 5 -> 3, repair after a reclaim, a sweep that heals.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import moto_server as ms  # before anything imports moto
from conftest import REPO, no_traceback, slow
from test_ec2_twin import (SUFFIX, Ec2Cluster, assert_servers_loopback, dev, ec2, keys, tags,  # noqa: F401
                           twin)
from test_exp_runs import DSUM_DIR, DSUM_MASTER

pytestmark = slow


class SpotCluster(Ec2Cluster):
    """An Ec2Cluster whose registry adds ``napsum``: dsum whose master naps a second first, so a run is in
    flight long enough for a worker to be reclaimed under it."""

    def env(self) -> dict[str, str]:
        env = super().env()
        registry = self.root / "experiments.yaml"
        if not registry.exists():
            data = yaml.safe_load((REPO / "experiments.yaml").read_text())
            data["benchmarks"]["napsum"] = {"dir": DSUM_DIR, "binary": "./dsum",
                                            "commands": {"master": "sleep 1 && " + DSUM_MASTER}}
            registry.write_text(yaml.safe_dump(data))
        env["INVOKE_CLOISTER_EXPERIMENTS"] = str(registry)
        return env


@pytest.fixture(scope="module")
def image(ec2, dev) -> str:
    """An image of the dev instance (the sample benchmark in its home), as ami.create makes."""
    return ec2.create_image(InstanceId=dev.id, Name=f"rr-twin-{SUFFIX}", NoReboot=True)["ImageId"]


@pytest.fixture(scope="module")
def cluster(twin, keys, image, tmp_path_factory):
    made = SpotCluster(twin, keys, tmp_path_factory.mktemp("spot"), f"rr-spot-{SUFFIX}",
                       {"nworkers": 2, "ttl": "1h", "spot": True, "ami": image})
    made.launch = made.inv("cluster.launch", timeout=300)
    try:
        yield made
    finally:
        made.inv("cluster.destroy", "--yes", timeout=180)


def workers(cluster: Ec2Cluster) -> list:
    return cluster.servers().workers


def check_size(cluster: Ec2Cluster, count: int) -> None:
    """servers/ lists worker-1..count in order; plain `ssh WORKER` (name and address) works from the master
    to each; exp.run -k count runs on all of them."""
    info = cluster.servers()
    assert [w.name for w in info.workers] == [f"{cluster.name}-worker-{i}" for i in range(1, count + 1)]
    assert (cluster.servers_dir / "servers.txt").read_text().split() == [w.host for w in info.workers]
    targets = " ".join(shlex.quote(t) for w in info.workers for t in (w.name, w.private))
    proc = cluster.inv("cluster.run", "--role", "master",
                       f"for w in {targets}; do ssh $w 'echo $(hostname) ok' || echo FAILED $w; done")
    assert proc.returncode == 0 and "FAILED" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok\n") == 2 * count, proc.stdout
    run = cluster.inv("exp.run", "-b", "dsum", "-k", str(count), "-p", "1", "--resources", "off", timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"partitions={count} workers={count}" in run.stdout, run.stdout
    assert_servers_loopback(cluster)


def test_the_spot_cluster_launches(cluster, ec2):
    proc = cluster.launch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = cluster.instances(ec2, "running")
    assert sorted(i.get("InstanceLifecycle", "-") for i in found) == ["-", "spot", "spot"]


def test_resize_2_5_3(cluster, ec2):
    check_size(cluster, 2)
    dry = cluster.inv("cluster.resize", "--nworkers", "5", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"ec2 cluster '{cluster.name}': 2 -> 5 workers: start worker-3, worker-4, worker-5" in dry.stdout
    assert re.search(r"cost change: \+\$0\.\d\d/hour for the workers", dry.stdout), dry.stdout
    grown = cluster.inv("cluster.resize", "--nworkers", "5", timeout=400)
    assert grown.returncode == 0, grown.stdout + grown.stderr
    no_traceback(grown)
    check_size(cluster, 5)
    live = {i["InstanceId"]: i for i in cluster.instances(ec2, "running")}
    (expires,) = {tags(i)["cloister:ttl-expires"] for i in live.values()}  # the cluster's one expiry
    assert {i.get("InstanceLifecycle") for i in live.values() if tags(i)["cloister:role"] == "worker"} == {"spot"}

    shrunk = cluster.inv("cluster.resize", "--nworkers", "3", timeout=300)
    assert shrunk.returncode == 0, shrunk.stdout + shrunk.stderr
    assert f"ended {cluster.name}-worker-4, {cluster.name}-worker-5" in shrunk.stdout, shrunk.stdout
    check_size(cluster, 3)
    assert len(cluster.instances(ec2, "running")) == 4


def test_repair_after_a_reclaim_restores_servers(cluster, twin, ec2):
    before = cluster.servers()
    listed = [w.name for w in before.workers]
    victim = before.workers[1]
    twin.reclaim(victim.id)
    repaired = cluster.inv("cluster.repair", timeout=400)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert f"{victim.name} ({victim.id}, {victim.host}): terminated (Server.SpotInstanceTermination): EC2 reclaimed " \
           f"the spot instance" in repaired.stdout and "; replaced by i-" in repaired.stdout, repaired.stdout
    after = cluster.servers()
    assert [w.name for w in after.workers] == listed
    assert after.workers[0] == before.workers[0] and after.workers[2] == before.workers[2]
    assert after.workers[1].id != victim.id
    check_size(cluster, 3)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as src:
        return list(csv.DictReader(src))


def test_a_sweep_finishes_when_a_worker_is_reclaimed(cluster, twin):
    victim = cluster.servers().workers[2]
    results = cluster.runs_dir / "sweeps" / "spot" / "results.csv"
    sweep = cluster.background("exp.sweep", "-b", "napsum", "-k", "3", "-p", "1,2", "--repeat", "3", "--name", "spot",
                               "--repair")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not results.exists() or len(rows(results)) < 2):
            time.sleep(0.1)
        time.sleep(1.5)  # into the next run's master nap
        reclaimed_at = time.time()
        twin.reclaim(victim.id)
        proc = sweep.result(timeout=600)
    finally:
        sweep.kill()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = rows(results)
    ok = [r for r in found if r["status"] == "ok"]
    (lost,) = [r for r in found if r["status"] == "lost-node"]
    assert len(ok) == 6 and len({(r["p"], r["repeat"]) for r in ok}) == 6, found
    assert f"lost {victim.name} ({victim.id}" in lost["note"] and "Server.SpotInstanceTermination" in lost["note"]
    (again,) = [r for r in ok if r["attempt"] == "2"]
    assert again["note"].startswith(f"repeats run {lost['run_id']}, which lost {victim.name}"), again
    assert f"repeated: k=3 p={again['p']} args= repeat={again['repeat']} as run {again['run_id']} (ok)" in proc.stdout
    assert [w.name for w in cluster.servers().workers][2] == victim.name
    started = json.loads((cluster.runs_dir / "napsum" / again["run_id"] / "run.json").read_text())["started"]
    print(f"\nreclaim -> the sweep running again: {datetime.fromisoformat(started).timestamp() - reclaimed_at:.1f}s")
