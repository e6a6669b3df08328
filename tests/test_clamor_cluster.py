"""Clamor's command lines and process preparation on the real sshd hosts of the local cluster.

A benchmark declared as `NAME: {}` gets exactly Clamor's argv in every role; a started worker process
runs without ASLR, with an unlimited stack, with ~/.local_vars and experiment_vars sourced; run.json
lists the preparation of every host. Whatever a test starts is killed and removed at its end.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from cloister.cluster import lifecycle as lib
from cloister.transport import hosts
from cloister import runs as runlib
from cloister.runs.experiments import load_registry
from conftest import INV, REPO

ARGV = "argv"  # the benchmark declared as `argv: {}`: Clamor's defaults, nothing else
ARGV_DIR = f"~/clamor/experiments/cpp/{ARGV}"
DSUM_DIR = "~/clamor/experiments/cpp/dsum"
# Prints its argv and, as manager or worker, listens where it was told until it is killed.
ARGV_BINARY = """#!/usr/bin/env python3
import json, socket, sys, time
print(json.dumps(sys.argv[1:]), flush=True)
a = sys.argv[1:]
role = a[a.index("-m") + 1]
if role in ("manager", "worker"):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((a[a.index("-i") + 1], int(a[a.index("-r" if role == "manager" else "-p") + 1])))
    s.listen()
    time.sleep(3600)
