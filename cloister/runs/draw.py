"""resources.png: a run's samples drawn for a person, off the run's critical path.

Drawing (matplotlib's import and rendering) takes about a second and a half, longer than a short run
itself, so a run does not wait for it: once run.json is written, ``in_background`` starts a detached
process at the lowest CPU priority (``python -m cloister.runs.draw FOLDER``) that draws the figure
from resources.csv and run.json, and outlives the ``inv`` that started it. Drawers of one runs
folder take turns (a lock), so a sweep's runs never render at once. ``exp.show`` draws a figure that
is missing (a drawer that never ran, or the machine went down).
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import subprocess
import sys
from pathlib import Path

from ..files import atomic_write
from .record import RunRecord
from .resources import CSV_FILE, PNG_FILE, Row, phase_times

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = ".drawing.lock"  # in the runs folder: one drawer at a time
MIB = 1024 * 1024
# (metric, panel title, divisor); "cpu*" is every core of every host in one panel.
PANELS = (("cpu_pct", "CPU, whole host (%)", 1), ("cpu*", "CPU per core (%)", 1),
          ("run_cpu_pct", "run's processes: CPU (% of one core)", 1), ("mem_used_bytes", "memory used (MiB)", MIB),
          ("run_rss_bytes", "run's processes: RSS (MiB)", MIB), ("net_rx_bytes_s", "network in (MiB/s)", MIB),
          ("net_tx_bytes_s", "network out (MiB/s)", MIB), ("disk_read_bytes_s", "disk read (MiB/s)", MIB),
          ("disk_write_bytes_s", "disk written (MiB/s)", MIB))
PHASE_STYLES = ("--", "-.", ":", "-")
FEW_POINTS = 30  # a line with fewer points shows each as a dot: a short run's single samples stay visible


def in_background(folder: Path) -> None:
    """Draw ``folder``'s resources.png in a detached process that outlives this one; returns at once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.Popen([sys.executable, "-m", "cloister.runs.draw", str(folder)], env=env, cwd=str(folder),
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def draw(folder: Path) -> Path | None:
    """Draw ``folder``/resources.png from its resources.csv and run.json; None when the run has no samples."""
    csv_path = folder / CSV_FILE
    if not csv_path.is_file():
        return None
    record = RunRecord.read(folder)
    series = read_csv(csv_path)
    end = record.timings.get("total_s")
    return plot(folder / PNG_FILE, series=series, phases=phase_times(record.timings), end=end,
                title=f"{record.benchmark} run {record.run_id} (k={record.k}, p={record.p})")


def read_csv(path: Path) -> dict[str, list[Row]]:
    """resources.csv back as host -> rows; a row that does not parse is skipped (the figure is a view)."""
    series: dict[str, list[Row]] = {}
    with open(path, newline="") as src:
        for row in csv.DictReader(src):
            try:
                series.setdefault(row["host"], []).append((float(row["time"]), row["metric"], float(row["value"])))
            except (KeyError, TypeError, ValueError):
                continue
    return series


def _panel_lines(series: dict[str, list[Row]], metric: str) -> dict[tuple[str, str], tuple[list, list]]:
    """(host, metric) -> (times, values) of the rows that belong to one panel."""
    lines: dict[tuple[str, str], tuple[list, list]] = {}
    for host, rows in series.items():
        for t, name, value in rows:
            per_core = metric == "cpu*" and name[3:-4].isdigit() and name.startswith("cpu")
            if name == metric or per_core:
                times, values = lines.setdefault((host, name), ([], []))
                times.append(t)
                values.append(value)
    return lines


def panels(series: dict[str, list[Row]]) -> tuple[list[tuple[str, str, float, dict]], list[str]]:
    """The panels to draw (metric, title, divisor, lines), and the names of the metrics that were
    sampled but stayed at zero on every host (no panel of their own)."""
    drawn, flat = [], []
    for metric, label, divisor in PANELS:
        lines = _panel_lines(series, metric)
        if any(value for _, values in lines.values() for value in values):
            drawn.append((metric, label, divisor, lines))
        elif lines:
            flat.append(label.split(" (")[0])
    return drawn, flat


