"""exp.show and exp.compare: a run's record as a person reads it, and two runs side by side.

Both return sections (a title, column names, rows of text) and leave the printing to the task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ExperimentError
from .record import RECORD_FILE, RUN_ID_RE, RunRecord
from . import draw
from .resources import CSV_FILE, phase_times

Section = tuple[str, tuple[str, ...], list[list[str]]]
MISSING = "-"


def find_run(ref: str, *, runs_dir: str | os.PathLike) -> Path:
    """A run's folder: ``ref`` is a folder holding run.json, or a run id looked up in runs/*/."""
    path = Path(ref).expanduser()
    if (path / RECORD_FILE).is_file():
        return path
    if not RUN_ID_RE.fullmatch(ref):
        raise ExperimentError(f"{ref}: neither a run folder with a {RECORD_FILE} nor a run id "
                              f"(YYYYMMDD-HHMMSS-xxxx; see inv exp.list)")
    found = sorted(p.parent for p in Path(runs_dir).glob(f"*/{ref}/{RECORD_FILE}"))
    if not found:
        raise ExperimentError(f"no run {ref} in {runs_dir}/ (see inv exp.list)", run_id=ref)
    if len(found) > 1:
        raise ExperimentError(f"run id {ref} is in {len(found)} folders ({', '.join(map(str, found))}); "
                              f"pass the folder", run_id=ref)
    return found[0]


def load_run(ref: str, *, runs_dir: str | os.PathLike) -> tuple[Path, RunRecord]:
    folder = find_run(ref, runs_dir=runs_dir)
    try:
        return folder, RunRecord.read(folder)
    except (OSError, ValueError) as err:
        raise ExperimentError(f"{folder / RECORD_FILE}: unreadable ({err})") from None


# -- values as text ------------------------------------------------------------------

def _bytes(count: float | None) -> str:
    if count is None:
        return MISSING
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def _seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}s"


def _commit(record: RunRecord) -> str:
    commit = record.git.commit
    return MISSING if not commit else commit[:12] + (" (uncommitted changes)" if record.git.dirty else "")


def machine(summary: dict[str, Any]) -> str:
    """What a host is: its EC2 instance type, else its cores and CPU model."""
    if summary.get("instance_type"):
        return summary["instance_type"]
    cores = f"{summary.get('cores', '?')} cores"
    return f"{cores}, {summary['cpu_model']}" if summary.get("cpu_model") else cores


def _role_of(record: RunRecord, host: str) -> str:
    if host == record.hosts.master:
        return "master"
    return f"worker{record.hosts.workers.index(host) + 1}" if host in record.hosts.workers else MISSING


def parameters(record: RunRecord) -> dict[str, str]:
    """What the run was asked to do, and where from."""
    return {"benchmark": record.benchmark, "k": str(record.k), "p": str(record.p),
            "args": " ".join(record.args) or MISSING, "manager": "yes" if record.manager else "no",
            "timeout": _seconds(record.timeout_s), "commit": _commit(record),
            "cluster": f"{record.cluster} ({record.provider})", "config": record.config or MISSING,
            "cloister": record.cloister_version}


def durations(record: RunRecord) -> dict[str, float]:
    """How long each part of the run took, as far as its timings tell."""
    timings, at = record.timings, dict(phase_times(record.timings))
    out = {}
    if "all ready" in at:
        out["start-up (to all ready)"] = at["all ready"]
    if "workers started" in at and "all ready" in at:
        out["workers' start-up"] = at["all ready"] - at["workers started"]
    if "master_s" in timings:
        out["master"] = timings["master_s"]
    if "master ended" in at and "total_s" in timings:
        out["kill and log collection"] = timings["total_s"] - at["master ended"]
    if "total_s" in timings:
        out["total"] = timings["total_s"]
    return out


# -- exp.show ------------------------------------------------------------------------

def show(record: RunRecord, *, folder: Path) -> list[Section]:
    """Every section of one run's account."""
    overview = [[key, value] for key, value in parameters(record).items()]
    overview += [["started", record.started], ["ended", record.ended or MISSING],
                 ["metric", MISSING if record.metric is None else str(record.metric)]]
    if record.error:
        overview.append(["error", record.error])
    interval = record.resources.get("interval_s")
    overview.append(["resources", f"sampled every {interval:g}s" if interval else "not sampled"])
    if interval:
        overview.append(["plot", _figure(folder)])
    sections = [(f"{record.benchmark} run {record.run_id}: {record.status} ({folder})", ("", ""), overview),
                ("processes", ("role", "host", "processes", "status", "exit codes"), _processes(record)),
                ("phases", ("phase", "at", "took"), _phases(record))]
    if record.resources.get("hosts"):
        sections.append(("resources per host", RESOURCE_COLUMNS, _resource_rows(record)))
    if record.failures:
        sections.append(("failures", ("host", "failure"), [[h, e] for h, e in record.failures.items()]))
    return sections


def _figure(folder: Path) -> str:
    """Where the run's resources.png is, drawn now if the run's background drawer did not."""
    try:
        figure = draw.ensure(folder)
    except Exception as err:  # noqa: BLE001 - the rest of the account stands without the figure
        return f"not drawn ({type(err).__name__}: {err})"
    return str(figure) if figure else f"not drawn (no {CSV_FILE})"


