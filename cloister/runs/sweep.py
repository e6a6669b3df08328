"""exp.sweep: a grid of runs over k, p and argument values, resumable, with a CSV and a plot.

State lives in ``runs/sweeps/{name}/``: ``state.json`` (the grid and the run in
progress), ``results.csv`` (one row per finished combination, rewritten
atomically) and ``plot.png``. A combination is only recorded once its run has
ended, so a sweep killed mid-run redoes that combination when started again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CloisterError, ExperimentError
from ..files import NotASmallFile, atomic_write, read_small
from .record import RUN_ID_RE, RunRecord, new_run_id
from .resources import SWEEP_FIELDS, sweep_columns

LOST = "lost-node"  # a run that failed because a node of it is gone; its combination is run again
METRIC = "metric"  # the metric's column when its regex does not name it (time_s=(?P<time_s>...) does)


def fields(metric: str = METRIC) -> tuple[str, ...]:
    """results.csv's columns: ``attempt`` counts the runs of one combination, ``note`` says why one was lost
    or repeated, the resource columns summarise each run's hosts (resources.sweep_columns), and ``error``
    says why a run failed."""
    return ("k", "p", "args", "repeat", "run_id", "status", "duration_s", metric, "attempt", "note", *SWEEP_FIELDS,
            "error")


def parse_int_list(text: str | int, *, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each a positive integer."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ExperimentError(f"{flag} {text!r}: expected comma-separated positive integers such as 1,2,4")
        values.append(int(part))
    return sorted(set(values))


def parse_args_grid(items: list[str]) -> dict[str, list[str]]:
    """['-n=10,20', 'mode=a,b'] -> {'-n': ['10', '20'], '--mode': ['a', 'b']}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values or not re.fullmatch(r"-{0,2}[A-Za-z0-9][A-Za-z0-9_.-]*", key):
            raise ExperimentError(f"--args-grid {item!r}: expected FLAG=v1,v2 such as -n=1000,2000 or size=1,2")
        flag = key if key.startswith("-") else f"--{key}"
        grid[flag] = [v for v in values.split(",") if v != ""]
    return grid


@dataclass(frozen=True)
class Combo:
    k: int
    p: int
    args: tuple[str, ...]
    repeat: int

    @property
    def key(self) -> str:
        return f"k={self.k} p={self.p} args={' '.join(self.args)} repeat={self.repeat}"


def combos(*, ks: list[int], ps: list[int], grid: dict[str, list[str]], repeat: int) -> list[Combo]:
    arg_sets: list[tuple[str, ...]] = [()]
    if grid:
        arg_sets = [tuple(itertools.chain.from_iterable((flag, value) for flag, value in zip(grid, values)))
                    for values in itertools.product(*grid.values())]
    return [Combo(k=k, p=p, args=a, repeat=r) for k in ks for p in ps for a in arg_sets for r in range(1, repeat + 1)]


def resume_command(*, spec: dict[str, Any], name: str, repeat: int, config: str | None, timeout: float | None,
                   manager: bool = True) -> str:
    """The commands that repair the cluster and resume this sweep where it stopped (with its flags)."""
    common = f" --config {shlex.quote(config)}" if config else ""
    grid = "".join(f" --args-grid {shlex.quote(flag + '=' + ','.join(values))}" for flag, values in spec["grid"].items())
    return (f"inv cluster.repair{common} && inv exp.sweep{common} --benchmark {shlex.quote(spec['benchmark'])} "
            f"-k {','.join(map(str, spec['k']))} -p {','.join(map(str, spec['p']))}{grid} --repeat {repeat} "
            f"--name {shlex.quote(name)}" + (f" --timeout {timeout:g}" if timeout else "")
            + ("" if manager else " --no-manager") + " --repair")