def plot(path: Path, *, series: dict[str, list[Row]], phases: list[tuple[str, float]], title: str,
         end: float | None = None) -> Path:
    """One panel per metric that moved, one colour per host, the run's phases as vertical lines; the
    metrics that stayed at zero are named under the title instead of drawn as empty panels."""
    # The object API without pyplot, and a fixed layout instead of tight_layout: half the time.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn, flat = panels(series)
    rows = max(1, -(-(len(drawn) + 1) // 2))
    fig = Figure(figsize=(12, max(6.0, 2.6 * rows + 1.2)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.9 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        hspace=0.45, wspace=0.15)
    colours = {host: f"C{i % 10}" for i, host in enumerate(series)}
    right = max([end or 0.0, *(at for _, at in phases), *(t for rows_ in series.values() for t, _, _ in rows_)])
    for ax, (metric, label, divisor, lines) in zip(axes.flat, drawn):
        _panel(ax, label=label, lines=lines, divisor=divisor, colours=colours, phases=phases, right=right,
               faint=metric == "cpu*")
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    _legend(axes.flat[len(drawn)], hosts=list(series), colours=colours, phases=phases)
    fig.suptitle(title + ("\nstayed at zero: " + ", ".join(flat) if flat else ""), fontsize=11)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=72)
    return atomic_write(path, image.getvalue())


def _panel(ax, *, label: str, lines: dict, divisor: float, colours: dict[str, str],
           phases: list[tuple[str, float]], right: float, faint: bool) -> None:
    top = 0.0
    for (host, _), (times, values) in lines.items():
        scaled = [v / divisor for v in values]
        ax.plot(times, scaled, color=colours[host], linewidth=1, alpha=0.5 if faint else 0.9,
                marker="o" if len(times) < FEW_POINTS else None, markersize=3)
        top = max([top, *scaled])
    for (_, at), style in zip(phases, PHASE_STYLES):
        ax.axvline(at, color="0.4", linestyle=style, linewidth=0.9)
    ax.set_title(label, fontsize=9)
    # The whole run on every panel, whatever its samples cover, so the phases line up.
    ax.set_xlim(0, right * 1.02 or 1)
    # From zero, with room above the highest value: a flat line must not hide in the frame.
    ax.set_ylim(0, top * 1.1 or 1)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("seconds since the run started", fontsize=8)


def _legend(ax, *, hosts: list[str], colours: dict[str, str], phases: list[tuple[str, float]]) -> None:
    from matplotlib.lines import Line2D

    ax.axis("off")
    handles = [Line2D([], [], color=colours[h], label=h) for h in hosts]
    handles += [Line2D([], [], color="0.4", linestyle=s, label=f"{name} ({at:.1f}s)")
                for (name, at), s in zip(phases, PHASE_STYLES)]
    ax.legend(handles=handles, loc="center", fontsize=8, frameon=False)


def ensure(folder: Path) -> Path | None:
    """``folder``'s resources.png, drawn now unless it exists (after any drawer of its runs folder has
    finished, so a figure being drawn is waited for, not drawn twice); None when the run has no samples."""
    figure = folder / PNG_FILE
    if figure.is_file():
        return figure
    with open(folder.parent.parent / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return figure if figure.is_file() else draw(folder)


def main(folders: list[str]) -> int:
    """Draw each folder's figure, at the lowest CPU priority: the next run may already need the CPU."""
    try:
        os.nice(19)
    except OSError:
        pass
    for folder in map(Path, folders):
        try:
            ensure(folder)
        except Exception:  # noqa: BLE001 - nobody waits for this process; exp.show draws it again
            continue
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
