#!/usr/bin/env python3
"""exp.run overhead: what `inv exp.run` costs beyond the benchmark's own runtime, and SSH connections opened.

A local cluster (a master and --workers workers, in a temporary state directory) is launched through
the library. A temporary registry holds the repository's defaults and dsum with DSUM_CHUNK=0 (workers
use the closed formula, so the sum itself is trivial). For every k x p, `inv exp.run --benchmark dsum
-k K -p P` runs --repeat times after one untimed warm-up, and the median is reported for:

- wall: the whole `inv` process, as a user waits for it;
- master: the master's own runtime (run.json timings.master_s: started detached, streamed, exited);
- dsum: the sum as dsum measures it itself (the `time_s=` line, the registry's metric);
- overhead: wall - master (everything exp.run adds around the master: Python and Invoke start-up,
  connecting, manager and worker start, readiness polling, kill, log download, run.json);
- connections: "Accepted publickey" lines added to each host's sshd.log during the run: the most
  any host of the run saw, and the total.

The old scripts opened k*p serial SSH sessions (~0.185 s each, SPEC section 9) and slept a fixed 10 s
before the master even started: their start-up cost is ESTIMATED as k*p*0.185 s + 10 s (not measured).
The cluster is destroyed at the end, also on failure, Ctrl-C or SIGTERM.

    .venv/bin/python benchmarks/exp_start.py --shapes 2x2,4x4,8x8 --repeat 5
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloister.cluster import lifecycle as lib  # noqa: E402
from cloister.settings import Settings  # noqa: E402
from cloister.config import load_config  # noqa: E402
from cloister.errors import CloisterError  # noqa: E402
from cloister.providers.local.machines import LocalCluster  # noqa: E402

INV = str(Path(sys.executable).parent / "inv")
DSUM_DIR = REPO / "examples" / "dsum"
OLD_SSH_S = 0.185  # a new OpenSSH connection + command (SPEC section 9)
OLD_SLEEP_S = 10.0  # run_experiment.py slept 10 s before starting the driver
TARGET_OVERHEAD_S = 0.5  # warm: the untimed warm-up run leaves the connections open
TARGET_CONNECTIONS = 2


def registry(path: Path, *, resources: bool = True) -> Path:
    data = yaml.safe_load((REPO / "experiments.yaml").read_text())
    dsum = data["benchmarks"]["dsum"]
    dsum["env"] = {**(dsum.get("env") or {}), "DSUM_CHUNK": "0"}
    if not resources:
        dsum["resources"] = False  # no sampler, no resources.png (matplotlib's import and drawing)
    path.write_text(yaml.safe_dump({"defaults": data["defaults"], "benchmarks": {"dsum": dsum}}))
    return path


def accepted(lc: LocalCluster, names: list[str]) -> dict[str, int]:
    return {name: (lc.host_dir(name) / "sshd.log").read_text(errors="replace").count("Accepted publickey")
            for name in names}


def one_run(k: int, p: int, env: dict[str, str], lc: LocalCluster, names: list[str], runs: Path) -> dict:
    before = accepted(lc, names)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([INV, "exp.run", "--benchmark", "dsum", "-k", str(k), "-p", str(p)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The inv process's own CPU (its children that it waited for included; a detached drawer is not).
    cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
    after = accepted(lc, names)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exp.run -k {k} -p {p} exited {proc.returncode}: {' | '.join(tail)}")
    record = max((json.loads(p.read_text()) for p in (runs / "dsum").glob("*/run.json")),
                 key=lambda r: r["run_id"])
    if record["status"] != "ok":
        raise RuntimeError(f"run {record['run_id']}: status {record['status']}")
    opened = {name: after[name] - before[name] for name in names}
    return {"wall": wall, "cpu": cpu, "master": record["timings"]["master_s"], "dsum": record["metric"],
            "total": record["timings"]["total_s"], "ready": record["timings"]["workers_ready_s"],
            "manager": record["timings"]["manager_ready_s"],
            "max_conn": max(opened.values()), "sum_conn": sum(opened.values())}


def sweep_runs(k: int, p: int, count: int, env: dict[str, str], lc: LocalCluster, names: list[str]) -> dict:
    """`inv exp.sweep` of ``count`` runs of k x p (one process, connections reused across its runs)."""
    before = accepted(lc, names)
    start = time.perf_counter()
    proc = subprocess.run([INV, "exp.sweep", "--benchmark", "dsum", "-k", str(k), "-p", str(p), "--repeat",
                           str(count), "--name", f"bench-{os.getpid()}-{time.time_ns()}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exp.sweep -k {k} -p {p} exited {proc.returncode}: {' | '.join(tail)}")
    opened = {name: n - before[name] for name, n in accepted(lc, names).items()}
    return {"wall": wall, "per_run": wall / count, "max_conn": max(opened.values())}


def bare_start(n: int) -> float:
    """Seconds until n dsum workers started directly here (no SSH, no cloister) all accept connections:
    the benchmark's own start-up cost on this machine, which readiness cannot beat."""
    ports = []
    holders = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        holders.append(s)
        ports.append(s.getsockname()[1])
    for s in holders:
        s.close()
    # sshd's default PATH, as on the hosts: ./dsum's `env python3` must find the system Python, not a shim.
    env = {**os.environ, "DSUM_CHUNK": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    start = time.perf_counter()
    procs = [subprocess.Popen(["./dsum", "-i", "127.0.0.1", "-m", "worker", "-p", str(port)], cwd=DSUM_DIR, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for port in ports]
    try:
        pending = set(ports)
        while pending:
            for port in list(pending):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        pending.discard(port)
            if any(proc.poll() is not None for proc in procs):
                raise RuntimeError("a bare dsum worker exited at start-up")
            if pending:
                time.sleep(0.01)
        return time.perf_counter() - start
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def measure(shapes: list[tuple[int, int]], workers: int, repeat: int,
            sweep: int, resources: bool = True) -> tuple[dict[tuple[int, int], dict[str, float]], dict[str, float] | None]:
    root = Path(tempfile.mkdtemp(prefix="cloister-exp-start-"))
    config = root / "exp-start.json"
    config.write_text(json.dumps({"cluster_name": f"expstart-{os.getpid()}", "provider": "local",
                                  "nworkers": workers, "dev_host": False, "ttl": 0,
                                  "image": str(REPO / "examples" / "image")}))
    cfg = load_config(config)
    settings = Settings(servers_dir=str(root / "servers"), state_dir=str(root / "state"))
    runs = root / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_CLOISTER_")}
    env.update(INVOKE_CLOISTER_SERVERS_DIR=settings.servers_dir, INVOKE_CLOISTER_STATE_DIR=settings.state_dir,
               INVOKE_CLOISTER_CONFIG=str(config), INVOKE_CLOISTER_RUNS_DIR=str(runs),
               INVOKE_CLOISTER_EXPERIMENTS=str(registry(root / "experiments.yaml", resources=resources)))
    try:
        start = time.perf_counter()
        info = lib.launch(cfg, settings=settings).info
        print(f"cluster of {len(info.nodes)} hosts up in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        lc = LocalCluster(state_root=settings.state_dir, cluster=cfg.cluster_name)
        names = [n.name for n in info.nodes]
        results: dict[tuple[int, int], dict[str, float]] = {}
        for k, p in shapes:
            one_run(k, p, env, lc, names, runs)  # warm-up
            samples = []
            for i in range(repeat):
                samples.append(one_run(k, p, env, lc, names, runs))
                s = samples[-1]
                print(f"{k}x{p} run {i + 1}/{repeat}: wall {s['wall']:.2f}s inv CPU {s['cpu']:.2f}s master {s['master']:.2f}s "
                      f"dsum {s['dsum']:.4f}s connections max/host {s['max_conn']} total {s['sum_conn']}",
                      file=sys.stderr)
            results[(k, p)] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
            results[(k, p)]["max_conn"] = max(s["max_conn"] for s in samples)
            results[(k, p)]["bare"] = statistics.median(bare_start(k * p) for _ in range(repeat))
        swept = sweep_runs(*shapes[0], sweep, env, lc, names) if sweep else None
        return results, swept
    finally:
        lib.destroy(cfg, settings=settings)
        shutil.rmtree(root, ignore_errors=True)


def table(results: dict[tuple[int, int], dict[str, float]], repeat: int) -> str:
    head = ("| k x p | wall | master | overhead = wall - master | inv CPU | inv start/exit | manager up | workers up "
            "| kill + logs + run.json | bare start of k*p dsum workers (no SSH) | SSH conn./host (max) | total conn. "
            "| old scripts before the master (estimate) | targets met |")
    lines = [f"`inv exp.run --benchmark dsum` with DSUM_CHUNK=0, median of {repeat}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for (k, p), m in results.items():
        overhead = m["wall"] - m["master"]
        old = k * p * OLD_SSH_S + OLD_SLEEP_S
        ok = overhead < TARGET_OVERHEAD_S and m["max_conn"] <= TARGET_CONNECTIONS
        lines.append(f"| {k}x{p} | {m['wall']:.2f} s | {m['master']:.2f} s (dsum itself {m['dsum'] * 1000:.0f} ms) "
                     f"| {overhead:.2f} s | {m['cpu']:.2f} s | {m['wall'] - m['total']:.2f} s | {m['manager']:.2f} s "
                     f"| {m['ready'] - m['manager']:.2f} s | {m['total'] - m['ready'] - m['master']:.2f} s "
                     f"| {m['bare']:.2f} s | {m['max_conn']:.0f} | {m['sum_conn']:.0f} | {old:.1f} s "
                     f"| {'yes' if ok else 'no'} |")
    lines += ["",
              "master = run.json timings.master_s (start, stream, exit); inv CPU = user + system time of the inv",
              "process (what it waits for included; the detached resources.png drawer is not: nobody waits for it);",
              "inv start/exit = wall - run.json total_s",
              "(Python + Invoke start-up, config, summary); manager up / workers up = time to readiness of each phase;",
              "bare start = the same number of dsum workers started directly on this machine until all accept a",
              "connection (the benchmark's own start-up cost, a floor for 'workers up');",
              f"old scripts = k*p serial SSH sessions x {OLD_SSH_S} s + the fixed {OLD_SLEEP_S:.0f} s sleep before "
              "the master started: an ESTIMATE from SPEC section 9, not measured;",
              f"targets: overhead < {TARGET_OVERHEAD_S} s and <= {TARGET_CONNECTIONS} SSH connections per host "
              "per run."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-resources", action="store_true",
                        help="runs without the resource sampler and resources.png (what is left is SSH and cloister)")
    parser.add_argument("--shapes", default="2x2,4x4,8x8", help="comma-separated KxP shapes")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per shape (median reported)")
    parser.add_argument("--workers", type=int, default=8, help="worker hosts in the local cluster")
    parser.add_argument("--sweep", type=int, default=8,
                        help="runs of the first shape in one `inv exp.sweep` (0: no sweep row)")
    args = parser.parse_args()
    try:
        shapes = [tuple(int(x) for x in part.lower().split("x")) for part in args.shapes.split(",")]
        assert all(len(s) == 2 and s[0] >= 1 and s[1] >= 1 for s in shapes)
    except (ValueError, AssertionError):
        sys.exit(f"exp_start: --shapes {args.shapes!r}: expected e.g. 2x2,4x4,8x8")
    if max(k for k, _ in shapes) > args.workers or args.repeat < 1:
        sys.exit("exp_start: every K must be <= --workers and --repeat >= 1")
    # As an installed package would be: byte-compiled once (PYTHONDONTWRITEBYTECODE would otherwise make
    # every inv compile cloister and tasks again, ~0.3 s of CPU each time).
    for package in ("cloister", "tasks"):
        compileall.compile_dir(str(REPO / package), quiet=1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("exp_start: terminated"))
    try:
        results, swept = measure(shapes, args.workers, args.repeat, args.sweep, resources=not args.no_resources)
    except (CloisterError, RuntimeError, subprocess.TimeoutExpired, KeyboardInterrupt) as err:
        sys.exit(f"exp_start: {err or 'interrupted'}")
    print(table(results, args.repeat))
    if swept:
        (k, p), single = shapes[0], results[shapes[0]]
        print(f"\nsweep: {args.sweep} runs of {k}x{p} in one `inv exp.sweep`: {swept['wall']:.2f} s, "
              f"{swept['per_run']:.2f} s a run (vs {single['wall']:.2f} s for one `inv exp.run`, "
              f"{swept['per_run'] / single['wall']:.2f}x); SSH connections per host for the whole sweep: "
              f"{swept['max_conn']} (vs {single['max_conn']:.0f} per run)")


if __name__ == "__main__":
    main()
