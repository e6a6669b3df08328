"""Scale: every task on a local cluster of 128 workers (issue 6, part 4). Opt-in: CLOISTER_SCALE=1.

    CLOISTER_SCALE=1 .venv/bin/python -m pytest -q -s tests/test_scale.py

Each step runs `inv` as a user would while a sampler watches the `inv` process: its threads, its
open TCP connections and its ssh/rsync child processes. None may grow with the number of hosts
beyond the concurrency cap (cloister.concurrency for fan-out, cloister.redeploy_concurrency for
redeploy). Timings are printed (-s) for the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import INV, REPO

from test_redeploy import home, write_tree, assert_all_match

pytestmark = pytest.mark.skipif(os.environ.get("CLOISTER_SCALE") != "1",
                                reason="128-host scale check; set CLOISTER_SCALE=1 to run it")

WORKERS = int(os.environ.get("CLOISTER_SCALE_WORKERS", "128"))
CAP = 16  # cloister.concurrency for this test: well below the number of hosts


def _children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a thread's children are listed under its own task)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _sockets(pid: int) -> int:
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
    except OSError:
        pass
    return count


def _threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watched:
    def __init__(self, env: dict[str, str], *args: str, timeout: float = 900):
        self.peak = {"threads": 0, "sockets": 0, "ssh": 0}
        begin = time.monotonic()
        proc = subprocess.Popen([INV, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                kids = _descendants(proc.pid)
                self.peak["threads"] = max(self.peak["threads"], _threads(proc.pid))
                self.peak["sockets"] = max(self.peak["sockets"], _sockets(proc.pid))
                self.peak["ssh"] = max(self.peak["ssh"], sum(1 for k in kids if _comm(k) == "ssh"))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            self.stdout, self.stderr = proc.communicate(timeout=timeout)
        finally:
            stop.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        self.seconds = time.monotonic() - begin


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    name = f"scale{os.getpid() % 100000}"
    config = root / f"{name}.json"
    config.write_text(json.dumps({"cluster_name": name, "provider": "local", "nworkers": WORKERS, "user": "ubuntu",
                                  "image": str(REPO / "examples" / "image"), "dev_host": True, "ttl": 0}))
    env = dict(os.environ, INVOKE_CLOISTER_SERVERS_DIR=str(root / "servers"),
               INVOKE_CLOISTER_STATE_DIR=str(root / "state"), INVOKE_CLOISTER_CONFIG=str(config),
               INVOKE_CLOISTER_CONCURRENCY=str(CAP), INVOKE_CLOISTER_RUNS_DIR=str(root / "runs"))
    timings: dict[str, tuple[float, dict]] = {}
    try:
        yield root, env, timings
    finally:
        subprocess.run([INV, "cluster.destroy", "--yes"], cwd=REPO, env=env, capture_output=True, timeout=300)
        print("\n| step | seconds | peak threads | peak TCP sockets | peak ssh children |")
        print("|---|---|---|---|---|")
        for step, (seconds, peak) in timings.items():
            print(f"| {step} | {seconds:.1f} | {peak['threads']} | {peak['sockets']} | {peak['ssh']} |")


def step(big, label: str, *args: str, cap: int = CAP, timeout: float = 900) -> Watched:
    _root, env, timings = big
    w = Watched(env, *args, timeout=timeout)
    timings[label] = (w.seconds, w.peak)
    assert w.returncode == 0, f"{label}: {w.stderr[-2000:]}"
    assert "Traceback" not in w.stderr
    # Bounded by the cap, not by the 129 hosts: a few threads per slot (pool, transport, I/O), a few spare sockets.
    assert w.peak["sockets"] <= cap + 4, (label, w.peak)
    assert w.peak["ssh"] <= cap, (label, w.peak)
    assert w.peak["threads"] <= 6 * cap + 8, (label, w.peak)
    return w


def test_every_task_at_128_workers(big):
    root, env, _ = big
    w = step(big, "cluster.launch", "cluster.launch")
    assert f"{WORKERS} workers" in w.stdout
    w = step(big, "cluster.run hostname", "cluster.run", "hostname")
    assert f"-worker-{WORKERS}\n" in w.stdout
    step(big, "cluster.copy-dns", "cluster.copy-dns")
    step(big, "cluster.status", "cluster.status")

    from cloister.settings import Settings
    from cloister.config import load_config
    from cloister.cluster.servers import read_servers
    from conftest import ClusterEnv

    cfg = load_config(env["INVOKE_CLOISTER_CONFIG"])
    settings = Settings(servers_dir=env["INVOKE_CLOISTER_SERVERS_DIR"], state_dir=env["INVOKE_CLOISTER_STATE_DIR"])
    cenv = ClusterEnv(root=root, config_path=Path(env["INVOKE_CLOISTER_CONFIG"]), cfg=cfg, settings=settings,
                      info=read_servers(settings.servers_dir))
    write_tree(home(cenv, cenv.info.dev) / "clamor" / "scale", seed=128)
    step(big, "cluster.redeploy (cold)", "cluster.redeploy", cap=8)
    w = step(big, "cluster.redeploy (no-op, warm)", "cluster.redeploy", cap=8)
    assert f"to {WORKERS + 1}/{WORKERS + 1} nodes" in w.stdout
    write_tree(home(cenv, cenv.info.dev) / "clamor" / "scale-tree", seed=129)
    step(big, "cluster.redeploy --tree", "cluster.redeploy", "--tree", cap=8)
    assert_all_match(cenv)
    step(big, "cluster.put", "cluster.put", str(REPO / "README.md"), "scale/")
    step(big, "cluster.get", "cluster.get", "scale/README.md", str(root / "got"))
    assert len(list((root / "got").iterdir())) == WORKERS + 1
    w = step(big, "exp.run dsum -k 128 -p 1", "exp.run", "--benchmark", "dsum", "-k", str(WORKERS), "-p", "1")
    step(big, "cluster.destroy", "cluster.destroy", "--yes")