def default_name(benchmark: str, spec: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"{benchmark}-{digest}"


class SweepState:
    """The on-disk state of one sweep; ``spec`` is its grid (benchmark, k, p, args), not its repeat
    count, so running it again with a larger --repeat adds runs to the same sweep. ``metric`` names the
    metric's column (the benchmark's metric_name)."""

    def __init__(self, directory: Path, spec: dict[str, Any], *, metric: str = METRIC):
        self.dir = directory
        self.spec = spec
        # A metric named like another column (status, k) keeps the plain name.
        self.metric = METRIC if metric in fields() else metric
        self.state_path = directory / "state.json"
        self.csv_path = directory / "results.csv"
        self.plot_path = directory / "plot.png"
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        if state and state.get("spec") != spec:
            raise ExperimentError(f"{self.state_path}: sweep '{directory.name}' was started with another grid; "
                                  f"use another --name or remove {directory}")
        self.current: dict[str, str] | None = state.get("current") if state else None
        self.rows = self._read_rows()

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(read_small(self.state_path))
        except FileNotFoundError:
            return None
        except (OSError, NotASmallFile, UnicodeDecodeError) as err:
            raise self._bad(self.state_path, f"unreadable ({getattr(err, 'strerror', None) or err})")
        except json.JSONDecodeError as err:
            raise self._bad(self.state_path, f"unreadable ({err.msg} at line {err.lineno})")
        if not isinstance(state, dict) or not isinstance(state.get("spec"), dict):
            raise self._bad(self.state_path, "key 'spec': expected the sweep's grid (an object)")
        current = state.get("current")
        if current is not None and not (isinstance(current, dict) and isinstance(current.get("key"), str)
                                        and isinstance(current.get("run_id"), str)
                                        and RUN_ID_RE.fullmatch(current["run_id"])):
            raise self._bad(self.state_path, 'key \'current\': expected null or {"key": "k=... p=...", '
                                             '"run_id": "YYYYMMDD-HHMMSS-xxxx"}')
        return state

    def _read_rows(self) -> list[dict[str, str]]:
        try:
            text = read_small(self.csv_path, limit=RESULTS_LIMIT)
        except FileNotFoundError:
            return []
        except (OSError, NotASmallFile, UnicodeDecodeError) as err:
            raise self._bad(self.csv_path, f"unreadable ({getattr(err, 'strerror', None) or err})")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return []
        # A results.csv written before the metric's column was named after the metric calls it "metric".
        header = [self.metric if name == METRIC else name for name in header]
        columns = fields(self.metric)
        # Older sweeps wrote fewer columns (no resources, no error): any header that names the columns read here.
        if len(set(header)) != len(header) or not set(columns[:8]) <= set(header) <= set(columns):
            raise self._bad(self.csv_path, f"line 1: expected the header {','.join(columns)}")
        rows = []
        for values in reader:
            row = dict(zip(header, values))
            if problem := _row_problem(values, header=header, row=row):
                raise self._bad(self.csv_path, f"line {reader.line_num}: {problem}")
            rows.append({name: row.get(name, "") for name in columns})
        return rows

    def _bad(self, path: Path, what: str) -> ExperimentError:
        return ExperimentError(f"{path}: {what}; fix it, or remove {self.dir} to start the sweep over")

    def drop_failed(self) -> int:
        """Forget the combinations that did not succeed, so that they run again; return how many."""
        kept = [r for r in self.rows if r["status"] == "ok"]
        dropped = len(self.rows) - len(kept)
        if dropped:
            self.rows = kept
            self._write_rows()
        return dropped

    def done(self) -> set[str]:
        return {f"k={r['k']} p={r['p']} args={r['args']} repeat={r['repeat']}" for r in self.rows
                if r["status"] != LOST}

    def repeated(self) -> list[dict[str, str]]:
        """The rows of runs that repeated a run which lost a node."""
        return [r for r in self.rows if r.get("attempt") not in (None, "", "1") and r["status"] != LOST]

    def begin(self, combo: Combo, run_id: str) -> None:
        self.current = {"key": combo.key, "run_id": run_id}
        self._save()

    def finish(self, combo: Combo, record: RunRecord, *, status: str | None = None, attempt: int = 1,
               note: str = "") -> None:
        total = record.total_s
        self.rows.append({"k": str(combo.k), "p": str(combo.p), "args": " ".join(combo.args),
                          "repeat": str(combo.repeat), "run_id": record.run_id, "status": status or record.status,
                          "duration_s": "" if total is None else f"{total:.4f}",
                          self.metric: "" if record.metric is None else str(record.metric),
                          "attempt": str(attempt), "note": note, **sweep_columns(record.resources),
                          "error": (record.error or "").strip().splitlines()[0] if record.error else ""})
        self._write_rows()
        self.current = None
        self._save()

    def _write_rows(self) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields(self.metric), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.csv_path, out.getvalue())

    def _save(self) -> None:
        atomic_write(self.state_path, json.dumps({"spec": self.spec, "current": self.current}, indent=2) + "\n")


