#!/usr/bin/env python3
"""EC2 API requests and wall time of one cluster lifecycle, against a moto EC2 server over HTTP.

For each size 1+N: `cluster.launch --no-wait`, `cluster.status`, `cluster.resize --nworkers 2N --no-wait`
(N workers added), `cluster.destroy` through the library, exactly as the tasks call it, with every HTTP request cloister's boto3 clients send counted by a
botocore before-send handler (retries included). moto reaches "running" and "terminated" at the
first poll, so each wait is one poll here; on EC2 every further poll costs cloister ONE more request
for the whole cluster.

The old scripts' algorithm is MODELLED, not run (SPEC section 8): two security groups created and
opened (4 requests), one RunInstances for the driver and one for the workers (2), then every 10 s
one reload per instance until all run; destroy: one describe, one terminate, one reload per instance
every 10 s until all are gone, two group deletions. The "old, 1 poll" column gives it moto's
instant state changes (like for like with what was measured); "old, real waits" assumes ~40 s to
run and ~40 s to terminate, i.e. 4 polls each. The old scripts had no status command.

The throttled row runs 1+63 again with the twin's throttling fault (a burst of 2 requests, then 1 a
second; beyond that EC2's RequestLimitExceeded, HTTP 503): requests include botocore's retries.

Nothing leaves this machine: the AWS variables point at the local moto server and ssh_cidr is explicit.

    .venv/bin/python benchmarks/launch_calls.py [--sizes 7,63,255] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

import moto_server as ms  # noqa: E402 - sets moto's validation switches before moto is imported
from twin.faults import Faults, installed  # noqa: E402

# Requests for the whole 1+63 lifecycle: 14, plus the subnet lookup and the launch lock's release at
# launch, the volumes that status prices, and the checks before RunInstances (zones offering the types,
# key pair, instance types, the vCPUs in use; Service Quotas is not EC2 and not counted).
TARGET = 20
# The throttled row: the twin's token bucket over every EC2 request (tests/twin/faults.py).
THROTTLE = (2, 1.0)
OLD_REAL_POLLS = 4


def old_requests(workers: int, polls: int) -> int:
    nodes = 1 + workers
    launch = 4 + 2 + polls * nodes
    destroy = 1 + 1 + polls * nodes + 2
    return launch + destroy


def lifecycle(server: ms.MotoEc2, workdir: Path, workers: int) -> dict[str, tuple[int, float]]:
    """(requests, seconds) for launch, status, resize (+workers) and destroy of one 1+workers cluster."""
    from cloister.cluster import lifecycle as lib
    from cloister.cluster import resize
    from cloister.settings import Settings
    from cloister.config import load_config

    server.reset()
    ms.seed(ms.client())
    key = workdir / "bench.pem"
    key.write_text("unused: nothing connects\n")
    key.chmod(0o600)
    config = workdir / "bench.json"
    config.write_text(json.dumps({
        "cluster_name": f"bench-{workers}", "provider": "ec2", "region": ms.REGION, "ami": ms.UBUNTU_AMI,
        "key_name": "alice", "ssh_key": str(key), "nworkers": workers, "instance_type": "c5.xlarge",
        "ssh_cidr": "198.51.100.7/32", "ttl": "1h"}))
    cfg = load_config(config)
    settings = Settings(servers_dir=str(workdir / "servers"), state_dir=str(workdir / "state"))
    counter = ms.Injector()
    phases = {"launch": lambda: lib.launch(cfg, settings=settings, wait=False),
              "status": lambda: lib.status(cfg, settings=settings),
              "resize": lambda: resize.resize(cfg, settings=settings, nworkers=2 * workers, wait=False),
              "destroy": lambda: lib.destroy(cfg, settings=settings)}
    measured = {}
    try:
        for phase, call in phases.items():
            before = counter.count()
            start = time.perf_counter()
            call()
            measured[phase] = (counter.count() - before, time.perf_counter() - start)
    finally:
        counter.close()
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="7,63,255", help="worker counts, comma-separated (the master is +1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; wall times are medians")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    server = ms.MotoEc2()
    env = ms.aws_env(server.url)
    os.environ.clear()
    os.environ.update(env)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="cloister-bench-") as tmp:
            lifecycle(server, Path(tmp), 1)  # warm-up: moto loads its EC2 backend on the first request
            for workers in sizes:
                runs = [lifecycle(server, Path(tmp), workers) for _ in range(args.repeat)]
                requests = {phase: runs[0][phase][0] for phase in runs[0]}
                if any({phase: run[phase][0] for phase in run} != requests for run in runs):
                    print(f"warning: request counts varied between runs for 1+{workers}", file=sys.stderr)
                seconds = {phase: statistics.median(run[phase][1] for run in runs) for phase in requests}
                rows.append((f"1+{workers}", requests, seconds))
            with installed(Faults(throttle=THROTTLE)) as faults:
                throttled = lifecycle(server, Path(tmp), 63)
            rows.append(("1+63 thr", {p: r for p, (r, _) in throttled.items()},
                         {p: s for p, (_, s) in throttled.items()}))
    finally:
        server.stop()

    print(f"cloister EC2 requests per lifecycle (launch --no-wait + status + destroy), moto over HTTP, "
          f"median of {args.repeat}")
    header = (f"{'nodes':>7} | {'launch':>6} {'status':>6} {'destroy':>7} {'total':>5} | "
              f"{'launch s':>8} {'status s':>8} {'destroy s':>9} | {'old, 1 poll':>11} {'old, real waits':>15}")
    print(header)
    print("-" * len(header))
    lifecycle_phases = ("launch", "status", "destroy")
    for label, requests, seconds in rows:
        total = sum(requests[p] for p in lifecycle_phases)
        workers = int(label.split("+")[1].split()[0])
        print(f"{label:>7} | {requests['launch']:>6} {requests['status']:>6} {requests['destroy']:>7} "
              f"{total:>5} | {seconds['launch']:>8.2f} {seconds['status']:>8.2f} {seconds['destroy']:>9.2f} | "
              f"{old_requests(workers, 1):>11} {old_requests(workers, OLD_REAL_POLLS):>15}")
    print(f"\n1+63 thr: throttled at a burst of {THROTTLE[0]}, then {THROTTLE[1]:g}/s; {len(faults.injected)} requests "
          f"answered RequestLimitExceeded and retried (adaptive mode), none failed")
    print("\ncluster.resize --no-wait from 1+N to 1+2N (N workers added; the old scripts could not resize)")
    print(f"{'nodes':>7} | {'added':>5} | {'resize':>6} | {'resize s':>8}")
    plain = [(int(label[2:]), requests, seconds) for label, requests, seconds in rows if " " not in label]
    for workers, requests, seconds in plain:
        print(f"{f'1+{workers}':>7} | {workers:>5} | {requests['resize']:>6} | {seconds['resize']:>8.2f}")
    totals = {workers: sum(requests[p] for p in lifecycle_phases) for workers, requests, _ in plain}
    # The resize asks which recorded nodes are gone with one instance-id filter per 199 nodes (EC2's limit
    # on filter values): one more request per 199 nodes it has, none per node it adds.
    flat = len(set(totals.values())) == 1 and all(requests["resize"] == 5 + workers // 199
                                                  for workers, requests, _ in plain)
    print(f"\nrequest count {'does not grow' if flat else 'GROWS'} with N; target <= {TARGET} for 1+63: "
          + (f"{totals[63]} ({'met' if totals[63] <= TARGET else 'MISSED'})" if 63 in totals else "not measured"))
    return 0 if flat and totals.get(63, 0) <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
