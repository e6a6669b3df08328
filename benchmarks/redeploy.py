#!/usr/bin/env python3
"""Redeploy benchmark: flat vs broadcast tree vs the old serial rsync loop.

One local cluster (a master, max(--nodes)-1 workers and a dev host) is launched in a temporary
state directory; a tree of --mb MB of mixed file sizes (many small files, some medium, a few large;
random, so incompressible) is written into the dev host's home. For every N in --nodes, each mode
pushes it from the dev host to the first N nodes, starting from empty targets each time and with
the dev host's shared SSH connections closed (every mode pays its handshakes):

- serial: the old behaviour without its sleeps: one rsync after another from the dev host;
- flat:   cloister's redeploy, ``redeploy_concurrency`` (default 8) rsyncs at once;
- tree:   cloister's redeploy --tree (the dev host seeds 2 nodes, holders double each round).

Reported per row: wall time, the ratio to one node's push, and the bytes the dev host sent (rsync's
"Total bytes sent"). Then a no-op redeploy at the largest N, warm (ControlPersist from the flat
run), through the library and as the whole `inv cluster.redeploy` command. Every mode's result is
checked against the dev host (sha256 of every file). The cluster is destroyed at the end, also on
failure or Ctrl-C.

    .venv/bin/python benchmarks/redeploy.py --nodes 4,8,16 --mb 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloister.cluster import lifecycle as lib  # noqa: E402
from cloister import deploy, layout  # noqa: E402
from cloister.transport import hosts, transfer  # noqa: E402
from cloister.settings import Settings  # noqa: E402
from cloister.config import load_config  # noqa: E402
from cloister.providers.local.machines import LocalCluster  # noqa: E402

INV = str(Path(sys.executable).parent / "inv")
PAYLOAD = "bench200"
TARGETS = {"flat_vs_one": 1.5, "tree_dev_bytes_vs_one": 2.0, "noop_s": 1.0}


def write_payload(base: Path, megabytes: int, user: str) -> tuple[int, int]:
    """~``megabytes`` MB: 70% of the bytes in 8 large files, 25% in 80 medium, 5% in 500 small."""
    rng = random.Random(6)
    total = megabytes * 1_000_000
    plan = [("large", 8, int(total * 0.70)), ("medium", 80, int(total * 0.25)), ("small", 500, int(total * 0.05))]
    files = size = 0
    for kind, count, budget in plan:
        for i in range(count):
            path = base / kind / f"d{i % 10}" / f"{kind}-{i}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            n = budget // count
            n = max(1, int(n * rng.uniform(0.5, 1.5))) if kind != "large" else n
            path.write_bytes(os.urandom(n))
            files += 1
            size += n
    entry = pwd.getpwnam(user)
    for root, dirs, names in os.walk(base):
        for item in (root, *(os.path.join(root, n) for n in dirs + names)):
            os.lchown(item, entry.pw_uid, entry.pw_gid)
    return files, size


def digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(path.relative_to(root))] = h.hexdigest()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="4,8,16", help="comma-separated cluster sizes N (master + workers)")
    parser.add_argument("--mb", type=int, default=200, help="size of the pushed tree in MB")
    parser.add_argument("--concurrency", type=int, default=deploy.DEFAULT_CONCURRENCY,
                        help="rsyncs at once from the dev host (cloister.redeploy_concurrency)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    try:
        sizes = sorted({int(n) for n in args.nodes.split(",")})
    except ValueError:
        parser.error(f"--nodes {args.nodes!r}: expected comma-separated integers")
    if not sizes or sizes[0] < 1 or args.mb < 1:
        parser.error("--nodes and --mb must be positive")
    hosts.raise_nofile_limit()

    root = Path(tempfile.mkdtemp(prefix="cloister-bench-redeploy-"))
    name = f"bench-rd-{os.getpid() % 100000}"
    config = root / "cluster.json"
    config.write_text(json.dumps({"cluster_name": name, "provider": "local", "nworkers": max(sizes) - 1,
                                  "user": "ubuntu", "dev_host": True, "ttl": 0,
                                  "image": str(REPO / "examples" / "image")}))
    cfg = load_config(config)
    settings = Settings(servers_dir=str(root / "servers"), state_dir=str(root / "state"))
    rows: list[dict] = []
    try:
        start = time.monotonic()
        info = lib.launch(cfg, settings=settings).info
        print(f"launched {len(info.cluster_nodes)} nodes + dev host in {time.monotonic() - start:.1f}s", flush=True)
        lc = LocalCluster(state_root=settings.state_dir, cluster=name)

        def home(node) -> Path:
            return lc.host_dir(node.name) / "home"

        dev_home = home(info.dev)
        files, size = write_payload(dev_home / PAYLOAD, args.mb, info.user)
        want = digest(dev_home / PAYLOAD)
        print(f"payload: {files} files, {size / 1e6:.0f} MB", flush=True)
        paths = [PAYLOAD + "/"]

        def wipe(nodes) -> None:
            for node in nodes:
                shutil.rmtree(home(node) / PAYLOAD, ignore_errors=True)
            deploy.close_masters(info)
            subprocess.run(["sync"], check=False)

        def verify(nodes, mode) -> None:
            for node in nodes:
                if digest(home(node) / PAYLOAD) != want:
                    raise SystemExit(f"{mode}: {node.name} differs from the dev host")

        def serial(nodes) -> tuple[float, int]:
            """The old loop without sleeps: one rsync at a time from the dev host, no shared connections."""
            ssh = transfer.Ssh(user=info.user, key="~/" + layout.KEY,
                               known_hosts="~/" + layout.SSH_KNOWN_HOSTS)
            cxn = hosts.connection(info, info.dev)
            sent = 0
            begin = time.monotonic()
            try:
                for node in nodes:
                    result = transfer.rsync_from(cxn, paths, deploy.target_address(node), ssh=ssh)
                    if result.exited:
                        raise SystemExit(f"serial: {node.name}: {transfer.error_line(result)}")
                    sent += transfer.parse(result.stdout).sent
            finally:
                cxn.close()
            return time.monotonic() - begin, sent

        def cloister(nodes, tree: bool) -> tuple[float, int]:
            begin = time.monotonic()
            report = deploy.redeploy(info, paths=paths, nodes=nodes, tree=tree, concurrency=args.concurrency)
            if report.failed:
                raise SystemExit(f"{'tree' if tree else 'flat'}: {report.failed}")
            return time.monotonic() - begin, report.dev_sent

        # Install the key and known_hosts on the dev host once (serial uses them too), then the baseline.
        wipe(info.cluster_nodes[:1])
        one_time, one_sent = cloister(info.cluster_nodes[:1], tree=False)
        verify(info.cluster_nodes[:1], "one")
        print(f"one node: {one_time:.2f}s, dev sent {one_sent / 1e6:.1f} MB", flush=True)
        for n in sizes:
            nodes = info.cluster_nodes[:n]
            for mode in ("serial", "flat", "tree"):
                wipe(nodes)
                seconds, sent = serial(nodes) if mode == "serial" else cloister(nodes, tree=mode == "tree")
                verify(nodes, mode)
                rows.append({"N": n, "mode": mode, "seconds": seconds, "vs_one": seconds / one_time,
                             "dev_sent_mb": sent / 1e6, "dev_sent_vs_one": sent / one_sent})
                print(f"N={n:3d} {mode:6s} {seconds:7.2f}s  x{seconds / one_time:5.2f} of one node  "
                      f"dev sent {sent / 1e6:8.1f} MB (x{sent / one_sent:.2f})", flush=True)

        # No-op redeploys at the largest N: warm shared connections after a flat push.
        nodes = info.cluster_nodes[:max(sizes)]
        wipe(nodes)
        cloister(nodes, tree=False)
        noop_lib = min(cloister(nodes, tree=False)[0] for _ in range(3))
        env = {**os.environ, "INVOKE_CLOISTER_SERVERS_DIR": settings.servers_dir,
               "INVOKE_CLOISTER_STATE_DIR": settings.state_dir, "INVOKE_CLOISTER_CONFIG": str(config),
               "INVOKE_CLOISTER_REDEPLOY_CONCURRENCY": str(args.concurrency)}
        inv_times = []
        for _ in range(3):
            begin = time.monotonic()
            proc = subprocess.run([INV, "cluster.redeploy", "--paths", PAYLOAD + "/"], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            inv_times.append(time.monotonic() - begin)
            if proc.returncode:
                raise SystemExit(f"inv cluster.redeploy failed: {proc.stderr.strip()}")
        noop_inv = min(inv_times)
        deploy.close_masters(info)
        cold_begin = time.monotonic()
        cloister(nodes, tree=False)
        noop_cold = time.monotonic() - cold_begin

        print()
        print(f"| N | mode | wall s | x one node ({one_time:.2f}s) | dev sent MB | x one node's bytes |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['N']} | {r['mode']} | {r['seconds']:.2f} | {r['vs_one']:.2f} | {r['dev_sent_mb']:.1f} | "
                  f"{r['dev_sent_vs_one']:.2f} |")
        print()
        print(f"no-op redeploy at N={len(nodes)}: library {noop_lib:.2f}s warm, {noop_cold:.2f}s cold "
              f"(no shared connections); `inv cluster.redeploy` {noop_inv:.2f}s warm "
              f"(target < {TARGETS['noop_s']:.0f}s)")
        big = [r for r in rows if r["N"] == max(sizes)]
        tree = next(r for r in big if r["mode"] == "tree")
        flat_ok = all(r["vs_one"] <= TARGETS["flat_vs_one"] for r in rows if r["mode"] == "flat")
        print(f"targets: flat <= {TARGETS['flat_vs_one']}x one node: {'met' if flat_ok else 'NOT met'}; "
              f"tree dev bytes at N={max(sizes)} <= {TARGETS['tree_dev_bytes_vs_one']}x one node: "
              f"{'met' if round(tree['dev_sent_vs_one'], 2) <= TARGETS['tree_dev_bytes_vs_one'] else 'NOT met'} "
              f"({tree['dev_sent_vs_one']:.2f}x); no-op < 1 s: "
              f"{'met' if noop_inv < TARGETS['noop_s'] else 'NOT met'} ({noop_inv:.2f}s via inv)")
        if args.json:
            Path(args.json).write_text(json.dumps({"one_node_s": one_time, "rows": rows, "noop_lib_s": noop_lib,
                                                   "noop_cold_s": noop_cold, "noop_inv_s": noop_inv,
                                                   "payload_files": files, "payload_bytes": size,
                                                   "cpus": os.cpu_count()}, indent=2))
        return 0
    finally:
        lib.destroy(cfg, settings=settings)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
