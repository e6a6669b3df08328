"""What each host of a run was doing: a /proc sampler started beside the run's processes, its parser,
and the run folder's ``resources.csv`` and per-host summary (``draw`` makes ``resources.png`` of them).

The sampler is POSIX sh and awk, which every node already has for the roles: no package is installed.
Once per interval it appends one line of raw counters to ``resources.raw`` in the run's folder on the
host; rates are computed here, from the counters and the samples' own times. It ends with the run: it
is recorded in ``pids`` like the run's processes (so the run's kill ends it), and it stops by itself
once no process of the run is left on its host.
"""

from __future__ import annotations

import csv
import io
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..files import atomic_write
from ..layout import run_dir
from .record import RunRecord
from .scripts import RUN_MARK


RAW_FILE = "resources.raw"
CSV_FILE = "resources.csv"
PNG_FILE = "resources.png"
SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's sector size

# One sample, read in awk's BEGIN so that no input file is ever opened as a program input (a process
# that ends between the shell's glob and awk's read is simply skipped). Prints
#   s UPTIME RUN_TICKS RUN_RSS_PAGES RUN_PROCS SELF_TICKS MEM_TOTAL_KB MEM_AVAIL_KB NET_RX NET_TX
#     DISK_READ_SECTORS DISK_WRITE_SECTORS cpu:BUSY:TOTAL cpu0:BUSY:TOTAL ...
# and exits 0 while a process of the run is alive on the host, 1 when none is left of those it started,
# 2 when it started none (its processes come from a launcher elsewhere, such as mpirun). The run's
# processes are the process groups in ``pids`` (each role's PID leads one) and every process whose
# environment carries the run's mark (E: the paths grep found), wherever it was started from; ticks
# include reaped children (cutime, cstime), so a process that ends does not take its CPU time out of the sum.
_AWK = r"""BEGIN {
  roles = 0
  while ((getline l < "pids") > 0) { split(l, p, " "); if (p[2] != "sampler") { run[p[1]] = 1; roles++ } }
  close("pids")
  n = split(E, e, "\n"); for (i = 1; i <= n; i++) { split(e[i], f, "/"); marked[f[3]] = 1 }
  rt = 0; rss = 0; live = 0; st = 0
  for (i = 1; i < ARGC; i++) {
    if ((getline l < ARGV[i]) > 0) {
      pid = l; sub(/ .*/, "", pid); sub(/^.*\) /, "", l); split(l, a, " ")
      if (a[3] == S) st += a[12] + a[13] + a[14] + a[15]
      else if (((a[3] in run) || (pid in marked)) && a[1] != "Z") {
        rt += a[12] + a[13] + a[14] + a[15]; rss += a[22]; live++
      }
    }
    close(ARGV[i])
  }
  getline up < "/proc/uptime"; close("/proc/uptime"); split(up, u, " ")
  cpus = ""
  while ((getline l < "/proc/stat") > 0) {
    if (l !~ /^cpu/) break
    n = split(l, a, " "); t = 0
    for (j = 2; j <= 9 && j <= n; j++) t += a[j]
    cpus = cpus sprintf(" %s:%.0f:%.0f", a[1], t - a[5] - a[6], t)
  }
  close("/proc/stat")
  while ((getline l < "/proc/meminfo") > 0) {
    split(l, a, " ")
    if (a[1] == "MemTotal:") mt = a[2]; else if (a[1] == "MemAvailable:") ma = a[2]
  }
  close("/proc/meminfo")
  rx = 0; tx = 0
  while ((getline l < "/proc/net/dev") > 0) {
    if (l !~ /:/) continue
    sub(/:/, " ", l); split(l, a, " ")
    if (a[1] != "lo") { rx += a[2]; tx += a[10] }
  }
  close("/proc/net/dev")
  split(D, dl, " "); for (k in dl) disk[dl[k]] = 1
  rd = 0; wr = 0
  while ((getline l < "/proc/diskstats") > 0) { split(l, a, " "); if (a[3] in disk) { rd += a[6]; wr += a[10] } }
  close("/proc/diskstats")
  printf "s %s %.0f %.0f %d %.0f %.0f %.0f", u[1], rt, rss, live, st, mt, ma
  printf " %.0f %.0f %.0f %.0f%s\n", rx, tx, rd, wr, cpus
  exit (live > 0) ? 0 : ((roles > 0) ? 1 : 2)
}"""