RESULTS_LIMIT = 64 << 20  # bytes of results.csv: some hundred thousand runs
STATUS_RE = re.compile(r"[a-z][a-z -]*")  # ok, failed, timeout, interrupted, ...
NUMBER_FIELDS = ("duration_s", *SWEEP_FIELDS)


def _row_problem(values: list[str], *, header: list[str], row: dict[str, str]) -> str | None:
    """What is wrong with one results.csv row (a line of garbage, a row cut mid-write), or None."""
    if len(values) != len(header):
        return f"{len(values)} fields where the header has {len(header)} (a row cut short, or not a row)"
    for name in ("k", "p", "repeat", "attempt"):
        if (name != "attempt" or row.get(name)) and not (row[name].isdigit() and int(row[name]) > 0):
            return f"column {name}: expected a positive integer, got {row[name]!r}"
    if not RUN_ID_RE.fullmatch(row["run_id"]):
        return f"column run_id: expected YYYYMMDD-HHMMSS-xxxx, got {row['run_id']!r}"
    if not STATUS_RE.fullmatch(row["status"]):
        return f"column status: expected a run's status such as ok or failed, got {row['status']!r}"
    for name in NUMBER_FIELDS:
        if row.get(name) and not _is_number(row[name]):
            return f"column {name}: expected a number, got {row[name]!r}"
    return None


def pending(state: SweepState, all_combos: list[Combo]) -> Iterator[Combo]:
    done = state.done()
    return (c for c in all_combos if c.key not in done)


