"""Ending a run in flight from outside its own session (exp.killall, cluster.destroy, a resumed sweep),
and completing the record of a run whose session died (exp.logs): each leaves a run.json that says how
the run ended."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fabric import Connection

from ..cluster.servers import ClusterInfo
from ..errors import CloisterError, HostsFailed, RunFollowed
from ..settings import Settings
from ..transport import hosts
from .conclusion import FINAL
from .detached import ENDED_FILE, STATE_FILE, InFlight, RunState, in_flight, spec_of
from .experiments import Registry, load_registry
from .kill import end_run
from .logs import download_run
from .orchestration import Run
from .record import RunRecord


def end_in_flight(state: RunState, *, info: ClusterInfo, registry: Registry, settings: Settings, status: str,
                  error: str, by: str, connections: dict[str, Connection] | None = None) -> RunRecord | None:
    """End the run in flight ``state``. If a live session follows it, kill its processes marked as killed by
    ``by`` and leave the record to that session (None); otherwise (nobody, or a session that no longer
    answers) take it over, kill, collect and record it as ``status`` with ``error`` (unless its master had
    ended by itself, or an earlier session's verdict is on the master): its record."""
    spec = spec_of(state, info=info, registry=registry, settings=settings)
    try:
        return Run(spec, connections=connections).end(state, status=status, error=error)
    except RunFollowed:
        pass
    grp = (hosts.group(info, [spec.master, *spec.workers], concurrency=settings.concurrency, connect_timeout=settings.connect_timeout)
           if connections is None else hosts.CappedGroup.of([connections[n.host] for n in [spec.master, *spec.workers]],
                                                            concurrency=settings.concurrency))
    try:
        failed = end_run(grp, bench=spec.bench, run_id=state.run_id, by=by)
    finally:
        if connections is None:
            grp.close()
    if failed:
        raise HostsFailed(failed, total=len([spec.master, *spec.workers]), what="kill")
    return None


@dataclass(frozen=True)
class Collected:
    """What exp.logs did: per-host errors, the hosts that had the run, its record if exp.logs wrote or
    completed it, and the run's entry if it is still in flight."""

    errors: dict[str, str]
    had: list[str]
    record: RunRecord | None
    running: InFlight | None


def collect(grp: hosts.CappedGroup, *, master: str, info: ClusterInfo, registry: Registry, settings: Settings,
            benchmark: str, run_id: str, local_dir: Path) -> Collected:
    """exp.logs: download run ``run_id`` from every host of ``grp`` into ``local_dir``. A run whose session
    died while ending it (its verdict on the master, no live session) is ended; a run that has concluded
    but whose run.json here is missing or not final gets it completed from what its hosts kept."""
    cxn = next(c for c in grp if c.host == master)
    entry = next(iter(in_flight(cxn, run_id=run_id)), None)
    if entry and entry.concluding and entry.followed != "yes":
        record = end_in_flight(entry.state, info=info, registry=registry, settings=settings, status="incomplete",
                               error="its session ended while ending it; completed by exp.logs", by="exp.logs",
                               connections={c.host: c for c in grp})
        if record:
            return Collected({}, [], record, None)
    errors, had = download_run(grp, benchmark=benchmark, run_id=run_id, local_dir=local_dir)
    if entry:
        return Collected(errors, had, None, entry)
    return Collected(errors, had, _complete(local_dir, info=info, registry=registry, settings=settings,
                                            connections={c.host: c for c in grp}), None)


def _complete(local_dir: Path, *, info: ClusterInfo, registry: Registry, settings: Settings,
              connections: dict[str, Connection]) -> RunRecord | None:
    """The record of a concluded run, from its downloaded folder, if run.json here is missing or not final."""
    try:
        if RunRecord.read(local_dir).status in FINAL:
            return None
    except (OSError, ValueError):
        pass
    folders = sorted(p for p in local_dir.iterdir() if p.is_dir()) if local_dir.is_dir() else []
    for path in (folder / name for folder in folders for name in (ENDED_FILE, STATE_FILE)):
        try:
            state = RunState.from_json(path.read_text())
        except (OSError, ValueError):
            continue
        spec = spec_of(state, info=info, registry=registry, settings=settings)
        return Run(spec, connections=connections).complete(state)
    return None


def runs_in_flight(info: ClusterInfo, *, settings: Settings) -> list[RunState]:
    """The runs in flight on the cluster ``info``; none when its master cannot be asked."""
    if info.master is None:
        return []
    try:
        with hosts.connection(info, info.master, connect_timeout=min(settings.connect_timeout, 5.0)) as cxn:
            return [entry.state for entry in in_flight(cxn)]
    except Exception:  # noqa: BLE001 - a master that does not answer has no run to collect
        return []


def end_before_destroy(states: list[RunState], *, info: ClusterInfo, settings: Settings) -> dict[str, str]:
    """End each run of ``states`` as killed by cluster.destroy, its logs collected and run.json written before
    the nodes go; "BENCHMARK run ID" -> its status, or why it could not be collected."""
    done: dict[str, str] = {}
    for state in states:
        name = f"{state.benchmark} run {state.run_id}"
        try:
            record = end_in_flight(state, info=info, registry=load_registry(settings.experiments), settings=settings,
                                   status="killed", error="killed by cluster.destroy", by="cluster.destroy")
            done[name] = record.status if record else "killed (the session that follows it records it)"
        except CloisterError as err:
            done[name] = f"not collected: {err}"
    return done