# $1 the run's folder, $2 the interval, $3 the run's mark (NAME=run id), $4 the seconds a host whose
# processes come from elsewhere waits for them. Whole disks only (partitions, device-mapper and md
# devices would count the same bytes twice), and no loop or RAM disks. On TERM (the run's kill) one
# last sample records the moment the run ended.
_SAMPLER = "\n".join([
    'cd "$1" || exit 0',
    'I=$2; M=$3; L=${4:-0}; t0=$(date +%s); seen=',
    "hz=$(getconf CLK_TCK 2>/dev/null) || hz=100",
    "pg=$(getconf PAGESIZE 2>/dev/null) || pg=4096",
    "D=",
    "for d in /sys/block/*; do n=${d##*/}; case $n in '*'|loop*|ram*|zram*|dm-*|md*|sr*|nbd*|fd*) ;; "
    '*) D="$D $n";; esac; done',
    "dmi() { cat /sys/devices/virtual/dmi/id/$1 2>/dev/null; }",
    '{ echo "interval $I"; echo "hz ${hz:-100}"; echo "page ${pg:-4096}"',
    '  echo "epoch $(date +%s.%N) $(cut -d" " -f1 /proc/uptime)"',
    '  echo "vendor $(dmi sys_vendor)"; echo "machine $(dmi product_name)"',
    "  echo \"cpu_model $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)\"",
    "} >> " + RAW_FILE,
    'sample() { E=; [ -z "$M" ] || E=$(grep -lzxF "$M" /proc/[0-9]*/environ 2>/dev/null)',
    f'  awk -v S=$$ -v D="$D" -v E="$E" {shlex.quote(_AWK)} /proc/[0-9]*/stat >> {RAW_FILE}; }}',
    "trap 'sample; exit 0' TERM",
    # Until the run's processes here are gone; on a host that started none, until those a launcher
    # started have come and gone, or for at most L seconds if none ever comes.
    'while :; do sample; r=$?; [ "$r" = 0 ] && seen=1; [ "$r" = 1 ] && exit 0',
    '  [ "$r" = 2 ] && { [ -n "$seen" ] || [ $(($(date +%s) - t0)) -ge "$L" ]; } && exit 0',
    '  sleep "$I"; done',
])


def sampler_launch(benchmark: str, run_id: str, *, interval: float, wait: float) -> str:
    """Shell lines that start the run's sampler on a host, detached, unless one of this run is alive
    there already (the master's start finds the manager's); ``wait``: the seconds a host that starts no
    process of its own samples while none of the run's processes has come. Prints nothing."""
    rdir = run_dir(benchmark, run_id)
    return "\n".join([
        f"CS=$(awk '$2 == \"sampler\" {{p = $1}} END {{print p}}' {rdir}/pids 2>/dev/null) || CS=",
        'if [ -z "$CS" ] || ! kill -0 "$CS" 2>/dev/null; then',
        f"  (setsid sh -c {shlex.quote(_SAMPLER)} sampler {rdir} {shlex.quote(f'{interval:g}')} "
        f"{shlex.quote(f'{RUN_MARK}={run_id}')} {int(wait)} >> {rdir}/{RAW_FILE} 2>&1 < /dev/null & "
        f"echo \"$! sampler - -\" >> {rdir}/pids)",
        "fi",
    ])


# -- parsing ------------------------------------------------------------------

@dataclass
class Sample:
    """One line of the sampler, its uptime turned into a wall-clock time."""

    t: float
    segment: int  # a sampler started again on the host begins a new one: no rate spans two
    run_ticks: float
    rss_pages: float
    self_ticks: float
    mem_used_kb: float
    net: tuple[float, float]
    disk: tuple[float, float]
    cpus: dict[str, tuple[float, float]]  # cpu, cpu0, ... -> (busy, total) jiffies


@dataclass
class HostSamples:
    facts: dict[str, str] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def number(self, key: str, default: float) -> float:
        try:
            return float(self.facts.get(key, ""))
        except ValueError:
            return default


def _epoch(text: str) -> float | None:
    """``date +%s.%N`` and the uptime at that moment: wall clock minus uptime."""
    parts = text.split()
    try:
        wall = float(parts[0]) if parts[0].replace(".", "", 1).isdigit() else float(parts[0].split(".")[0])
        return wall - float(parts[1])
    except (IndexError, ValueError):
        return None


def parse_raw(text: str) -> HostSamples:
    """``resources.raw``; lines it does not understand (a sample cut by the kill, an error) are skipped."""
    out = HostSamples()
    offset, segment = None, 0
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        if key == "epoch":
            offset, segment = _epoch(rest), segment + 1
        elif key == "s" and offset is not None:
            sample = _sample(rest.split(), offset=offset, segment=segment)
            if sample:
                out.samples.append(sample)
        elif key in ("interval", "hz", "page", "vendor", "machine", "cpu_model"):
            out.facts[key] = rest.strip()
    return out


