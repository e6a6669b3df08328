#!/usr/bin/env python3
"""Fan-out benchmark: `inv cluster.run` against asyncssh, parallel-ssh 2, pssh, clush and a serial ssh loop.

For every N in --hosts, a local cluster of N hosts (a master and N-1 workers, in a temporary state
directory) is launched through the library; then each tool runs the same command on the same N
hosts, with the same key, user and known_hosts (strict host-key checking; parallel-ssh 2 checks no
host keys at all), and the whole-process wall time is measured. Two rows for inv: "cold" runs after
the cluster's warm connections were closed (untimed), as the first command of the day;
"repeated" is the next `inv cluster.run`, over the connections the cold one left open. asyncssh and
parallel-ssh 2 run as the scripts a user would write (benchmarks/libclients.py, a whole Python
process each; `pip install -e '.[bench]'`). Runs are interleaved tool by tool, after one untimed
warm-up each, and the median of --repeat is reported with the ratios to the faster library and to
the faster of pssh/clush. The cluster is destroyed at the end, also on failure or Ctrl-C.

The output-size row runs a command that prints --output-mb MB per host on --output-hosts hosts
(the cluster of that size from --hosts, or one of its own): every tool's stdout goes to /dev/null
(inv spills each host's output to a file and prints where), and the peak resident memory of the
tool's own process is reported beside its wall time. Target: no slower than the faster of pssh/clush.

    .venv/bin/python benchmarks/fanout.py --setup --hosts 8,32,64,128 --repeat 5
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloister.cluster import lifecycle as lib  # noqa: E402
from cloister.settings import Settings  # noqa: E402
from cloister.config import load_config  # noqa: E402
from cloister.errors import CloisterError  # noqa: E402

INV = str(Path(sys.executable).parent / "inv")
LIBCLIENTS = str(REPO / "benchmarks" / "libclients.py")
COMMAND = "hostname; sleep 1"
TOOLS = ("inv", "inv-repeated", "asyncssh", "parallel-ssh", "pssh", "clush", "serial")
LIBRARIES = ("asyncssh", "parallel-ssh")
# The output-size row compares the command-line tools only.
OUTPUT_TOOLS = ("inv", "pssh", "clush")
# Beyond this a serial loop takes N seconds per run and tells nothing new (field notes: 38 s at N=32).
SERIAL_MAX = 8
COLD_TARGET = 1.0        # cold inv / the faster library
REPEATED_TARGET = 0.8    # repeated inv / the faster library
REPEATED_CLI_TARGET = 0.45   # repeated inv / the faster of pssh and clush
OUTPUT_TARGET = 1.0


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


def commands(info, root: Path, config: Path, command: str) -> dict[str, list[list[str]]]:
    """tool -> the processes one run of it starts (one, except the serial loop: one per host)."""
    addresses = [n.host for n in info.cluster_nodes]
    hosts_file = root / "hosts.txt"
    hosts_file.write_text("".join(a + "\n" for a in addresses))
    options = ssh_options(info)
    n = str(len(addresses))
    pssh = ["parallel-ssh", "-p", n, "-h", str(hosts_file), "-l", info.user, "-t", "600", "-i"]
    for option in options:
        pssh += ["-O", option]
    clush = ["clush", "-f", n, "-w", ",".join(addresses), "-l", info.user, "-b",
             "-o", " ".join(f"-o {option}" for option in options)]
    serial = [["ssh", *(f"-o{option}" for option in options), f"{info.user}@{address}", command]
              for address in addresses]
    inv = [[INV, "cluster.run", "--config", str(config), command]]
    libraries = {tool: [[sys.executable, "-W", "ignore", LIBCLIENTS, tool, str(hosts_file), info.user, info.ssh_key,
                         info.known_hosts, command]] for tool in LIBRARIES}
    return {"inv": inv, "inv-repeated": inv, **libraries, "pssh": [pssh + [command]], "clush": [clush + [command]],
            "serial": serial}


def timed(argvs: list[list[str]], env: dict[str, str], *, quiet: bool = False) -> tuple[float, int, float]:
    """(wall time, peak RSS in KiB of the tool's largest process, CPU seconds of the tool and every process
    it waited for) of running ``argvs`` one after another; any failure stops the benchmark. ``quiet``
    sends stdout to /dev/null (large outputs)."""
    start = time.perf_counter()
    peak = 0
    cpu = 0.0
    for argv in argvs:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL if quiet else out, stderr=err)
            killer = threading.Timer(600, proc.kill)
            killer.start()
            # wait4, not wait: it reports the peak RSS of this one process (and what it waited for).
            _, status, usage = os.wait4(proc.pid, 0)
            killer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = max(peak, usage.ru_maxrss)
            cpu += usage.ru_utime + usage.ru_stime
            if proc.returncode != 0:
                err.seek(0)
                out.seek(0)
                tail = (err.read() or out.read()).decode(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {' | '.join(tail)}")
    return time.perf_counter() - start, peak, cpu


Row = tuple[str, str, bool]    # label, command, quiet


def measure(n: int, repeat: int, tools: list[str], rows: list[Row]) -> dict[str, dict[str, tuple[float, int, float]]]:
    """label -> tool -> (median wall time, peak RSS) on a fresh cluster of ``n`` hosts."""
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
        # Before each cold inv the cluster's warm connections are closed (untimed).
        before = {"inv": lambda: lib.close_connections(cfg, settings=settings)}
        return {label: _rounds(n, repeat, [t for t in tools if not quiet or t in OUTPUT_TOOLS],
                               commands(info, root, config, command), env, label=label, quiet=quiet,
                               output=Path(settings.state_dir) / "output", before=before)
                for label, command, quiet in rows}
    finally:
        lib.destroy(cfg, settings=settings)
        shutil.rmtree(root, ignore_errors=True)


def _rounds(n: int, repeat: int, tools: list[str], argvs: dict[str, list[list[str]]], env: dict[str, str], *,
            label: str, quiet: bool, output: Path,
            before: dict[str, Callable[[], object]]) -> dict[str, tuple[float, int, float]]:
    """One untimed warm-up per tool, then ``repeat`` interleaved timed rounds; medians. ``before`` runs
    untimed ahead of each run of its tool."""
    for tool in tools:
        before.get(tool, lambda: None)()
        timed(argvs[tool], env, quiet=quiet)
    times: dict[str, list[float]] = {tool: [] for tool in tools}
    cpus: dict[str, list[float]] = {tool: [] for tool in tools}
    peaks: dict[str, int] = {tool: 0 for tool in tools}
    for run in range(repeat):
        for tool in tools:
            before.get(tool, lambda: None)()
            seconds, peak, cpu = timed(argvs[tool], env, quiet=quiet)
            times[tool].append(seconds)
            cpus[tool].append(cpu)
            peaks[tool] = max(peaks[tool], peak)
            shutil.rmtree(output, ignore_errors=True)  # inv's spilled outputs: keep the disk flat
        print(f"N={n} {label}: run {run + 1}/{repeat}: "
              + ", ".join(f"{t} {times[t][-1]:.2f}s" for t in tools), file=sys.stderr)
    return {tool: (statistics.median(values), peaks[tool], statistics.median(cpus[tool]))
            for tool, values in times.items()}


def table(results: dict[int, dict[str, dict[str, tuple[float, int, float]]]], repeat: int) -> str:
    head = ("| N | inv cold | inv repeated | asyncssh | parallel-ssh | pssh | clush | serial "
            f"| cold / best library (<= {COLD_TARGET}) | repeated / best library (<= {REPEATED_TARGET}) "
            f"| repeated / min(pssh, clush) (<= {REPEATED_CLI_TARGET}) | targets met |")
    lines = [f"`{COMMAND}`, whole-process wall time, median of {repeat}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for n, rows in results.items():
        m = {tool: value[0] for tool, value in rows.get(COMMAND, {}).items()}
        if not m:
            continue
        best_lib = min(m[t] for t in LIBRARIES)
        best_cli = min(m["pssh"], m["clush"])
        cold, warm, warm_cli = m["inv"] / best_lib, m["inv-repeated"] / best_lib, m["inv-repeated"] / best_cli
        met = cold <= COLD_TARGET and warm <= REPEATED_TARGET and warm_cli <= REPEATED_CLI_TARGET
        cells = " | ".join(f"{m[t]:.2f} s" if t in m else "skipped" for t in TOOLS)
        lines.append(f"| {n} | {cells} | {cold:.2f} | {warm:.2f} | {warm_cli:.2f} | {'yes' if met else 'no'} |")
    lines += ["", "CPU time of each tool's processes (user + sys, the ssh processes it waited for included; "
              "the machine's load does not stretch it as it stretches wall time), median:", "",
              "| N | " + " | ".join(TOOLS) + " |", "|" + "---|" * (len(TOOLS) + 1)]
    for n, rows in results.items():
        cpu = {tool: value[2] for tool, value in rows.get(COMMAND, {}).items()}
        if cpu:
            lines.append(f"| {n} | " + " | ".join(f"{cpu[t]:.2f} s" if t in cpu else "skipped" for t in TOOLS) + " |")
    return "\n".join(lines) + _output_table(results, repeat)


def _output_table(results: dict[int, dict[str, dict[str, tuple[float, int, float]]]], repeat: int) -> str:
    found = [(n, label, rows[label]) for n, rows in results.items() for label in rows if label != COMMAND]
    if not found:
        return ""
    head = f"| N | output | inv | pssh | clush | inv / min(pssh, clush) | <= {OUTPUT_TARGET}x |"
    lines = ["", "", "output size (`head -c BYTES /dev/zero | base64` on every host): whole-process wall time "
             f"(median of {repeat}) and peak RSS of the tool's largest process; stdout to /dev/null", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for n, label, row in found:
        cell = {tool: f"{row[tool][0]:.2f} s, {row[tool][1] / 1024:.0f} MiB" for tool in ("inv", "pssh", "clush")}
        ratio = row["inv"][0] / min(row["pssh"][0], row["clush"][0])
        lines.append(f"| {n} | {label} | {cell['inv']} | {cell['pssh']} | {cell['clush']} | {ratio:.2f} | "
                     f"{'yes' if ratio <= OUTPUT_TARGET else 'no'} |")
    return "\n".join(lines)


def output_command(megabytes: float) -> str:
    """A command that prints ``megabytes`` MB of base64 text (76-character lines), like a chatty build."""
    return f"head -c {int(megabytes * 1e6 * 3 / 4)} /dev/zero | base64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", default="8,32,64,128", help="comma-separated cluster sizes (hosts per run)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per tool and size (median reported)")
    parser.add_argument("--setup", action="store_true", help="apt-get install pssh and clustershell if missing")
    parser.add_argument("--serial", action="store_true",
                        help=f"also time the serial ssh loop above N={SERIAL_MAX} (N seconds per run)")
    parser.add_argument("--output-hosts", type=int, default=8, help="hosts of the output-size row (0: no row)")
    parser.add_argument("--output-mb", type=float, default=20, help="MB each host prints in the output-size row")
    args = parser.parse_args()
    try:
        sizes = [int(part) for part in args.hosts.split(",") if part]
    except ValueError:
        sys.exit(f"fanout: --hosts {args.hosts!r}: expected comma-separated integers such as 8,32,64")
    if any(n < 2 for n in sizes) or args.repeat < 1 or args.output_hosts == 1 or args.output_mb <= 0:
        sys.exit("fanout: every size must be >= 2 (a master and a worker), --repeat >= 1, --output-mb > 0")
    if args.setup:
        setup()
    for command in ("parallel-ssh", "clush", "ssh"):
        if not shutil.which(command):
            sys.exit(f"fanout: '{command}' not found; run with --setup")
    for module in ("asyncssh", "pssh"):
        if importlib.util.find_spec(module) is None:
            sys.exit(f"fanout: Python module {module} not found; pip install -e '.[bench]'")
    # As an installed package would be: byte-compiled once (PYTHONDONTWRITEBYTECODE would otherwise make
    # every inv compile cloister and tasks again, ~0.3 s of CPU each time).
    for package in ("cloister", "tasks"):
        compileall.compile_dir(str(REPO / package), quiet=1)
    # SIGTERM must run the finally blocks that destroy the cluster, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("fanout: terminated"))
    big: Row = (f"{args.output_mb:g} MB per host", output_command(args.output_mb), True)
    plan = {n: [(COMMAND, COMMAND, False)] for n in sizes}
    if args.output_hosts:
        plan.setdefault(args.output_hosts, []).append(big)
    results: dict[int, dict[str, dict[str, tuple[float, int, float]]]] = {}
    try:
        for n, rows in plan.items():
            tools = [t for t in TOOLS if t != "serial" or n <= SERIAL_MAX or args.serial]
            results[n] = measure(n, args.repeat, tools, rows)
    except (CloisterError, RuntimeError, KeyboardInterrupt) as err:
        if results:
            print(table(results, args.repeat))
        sys.exit(f"fanout: {err or 'interrupted'}")
    print(table(results, args.repeat))
    if any(n > SERIAL_MAX for n in sizes) and not args.serial:
        print(f"\nserial skipped above N={SERIAL_MAX} (about N x 1.2 s per run); --serial times it")


if __name__ == "__main__":
    main()
