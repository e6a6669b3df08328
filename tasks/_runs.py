"""How exp.* tasks show a run: its summary table and conclusion, the past runs, a sweep's progress."""

from __future__ import annotations

import re

from invoke import Exit

from cloister import runs as runlib
from cloister.runs import sweep as sweeplib

from ._output import table

HOSTS_FAILED_LINE = re.compile(r"\d+/\d+ hosts failed$")  # HostsFailed's count, said again by the summary


def summary(record: runlib.RunRecord) -> None:
    """A table of the run's roles per host: processes, statuses, exit codes."""
    groups: dict[tuple[str, str], list[runlib.Proc]] = {}
    for proc in record.roles:
        groups.setdefault((proc.role, proc.host), []).append(proc)
    rows = [[role, host, len(procs), ",".join(sorted({p.status for p in procs})),
             ",".join(sorted({str(p.exit) for p in procs if p.exit is not None})) or "-"]
            for (role, host), procs in groups.items()]
    table(f"{record.benchmark} run {record.run_id}: {record.status}",
          ("role", "host", "processes", "status", "exit codes"), rows)


def failure(record: runlib.RunRecord) -> str:
    """Why the run did not succeed: a line per failed host, then the run's status."""
    lines = [f"[{host}] {err}" for host, err in record.failures.items()]
    # The error's own lines where the failures do not already say them (a timeout, a start-up crash).
    lines += [line for line in (record.error or "").splitlines()
              if not any(shown.startswith(line) for shown in lines) and not HOSTS_FAILED_LINE.search(line)]
    # A start-up crash or a timeout is in the error line, not in failures: no "0/N hosts failed".
    failed = f": {len(record.failures)}/{1 + record.k} hosts failed" if record.failures else ""
    lines.append(f"run {record.run_id} {record.status}{failed}")
    return "\n".join(lines)


def conclusion(record: runlib.RunRecord, spec: runlib.RunSpec) -> None:
    """The run's summary and where its logs are; Exit(1) naming what failed unless it is ok."""
    summary(record)
    print(f"logs: {spec.local_dir}/ (run.json, one folder per host)")
    if record.metric is not None:
        print(f"{spec.bench.metric_name}: {record.metric}")
    if not record.ok:
        raise Exit(failure(record), code=1)


def runs_table(runs_dir: str, past: list[runlib.RunRecord]) -> None:
    """The past runs in ``runs_dir``."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title=f"past runs ({runs_dir}/)")
    for column in ("benchmark", "run id", "k", "p", "status", "duration", "metric"):
        # A run id is copied into --run: never cut it.
        out.add_column(column, no_wrap=column == "run id", min_width=20 if column == "run id" else None,
                       overflow="fold")
    for r in past:
        out.add_row(r.benchmark, r.run_id, str(r.k), str(r.p), r.status,
                    "-" if r.total_s is None else f"{r.total_s:.1f}s", "-" if r.metric is None else str(r.metric))
    Console().print(out)


def sweep_with_progress(sweep_name, *, state, all_combos, **options) -> list[dict[str, str]]:
    """``sweeplib.run_sweep`` under a progress bar with an ETA; Ctrl-C says how to resume."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(f"sweep {sweep_name}", total=len(all_combos))

        def on_progress(done, total, combo):
            progress.update(bar, completed=done,
                            description=f"sweep {sweep_name}: " + (combo.key if combo else "done"))

        try:
            return sweeplib.run_sweep(state=state, all_combos=all_combos, on_progress=on_progress, **options)
        except KeyboardInterrupt:
            raise Exit(f"interrupted: {len(state.rows)}/{len(all_combos)} runs of sweep {sweep_name} recorded; "
                       f"the same command resumes it", code=130)