def _sample(words: list[str], *, offset: float, segment: int) -> Sample | None:
    try:
        values = [float(w) for w in words[:11]]
        cpus = {name: (float(busy), float(total)) for name, busy, total in (w.split(":") for w in words[11:])}
    except ValueError:
        return None
    if len(values) < 11 or "cpu" not in cpus:
        return None
    uptime, ticks, rss, _procs, self_ticks, mem_total, mem_avail, rx, tx, rd, wr = values
    return Sample(t=offset + uptime, segment=segment, run_ticks=ticks, rss_pages=rss, self_ticks=self_ticks,
                  mem_used_kb=mem_total - mem_avail, net=(rx, tx), disk=(rd, wr), cpus=cpus)


# -- series and summary ------------------------------------------------------------

Row = tuple[float, str, float]  # seconds since the run started, metric, value


def _pairs(samples: list[Sample]) -> Iterable[tuple[Sample, Sample, float]]:
    for a, b in zip(samples, samples[1:]):
        if a.segment == b.segment and b.t > a.t:
            yield a, b, b.t - a.t


def _pct(a: tuple[float, float], b: tuple[float, float]) -> float:
    total = b[1] - a[1]
    return 100.0 * max(0.0, b[0] - a[0]) / total if total > 0 else 0.0


def host_rows(host: HostSamples, *, start: float) -> list[Row]:
    """The time series of one host: gauges at every sample, rates over each interval (at its end)."""
    hz, page = host.number("hz", 100.0), host.number("page", 4096.0)
    rows: list[Row] = []
    for s in host.samples:
        at = round(s.t - start, 3)
        rows += [(at, "mem_used_bytes", s.mem_used_kb * 1024), (at, "run_rss_bytes", s.rss_pages * page)]
    for a, b, dt in _pairs(host.samples):
        at = round(b.t - start, 3)
        rows += [(at, f"{name}_pct", round(_pct(a.cpus[name], b.cpus[name]), 2)) for name in b.cpus if name in a.cpus]
        if b.run_ticks >= a.run_ticks:
            rows.append((at, "run_cpu_pct", round(100.0 * (b.run_ticks - a.run_ticks) / hz / dt, 2)))
        for metric, before, after, scale in (("net_rx", a.net[0], b.net[0], 1), ("net_tx", a.net[1], b.net[1], 1),
                                             ("disk_read", a.disk[0], b.disk[0], SECTOR_BYTES),
                                             ("disk_write", a.disk[1], b.disk[1], SECTOR_BYTES)):
            rows.append((at, f"{metric}_bytes_s", round(max(0.0, after - before) * scale / dt, 1)))
    return sorted(rows, key=lambda r: r[0])


def summarize(host: HostSamples) -> dict[str, Any]:
    """Peaks, means and totals of one host's samples, and what the host is."""
    hz, page = host.number("hz", 100.0), host.number("page", 4096.0)
    samples, pairs = host.samples, list(_pairs(host.samples))
    span = sum(dt for _, _, dt in pairs)
    # When the last process of a group ends, its CPU time leaves the sum: that interval has no run CPU.
    run_pairs = [(a, b, dt) for a, b, dt in pairs if b.run_ticks >= a.run_ticks]
    run_span = sum(dt for _, _, dt in run_pairs)
    busy = sum(max(0.0, b.cpus["cpu"][0] - a.cpus["cpu"][0]) for a, b, _ in pairs)
    total = sum(b.cpus["cpu"][1] - a.cpus["cpu"][1] for a, b, _ in pairs)
    run_ticks = sum(b.run_ticks - a.run_ticks for a, b, _ in run_pairs)
    self_ticks = sum(max(0.0, b.self_ticks - a.self_ticks) for a, b, _ in pairs)

    def moved(get, scale: float = 1.0) -> int:
        return int(sum(max(0.0, get(b) - get(a)) for a, b, _ in pairs) * scale)

    vendor, product = host.facts.get("vendor", ""), host.facts.get("machine", "")
    return {
        "samples": len(samples),
        # On EC2 (Nitro) the DMI product name is the instance type.
        "instance_type": product if vendor.startswith("Amazon EC2") and product else None,
        "cpu_model": host.facts.get("cpu_model") or None,
        "cores": max((len(s.cpus) - 1 for s in samples), default=0),
        "cpu_peak_pct": round(max((_pct(a.cpus["cpu"], b.cpus["cpu"]) for a, b, _ in pairs), default=0.0), 1),
        "cpu_mean_pct": round(100.0 * busy / total, 1) if total > 0 else 0.0,
        "run_cpu_peak_pct": round(max((100.0 * (b.run_ticks - a.run_ticks) / hz / dt for a, b, dt in run_pairs),
                                      default=0.0), 1),
        "run_cpu_mean_pct": round(100.0 * run_ticks / hz / run_span, 1) if run_span else 0.0,
        "mem_peak_bytes": int(max((s.mem_used_kb for s in samples), default=0) * 1024),
        "run_rss_peak_bytes": int(max((s.rss_pages for s in samples), default=0) * page),
        "net_rx_bytes": moved(lambda s: s.net[0]), "net_tx_bytes": moved(lambda s: s.net[1]),
        "disk_read_bytes": moved(lambda s: s.disk[0], SECTOR_BYTES),
        "disk_write_bytes": moved(lambda s: s.disk[1], SECTOR_BYTES),
        "sampler_cpu_pct": round(100.0 * self_ticks / hz / span, 2) if span else 0.0,
    }