def _processes(record: RunRecord) -> list[list[str]]:
    groups: dict[tuple[str, str], list] = {}
    for proc in record.roles:
        groups.setdefault((proc.role, proc.host), []).append(proc)
    return [[role, host, str(len(procs)), ",".join(sorted({p.status for p in procs})),
             ",".join(sorted({str(p.exit) for p in procs if p.exit is not None})) or MISSING]
            for (role, host), procs in groups.items()]


def _phases(record: RunRecord) -> list[list[str]]:
    events = [("manager ready", record.timings["manager_ready_s"])] if "manager_ready_s" in record.timings else []
    events += phase_times(record.timings)
    if "total_s" in record.timings:
        events.append(("killed, logs collected", record.timings["total_s"]))
    rows, previous = [], 0.0
    for name, at in sorted(events, key=lambda e: e[1]):
        rows.append([name, _seconds(at), "+" + _seconds(at - previous)])
        previous = at
    return rows


RESOURCE_COLUMNS = ("host", "role", "machine", "CPU peak / mean", "run CPU peak / mean", "memory peak",
                    "run RSS peak", "network in / out", "disk read / written", "sampler CPU")


def _resource_rows(record: RunRecord) -> list[list[str]]:
    rows = []
    for host, s in record.resources["hosts"].items():
        rows.append([host, _role_of(record, host), machine(s), f"{s['cpu_peak_pct']:g}% / {s['cpu_mean_pct']:g}%",
                     f"{s['run_cpu_peak_pct']:g}% / {s['run_cpu_mean_pct']:g}%", _bytes(s["mem_peak_bytes"]),
                     _bytes(s["run_rss_peak_bytes"]), f"{_bytes(s['net_rx_bytes'])} / {_bytes(s['net_tx_bytes'])}",
                     f"{_bytes(s['disk_read_bytes'])} / {_bytes(s['disk_write_bytes'])}",
                     f"{s['sampler_cpu_pct']:g}%"])
    return rows


# -- exp.compare ---------------------------------------------------------------------

CHANGED = "≠"
# (label, run.json summary key(s), format): what compare shows of each host's resources.
COMPARED = (("CPU mean", ("cpu_mean_pct",), "pct"), ("CPU peak", ("cpu_peak_pct",), "pct"),
            ("run CPU mean", ("run_cpu_mean_pct",), "pct"), ("memory peak", ("mem_peak_bytes",), "bytes"),
            ("run RSS peak", ("run_rss_peak_bytes",), "bytes"),
            ("network in+out", ("net_rx_bytes", "net_tx_bytes"), "bytes"),
            ("disk read+written", ("disk_read_bytes", "disk_write_bytes"), "bytes"))
FORMATS = {"pct": lambda v: f"{v:g}%", "bytes": _bytes, "seconds": _seconds, "value": str}


def _text_row(name: str, a: str, b: str) -> list[str]:
    return [name, a, b, "" if a == b else CHANGED]


def _value_row(name: str, a: Any, b: Any, kind: str) -> list[str]:
    """Numbers get B's change relative to A; anything else is the same or not."""
    show = FORMATS[kind]
    cells = [name, MISSING if a is None else show(a), MISSING if b is None else show(b)]
    if a == b:
        return [*cells, ""]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return [*cells, f"{(b - a) / abs(a):+.0%}" if numbers and a else CHANGED]


def _machines(record: RunRecord) -> tuple[str, str]:
    """The master's machine and the workers' kinds (not their count: k says that), from the resource summary."""
    hosts = record.resources.get("hosts", {})
    master = machine(hosts[record.hosts.master]) if record.hosts.master in hosts else MISSING
    kinds = sorted({machine(hosts[w]) for w in record.hosts.workers if w in hosts})
    return master, ", ".join(kinds) or MISSING


def _summaries(record: RunRecord) -> dict[str, dict[str, Any]]:
    """Resource summaries by the host's place in the run (master, worker1, ...), so that runs on
    different hosts line up."""
    return {_role_of(record, host): summary for host, summary in record.resources.get("hosts", {}).items()}


def compare(a: RunRecord, b: RunRecord) -> tuple[list[Section], list[str]]:
    """The two runs side by side, and the names of the parameters (and machines, status) that differ."""
    columns = ("", a.run_id, b.run_id, "difference")
    pa, pb = parameters(a), parameters(b)
    (master_a, workers_a), (master_b, workers_b) = _machines(a), _machines(b)
    run = [_text_row(key, pa[key], pb[key]) for key in pa]
    run += [_text_row("master machine", master_a, master_b), _text_row("worker machines", workers_a, workers_b),
            _text_row("status", a.status, b.status), _value_row("metric", a.metric, b.metric, "value")]
    da, db = durations(a), durations(b)
    times = [_value_row(name, da.get(name), db.get(name), "seconds") for name in dict.fromkeys([*da, *db])]
    sa, sb = _summaries(a), _summaries(b)
    used = [_value_row(f"{place}: {label}", _total(sa.get(place), keys), _total(sb.get(place), keys), kind)
            for place in dict.fromkeys([*sa, *sb]) for label, keys, kind in COMPARED]
    sections = [("runs", columns, run), ("durations", columns, times)]
    if used:
        sections.append(("resources", columns, used))
    return sections, [row[0] for row in run if row[3] == CHANGED]


def _total(summary: dict[str, Any] | None, keys: tuple[str, ...]) -> float | None:
    return None if summary is None else sum(summary[key] for key in keys)
