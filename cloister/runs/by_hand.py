"""One role of a run started by hand (exp.manager, exp.workers, exp.master) and left running."""

from __future__ import annotations

from ..errors import ExperimentError
from .kill import kill_run
from .logs import download_run
from .orchestration import Run
from .record import Proc, merge_by_hand


def start_by_hand(run: Run, role: str) -> list[Proc]:
    """Start one role ("manager", "workers" or "master") of ``run`` and leave it running.

    Whatever happens, the logs so far are fetched and this call's processes are added to run.json, so
    the run is listed and is the latest one for exp.logs and exp.clean.
    """
    command = role.removesuffix("s")
    if not run.bench.has(command):
        run.close()
        raise ExperimentError(f"benchmark '{run.bench.name}' has no {role} (commands.{command} is null in "
                              f"{run.bench.source})", benchmark=run.bench.name)
    start = {"manager": lambda: [run.start_manager()], "workers": run.start_workers,
             "master": lambda: [run.follow_master(run.start_master(), timeout=run.spec.master_timeout)]}[role]
    try:
        return start()
    except BaseException:
        started = sorted({p.host for p in run.procs if p.pid})
        if started:
            run.mark_killed(set(kill_run(run.group_of(started), bench=run.bench, run_id=run.run_id)))
        raise
    finally:
        download_run(run.group, benchmark=run.bench.name, run_id=run.run_id, local_dir=run.local_dir)
        run.close()
        run.local_dir.mkdir(parents=True, exist_ok=True)
        merge_by_hand(run.record("started by hand", None, {}), run.local_dir).write(run.local_dir)