def phase_times(timings: dict[str, float]) -> list[tuple[str, float]]:
    """The run's phases in seconds since it started, as far as its timings tell."""
    out = [(label, timings[key]) for label, key in (("workers started", "workers_started_s"),
                                                    ("all ready", "workers_ready_s"),
                                                    ("master started", "master_started_s")) if key in timings]
    master_start = timings.get("master_started_s", timings.get("workers_ready_s"))
    if master_start is not None and "master_s" in timings:
        out.append(("master ended", master_start + timings["master_s"]))
    return out


# -- the run folder -----------------------------------------------------------------

def collect(local_dir: Path, *, record: RunRecord) -> dict[str, Any]:
    """Read every host's ``resources.raw`` under ``local_dir``, write ``resources.csv`` beside run.json,
    and return run.json's ``resources`` ({} when nothing was sampled). The figure is drawn later, from
    the CSV (``cloister.runs.draw``), off the run's critical path."""
    hosts = {}
    for host in dict.fromkeys([record.hosts.master, *record.hosts.workers]):
        raw = local_dir / host / RAW_FILE
        if raw.is_file():
            hosts[host] = parse_raw(raw.read_text(errors="replace"))
    if not any(h.samples for h in hosts.values()):
        return {}
    start = datetime.fromisoformat(record.started).timestamp()
    series = {host: host_rows(samples, start=start) for host, samples in hosts.items()}
    write_csv(local_dir / CSV_FILE, series=series)
    interval = next((h.facts["interval"] for h in hosts.values() if "interval" in h.facts), None)
    return {"interval_s": float(interval) if interval else None,
            "hosts": {host: summarize(samples) for host, samples in hosts.items()}}


def write_csv(path: Path, *, series: dict[str, list[Row]]) -> Path:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("host", "time", "metric", "value"))
    for host, rows in series.items():
        writer.writerows((host, f"{t:.3f}", metric, f"{value:.2f}".rstrip("0").rstrip("."))
                         for t, metric, value in rows)
    return atomic_write(path, out.getvalue())


# -- sweeps ---------------------------------------------------------------------------

SWEEP_FIELDS = ("cpu_peak_pct", "cpu_mean_pct", "run_cpu_peak_pct", "run_cpu_mean_pct", "mem_peak_bytes",
                "run_rss_peak_bytes", "net_bytes", "disk_bytes")


def sweep_columns(resources: dict[str, Any]) -> dict[str, str]:
    """One run's summary as results.csv columns: peaks are the busiest host's, means the hosts' mean,
    bytes the sum over hosts (in and out, read and written); empty when the run was not sampled."""
    hosts = list((resources or {}).get("hosts", {}).values())
    if not hosts:
        return {name: "" for name in SWEEP_FIELDS}

    def peak(key: str) -> float:
        return max(h[key] for h in hosts)

    def mean(key: str) -> float:
        return round(sum(h[key] for h in hosts) / len(hosts), 1)

    values = {"cpu_peak_pct": peak("cpu_peak_pct"), "cpu_mean_pct": mean("cpu_mean_pct"),
              "run_cpu_peak_pct": peak("run_cpu_peak_pct"), "run_cpu_mean_pct": mean("run_cpu_mean_pct"),
              "mem_peak_bytes": peak("mem_peak_bytes"), "run_rss_peak_bytes": peak("run_rss_peak_bytes"),
              "net_bytes": sum(h["net_rx_bytes"] + h["net_tx_bytes"] for h in hosts),
              "disk_bytes": sum(h["disk_read_bytes"] + h["disk_write_bytes"] for h in hosts)}
    return {name: str(values[name]) for name in SWEEP_FIELDS}
