#!/usr/bin/env python3
"""Fan-out benchmark: `inv cluster.run` against parallel-ssh, clush and a serial ssh loop.

For every N in --hosts, a local cluster of N hosts (a master and N-1 workers, in a temporary state
directory) is launched through the library; then each tool runs the same command on the same N
hosts, with the same key, user and known_hosts (strict host-key checking), and the whole-process
wall time is measured. Runs are interleaved tool by tool, after one untimed warm-up each, and the
median of --repeat is reported with the ratio of inv to the faster of pssh/clush. The cluster is
destroyed at the end, also on failure or Ctrl-C.

    .venv/bin/python benchmarks/fanout.py --setup --hosts 8,32,64,128 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloister import cluster as lib  # noqa: E402
from cloister.settings import Settings  # noqa: E402
from cloister.config import load_config  # noqa: E402
from cloister.errors import CloisterError  # noqa: E402

INV = str(Path(sys.executable).parent / "inv")
COMMAND = "hostname; sleep 1"
TOOLS = ("inv", "pssh", "clush", "serial")
# Beyond this a serial loop takes N seconds per run and tells nothing new (field notes: 38 s at N=32).
SERIAL_MAX = 8
TARGET = 0.75


def setup() -> None:
    """Install parallel-ssh (pssh) and clush (clustershell) from the distribution when missing."""
    missing = [pkg for cmd, pkg in (("parallel-ssh", "pssh"), ("clush", "clustershell")) if not shutil.which(cmd)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit(f"fanout: install {' '.join(missing)} (Debian/Ubuntu: apt-get install {' '.join(missing)})")
    print(f"installing {' '.join(missing)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)


def ssh_options(info) -> list[str]:
    """The options every ssh-based tool gets: cluster key, cluster known_hosts, strict checking."""
    return [f"IdentityFile={info.ssh_key}", "IdentitiesOnly=yes", f"UserKnownHostsFile={info.known_hosts}",
            "StrictHostKeyChecking=yes", "BatchMode=yes", "ConnectTimeout=10"]


def commands(info, root: Path, config: Path) -> dict[str, list[list[str]]]:
    """tool -> the processes one run of it starts (one, except the serial loop: one per host)."""
    addresses = [n.host for n in info.cluster_nodes]
    hosts_file = root / "hosts.txt"
    hosts_file.write_text("".join(a + "\n" for a in addresses))
    options = ssh_options(info)
    n = str(len(addresses))
    pssh = ["parallel-ssh", "-p", n, "-h", str(hosts_file), "-l", info.user, "-t", "60", "-i"]
    for option in options:
        pssh += ["-O", option]
    clush = ["clush", "-f", n, "-w", ",".join(addresses), "-l", info.user, "-b",
             "-o", " ".join(f"-o {option}" for option in options)]
    serial = [["ssh", *(f"-o{option}" for option in options), f"{info.user}@{address}", COMMAND]
              for address in addresses]
    return {"inv": [[INV, "cluster.run", "--config", str(config), COMMAND]],
            "pssh": [pssh + [COMMAND]], "clush": [clush + [COMMAND]], "serial": serial}


def timed(argvs: list[list[str]], env: dict[str, str]) -> float:
    """Wall time of running ``argvs`` one after another; any failure stops the benchmark."""
    start = time.perf_counter()
    for argv in argvs:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {' | '.join(tail)}")
    return time.perf_counter() - start


def measure(n: int, repeat: int, tools: list[str]) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"cloister-fanout-{n}-"))
    config = root / "fanout.json"
    config.write_text(json.dumps({"cluster_name": f"fanout-{n}-{os.getpid()}", "provider": "local",
                                  "nworkers": n - 1, "dev_host": False, "ttl": 0}))
    cfg = load_config(config)
    settings = Settings(servers_dir=str(root / "servers"), state_dir=str(root / "state"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_CLOISTER_")}
    env.update(INVOKE_CLOISTER_SERVERS_DIR=settings.servers_dir, INVOKE_CLOISTER_STATE_DIR=settings.state_dir)
    try:
        start = time.perf_counter()
        info = lib.launch(cfg, settings=settings).info
        print(f"N={n}: cluster up in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        argvs = commands(info, root, config)
        for tool in tools:
            timed(argvs[tool], env)
        times: dict[str, list[float]] = {tool: [] for tool in tools}
        for run in range(repeat):
            for tool in tools:
                times[tool].append(timed(argvs[tool], env))
            print(f"N={n}: run {run + 1}/{repeat}: "
                  + ", ".join(f"{t} {times[t][-1]:.2f}s" for t in tools), file=sys.stderr)
        return {tool: statistics.median(values) for tool, values in times.items()}
    finally:
        lib.destroy(cfg, settings=settings)
        shutil.rmtree(root, ignore_errors=True)


def table(results: dict[int, dict[str, float]], repeat: int) -> str:
    head = f"| N | inv | pssh | clush | serial | inv / min(pssh, clush) | <= {TARGET}x |"
    lines = [f"`{COMMAND}`, whole-process wall time, median of {repeat}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for n, medians in results.items():
        ratio = medians["inv"] / min(medians["pssh"], medians["clush"])
        serial = f"{medians['serial']:.2f} s" if "serial" in medians else "skipped"
        lines.append(f"| {n} | {medians['inv']:.2f} s | {medians['pssh']:.2f} s | {medians['clush']:.2f} s | "
                     f"{serial} | {ratio:.2f} | {'yes' if ratio <= TARGET else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="8,32,64,128", help="comma-separated cluster sizes (hosts per run)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per tool and size (median reported)")
    parser.add_argument("--setup", action="store_true", help="apt-get install pssh and clustershell if missing")
    parser.add_argument("--serial", action="store_true",
                        help=f"also time the serial ssh loop above N={SERIAL_MAX} (N seconds per run)")
    args = parser.parse_args()
    try:
        sizes = [int(part) for part in args.hosts.split(",")]
    except ValueError:
        sys.exit(f"fanout: --hosts {args.hosts!r}: expected comma-separated integers such as 8,32,64")
    if any(n < 2 for n in sizes) or args.repeat < 1:
        sys.exit("fanout: every size must be >= 2 (a master and a worker) and --repeat >= 1")
    if args.setup:
        setup()
    for command in ("parallel-ssh", "clush", "ssh"):
        if not shutil.which(command):
            sys.exit(f"fanout: '{command}' not found; run with --setup")
    # SIGTERM must run the finally blocks that destroy the cluster, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("fanout: terminated"))
    results: dict[int, dict[str, float]] = {}
    try:
        for n in sizes:
            tools = [t for t in TOOLS if t != "serial" or n <= SERIAL_MAX or args.serial]
            results[n] = measure(n, args.repeat, tools)
    except (CloisterError, RuntimeError, subprocess.TimeoutExpired, KeyboardInterrupt) as err:
        if results:
            print(table(results, args.repeat))
        sys.exit(f"fanout: {err or 'interrupted'}")
    print(table(results, args.repeat))
    if any(n > SERIAL_MAX for n in sizes) and not args.serial:
        print(f"\nserial skipped above N={SERIAL_MAX} (about N x 1.2 s per run); --serial times it")


if __name__ == "__main__":
    main()
