#!/usr/bin/env python3
"""Network benchmark: round trip and throughput between two local hosts, with and without shaping.

For each setting a local cluster (a master and two workers) is launched in a temporary state
directory and measured between its two workers, on the hosts themselves over SSH (tests/netprobe.py):

- round trip: median of --count one-byte TCP round trips on one connection (TCP_NODELAY);
- throughput: one TCP stream for --seconds, counted by the receiver from its first byte;
each taken --repeat times, the median shown.

Settings: each host in its own network namespace on the cluster's bridge, unshaped and shaped to
each --rates; a latency setting when the kernel has netem (otherwise shown as refused); and the
loopback mode (every host on this machine's loopback) as the reference. Clusters are destroyed at
the end, also on failure or Ctrl-C.

    .venv/bin/python benchmarks/network.py --rates 1gbit,100mbit
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from cloister.cluster import lifecycle as lib  # noqa: E402
from cloister.config import load_config  # noqa: E402
from cloister.errors import CloisterError  # noqa: E402
from cloister.settings import Settings  # noqa: E402
from netprobe import round_trip, throughput  # noqa: E402


def measure(root: Path, name: str, network: dict, *, count: int, seconds: float, repeat: int) -> tuple[str, str]:
    config = root / f"{name}.json"
    config.write_text(json.dumps({"cluster_name": name, "provider": "local", "nworkers": 2, "dev_host": False,
                                  "image": str(REPO / "examples" / "image"), "ttl": 0, "network": network}))
    cfg = load_config(config)
    settings = Settings(servers_dir=str(root / name / "servers"), state_dir=str(root / "state"),
                        connect_timeout=5.0, ssh_timeout=60.0)
    try:
        info = lib.launch(cfg, settings=settings).info
        one, two = info.workers
        rtt = statistics.median(round_trip(info, one, two, count=count) for _ in range(repeat))
        rate = statistics.median(throughput(info, one, two, seconds=seconds) for _ in range(repeat))
        return f"{rtt * 1e6:.0f} us", f"{rate / 1e9:.2f} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:.0f} Mbit/s"
    except CloisterError as err:
        return "refused", str(err).split(" (")[0]
    finally:
        lib.destroy(cfg, settings=settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1gbit,100mbit", help="shaped rates to measure, comma-separated")
    parser.add_argument("--latency", default="1ms", help="a one-way latency to measure where netem exists")
    parser.add_argument("--count", type=int, default=500, help="round trips to take the median of")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of each throughput stream")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per setting; the median is shown")
    args = parser.parse_args()
    settings = [("netns, unshaped", {}),
                *((f"netns, rate {rate}", {"rate": rate}) for rate in args.rates.split(",") if rate),
                (f"netns, latency {args.latency}", {"latency": args.latency}),
                ("loopback mode (reference)", {"mode": "loopback"})]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cloister-netbench-") as tmp:
        for index, (label, network) in enumerate(settings):
            rows.append((label, *measure(Path(tmp), f"nabench{index}", network, count=args.count,
                                         seconds=args.seconds, repeat=args.repeat)))
            print(f"{rows[-1][0]:<28} {rows[-1][1]:>10}  {rows[-1][2]}", file=sys.stderr)
    width = max(len(r[0]) for r in rows)
    print(f"{'setting':<{width}}  {'round trip':>10}  throughput (1 TCP stream)")
    for label, rtt, rate in rows:
        print(f"{label:<{width}}  {rtt:>10}  {rate}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