"""
ADDR_NO_RANDOMIZE = 0x0040000


class Cluster:
    def __init__(self, cluster, tmp_path: Path):
        self.cluster = cluster
        self.info = cluster.info
        self.runs_dir = tmp_path / "runs"
        data = yaml.safe_load((REPO / "experiments.yaml").read_text())
        data["benchmarks"][ARGV] = {}
        self.registry_path = tmp_path / "experiments.yaml"
        self.registry_path.write_text(yaml.safe_dump(data))
        self.registry = load_registry(self.registry_path)

    def inv(self, *args: str) -> subprocess.CompletedProcess:
        env = {**self.cluster.env(), "INVOKE_CLOISTER_RUNS_DIR": str(self.runs_dir),
               "INVOKE_CLOISTER_EXPERIMENTS": str(self.registry_path)}
        return subprocess.run([INV, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    def remote(self, command: str, nodes=None) -> dict[str, str]:
        outputs = lib.run(self.info, command, nodes=nodes or self.info.cluster_nodes, settings=self.cluster.settings,
                          timeout=30)
        for out in outputs:
            assert out.error is None and out.exited == 0, f"[{out.host}] {out.error or out.stderr}"
        return {out.host: out.stdout for out in outputs}

    def killall(self, *names: str) -> None:
        grp = hosts.group(self.info, self.info.cluster_nodes, connect_timeout=5)
        try:
            for name in names:
                runlib.killall(grp, bench=self.registry.get(name))
        finally:
            grp.close()

    def record(self, benchmark: str) -> tuple[Path, dict]:
        [run_dir] = sorted((self.runs_dir / benchmark).iterdir())
        return run_dir, json.loads((run_dir / "run.json").read_text())


@pytest.fixture
def clamor(local_cluster, tmp_path):
    c = Cluster(local_cluster, tmp_path)
    try:
        yield c
    finally:
        c.killall(ARGV, "dsum")
        c.remote(f"rm -rf {ARGV_DIR} ~/.local_vars")


def test_a_benchmark_declared_empty_gets_clamors_argv_in_every_role(clamor):
    binary = f"{ARGV_DIR}/{ARGV}"
    clamor.remote(f"mkdir -p {ARGV_DIR} && printf %s {shlex.quote(ARGV_BINARY)} > {binary} && chmod +x {binary}")
    k, p = 2, 3
    proc = clamor.inv("exp.run", "--benchmark", ARGV, "-k", str(k), "-p", str(p))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir, record = clamor.record(ARGV)
    run_id = record["run_id"]
    master, workers = clamor.info.master, clamor.info.workers[:k]
    B, P, K, MANAGER = ARGV, str(p), k, master.host
    W = ",".join(w.host for w in workers)  # servers.txt order, no ports

    def argv(host: str, log: str) -> list[str]:
        return json.loads((run_dir / host / f"{log}_{run_id}.log").read_text().splitlines()[0])

    assert argv(master.host, "manager") == [
        "-i", master.host, "-m", "manager", "-r", "40000", "-t", P, "-l", f"{B}.weld", "-w", W, "-x", str(p * K)]
    for h, node in enumerate(workers):
        for i in range(p):
            assert argv(node.host, f"worker{h * p + i}") == [
                "-i", node.host, "-m", "worker", "-p", str(50000 + i), "-d", MANAGER, "-l", f"{B}.weld"]
    assert argv(master.host, "master") == [
        "-i", master.host, "-p", "45000", "-m", "master", "-d", MANAGER, "-l", f"{B}.weld", "-t", P, "-w", W,
        "-x", str(p * K)]


def worker_view(clamor, node) -> list[dict]:
    """What each running dsum worker process on ``node`` has: personality, stack limit, environment."""
    script = ("for p in $(pgrep -f '^python3 ./dsum -i .* -m worker'); do "
              "echo \"$(cat /proc/$p/personality) $(awk '/Max stack size/ {print $4}' /proc/$p/limits) "
              "$(tr '\\0' '\\n' < /proc/$p/environ | grep -E '^(FROM_LOCAL_VARS|DSUM_CHUNK|PUBLIC_HOSTNAME)=' "
              "| sort | tr '\\n' ' ')\"; done")
    lines = clamor.remote(script, nodes=[node])[node.host].splitlines()
    return [{"personality": int(line.split()[0], 16), "stack": line.split()[1],
             **dict(item.split("=", 1) for item in line.split()[2:])} for line in lines]


def test_a_started_worker_process_is_prepared_as_clamor_needs(clamor):
    workers = clamor.info.workers[:2]
    clamor.remote("echo 'export FROM_LOCAL_VARS=sourced' > ~/.local_vars", nodes=workers)
    proc = clamor.inv("exp.workers", "--benchmark", "dsum", "-k", "2", "-p", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for node in workers:
        seen = worker_view(clamor, node)
        assert len(seen) == 2, seen
        for process in seen:
            assert process["personality"] & ADDR_NO_RANDOMIZE, process
            assert process["stack"] == "unlimited", process
            assert process["FROM_LOCAL_VARS"] == "sourced" and process["DSUM_CHUNK"] == "100000", process
            assert process["PUBLIC_HOSTNAME"] == node.public, process

    _, record = clamor.record("dsum")
    assert record["preparation"]["declared"] == clamor.registry.get("dsum").prepare.declared()
    hosts_seen = record["preparation"]["hosts"]
    assert set(hosts_seen) == {w.host for w in workers}
    for node in workers:
        steps = {s["item"]: (s["status"], s["detail"]) for s in hosts_seen[node.host]}
        assert steps["sysctl vm.overcommit_memory=1"] == (
            "skipped", "the node runs on this machine's kernel; never changed there")
        assert steps["disable_aslr"][0] == steps["stack_limit"][0] == steps["local_vars"][0] == "done"
        assert steps["public_hostname"] == ("done", f"PUBLIC_HOSTNAME={node.public} (the address recorded in servers/)")
        assert steps["dir"] == ("done", f"cd {DSUM_DIR}")
        assert steps["vars_file"] == ("done", "experiment_vars sourced by every process")


def test_a_full_run_records_the_preparation_of_every_host(clamor):
    proc = clamor.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, record = clamor.record("dsum")
    master, worker = clamor.info.master, clamor.info.workers[0]
    assert set(record["preparation"]["hosts"]) == {master.host, worker.host}
    for steps in record["preparation"]["hosts"].values():
        assert {s["item"] for s in steps} == {"sysctl vm.overcommit_memory=1", "disable_aslr", "stack_limit",
                                              "local_vars", "public_hostname", "dir", "vars_file"}
        assert {s["status"] for s in steps} <= {"done", "skipped"}
