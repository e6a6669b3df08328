#!/usr/bin/env python3
"""dask_sum's master: a Dask client that sums squares on the cluster's workers and reports the time.

    client.py --scheduler tcp://HOST:PORT --workers N [--tasks T] [--size S] [--timeout SECONDS]

Waits until N workers have joined the scheduler, then maps T tasks (each sums the squares of S
integers of its own slice of 0..T*S-1) over them, adds the results on a worker, checks the total
against the closed formula and prints:

    dask_sum: workers=4 tasks=64 size=200000 total=... expected=... ok
    dask_sum: time_s=0.412

Exit codes: 0 ok, 1 the workers did not come, 2 bad usage, 3 a wrong total.
"""

from __future__ import annotations

import argparse
import sys
import time

from distributed import Client


def square_sum(lo: int, hi: int) -> int:
    """The squares of lo..hi-1, added one by one: the work of a task."""
    return sum(i * i for i in range(lo, hi))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dask_sum")
    parser.add_argument("--scheduler", required=True, help="the scheduler's address, tcp://HOST:PORT")
    parser.add_argument("--workers", type=int, required=True, help="workers to wait for")
    parser.add_argument("--tasks", type=int, default=64, help="tasks to map over the workers")
    parser.add_argument("--size", type=int, default=200000, help="integers per task")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the workers")
    args = parser.parse_args(argv)
    if min(args.workers, args.tasks, args.size) < 1:
        parser.error("--workers, --tasks and --size must be positive")
    with Client(args.scheduler, timeout=args.timeout) as client:
        try:
            client.wait_for_workers(args.workers, timeout=args.timeout)
        except TimeoutError:
            print(f"dask_sum: error: {len(client.scheduler_info()['workers'])} of {args.workers} workers joined "
                  f"within {args.timeout:g}s", file=sys.stderr)
            return 1
        joined = len(client.scheduler_info()["workers"])
        start = time.perf_counter()
        parts = client.map(square_sum, [t * args.size for t in range(args.tasks)],
                           [(t + 1) * args.size for t in range(args.tasks)], pure=False)
        total = client.submit(sum, parts).result()
        elapsed = time.perf_counter() - start
    n = args.tasks * args.size - 1
    expected = n * (n + 1) * (2 * n + 1) // 6
    print(f"dask_sum: workers={joined} tasks={args.tasks} size={args.size} total={total} expected={expected} "
          f"{'ok' if total == expected else 'MISMATCH'}")
    print(f"dask_sum: time_s={elapsed:.6f}", flush=True)
    return 0 if total == expected else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