def plot(state: SweepState, *, benchmark: str, metric_name: str | None) -> Path | None:
    """metric (or duration) against k, one line per p (and argument set), mean with min-max bars."""
    ok = [r for r in state.rows if r["status"] == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_metric = metric_name is not None and all(_is_number(r.get(state.metric)) for r in ok)
    column = state.metric if use_metric else "duration_s"
    series: dict[str, dict[int, list[float]]] = {}
    for row in ok:
        label = f"p={row['p']}" + (f" {row['args']}" if row["args"] else "")
        series.setdefault(label, {}).setdefault(int(row["k"]), []).append(float(row[column]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        ks = sorted(points)
        means = [sum(points[k]) / len(points[k]) for k in ks]
        lows = [m - min(points[k]) for m, k in zip(means, ks)]
        highs = [max(points[k]) - m for m, k in zip(means, ks)]
        ax.errorbar(ks, means, yerr=[lows, highs], marker="o", capsize=4, label=label)
    ax.set_xlabel("k (worker hosts)")
    ax.set_ylabel(metric_name if use_metric else "run duration (s)")
    ax.set_title(f"{benchmark}: sweep {state.dir.name}")
    ax.set_xticks(sorted({int(r["k"]) for r in ok}))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(state.plot_path, image.getvalue())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def summary(state: SweepState, *, image: Path | None) -> tuple[list[str], str | None]:
    """Lines for people at the end of a sweep (where the results are, which runs were repeated and why),
    and the failure line if a combination did not succeed."""
    rows = state.rows
    lines = [f"{len(rows)} runs in {state.csv_path}" + (f"; plot {image}" if image else "")]
    lines += [f"repeated: k={r['k']} p={r['p']} args={r['args']} repeat={r['repeat']} as run {r['run_id']} "
              f"({r['status']}): {r['note']}" for r in state.repeated()]
    failed = [r for r in rows if r["status"] not in ("ok", LOST)]
    if not failed:
        return lines, None
    return lines, (f"{len(failed)}/{len(rows)} runs failed:\n" + "\n".join(
        f"k={r['k']} p={r['p']}{' ' + r['args'] if r['args'] else ''} run {r['run_id']} {r['status']}: "
        f"{r.get('error') or 'no reason recorded'}" for r in failed[:5]))


def expected_seconds(state: SweepState) -> float:
    """How long the next run will take: the mean of the recorded runs' durations (0 before the first)."""
    durations = [float(r["duration_s"]) for r in state.rows if r.get("duration_s")]
    return sum(durations) / len(durations) if durations else 0.0


@dataclass(frozen=True)
class Healing:
    """What a sweep does when a run fails because a node of it is gone.

    ``lost(record)`` names the run's nodes the provider no longer runs, each with why ([]: none);
    ``repair()`` replaces them (None: the sweep stops there and says ``resume``, the exact commands to
    repair and go on); at most ``limit`` repairs per sweep.
    """

    lost: Callable[[RunRecord], list[str]]
    repair: Callable[[], None] | None
    limit: int
    resume: str


def run_sweep(*, state: SweepState, all_combos: list[Combo], run_one: Callable[[Combo, str], RunRecord],
              cleanup_interrupted: Callable[[str], None], fail_fast: bool,
              on_progress: Callable[[int, int, Combo | None], None] | None = None,
              refuse: Callable[[float], str | None] | None = None,
              healing: Healing | None = None) -> list[dict[str, str]]:
    """Run every pending combination in order; record each when its run has ended.

    ``refuse`` is asked before each run, with the run's expected seconds (the mean of the runs so far),
    why it must not start (a budget it would cross); the sweep then stops, resumable. A run that fails
    because a node is gone is recorded as ``lost-node`` and, with ``healing.repair``, run again once the
    cluster is repaired.
    """
    if state.current:
        # A previous sweep process died mid-run: its processes may still hold ports.
        cleanup_interrupted(state.current["run_id"])
        state.current = None
    todo = list(pending(state, all_combos))
    finished = len(all_combos) - len(todo)
    repairs = 0
    for combo in todo:
        attempt, note = 1, ""
        while True:
            reason = refuse(expected_seconds(state)) if refuse else None
            if reason:
                raise ExperimentError(f"{reason}; stopped before {combo.key} ({finished}/{len(all_combos)} runs "
                                      f"recorded; the same command resumes it)")
            if on_progress:
                on_progress(finished, len(all_combos), combo)
            run_id = new_run_id()
            state.begin(combo, run_id)
            record = run_one(combo, run_id)
            gone = healing.lost(record) if healing is not None and not record.ok else []
            if not gone:
                state.finish(combo, record, attempt=attempt, note=note)
                break
            state.finish(combo, record, status=LOST, attempt=attempt, note="lost " + "; ".join(gone))
            _heal(healing, combo=combo, record=record, gone=gone, repairs=repairs)
            repairs += 1
            attempt, note = attempt + 1, f"repeats run {record.run_id}, which lost " + "; ".join(gone)
        finished += 1
        if fail_fast and not record.ok:
            why = (record.error or "").strip().splitlines()[:1]
            raise ExperimentError(f"{combo.key}: run {record.run_id} {record.status}"
                                  f"{': ' + why[0] if why else ''}; stopped (--fail-fast)", run_id=record.run_id)
    if on_progress:
        on_progress(finished, len(all_combos), None)
    return state.rows


def _heal(healing: Healing, *, combo: Combo, record: RunRecord, gone: list[str], repairs: int) -> None:
    """Repair the cluster for the run that lost ``gone``, or stop the sweep saying how to go on."""
    lost = f"{combo.key}: run {record.run_id} lost {'; '.join(gone)}"
    if healing.repair is None:
        raise ExperimentError(f"{lost}\nstopped; repair the cluster and resume the sweep with:\n  {healing.resume}",
                              run_id=record.run_id)
    if repairs >= healing.limit:
        raise ExperimentError(f"{lost}\nstopped: the sweep already repaired the cluster {repairs} times "
                              f"(--repair-limit); resume it with:\n  {healing.resume}", run_id=record.run_id)
    try:
        healing.repair()
    except CloisterError as err:
        raise ExperimentError(f"{lost}\nstopped: the repair failed: {err}\nonce that is fixed, resume the sweep "
                              f"with:\n  {healing.resume}", run_id=record.run_id) from err
