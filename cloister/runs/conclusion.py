"""How a run ended, as its hosts' files tell: the verdict of the first session that began to end it, the
mark of an exp.killall, the master's own exit time, the processes' pids; what a conclusion reads back
from the run's downloaded folder to write a record that tells the truth, whoever finishes the run.

Remote files (in the run's folder): ``outcome.json`` on the master, written by the first session that
ends the run before it kills anything (so a session that dies during the log download leaves its verdict
for whoever completes the record), and ``killed`` (who killed the run, e.g. ``exp.killall --run``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..layout import run_dir
from .record import Proc
from .scripts import Probe, parse_probe

OUTCOME_FILE = "outcome.json"
KILLED_FILE = "killed"
MASTER_KILLED = "master ended without an exit code"
FINAL_STATE = "final-state"  # the processes' states when the master had ended, before the kill
# Statuses that say how a run ended; "running" and "incomplete" (its session could not finish the record)
# are completed by exp.logs from what the hosts kept.
FINAL = ("ok", "failed", "timeout", "interrupted", "killed", "started by hand")


@dataclass(frozen=True)
class Outcome:
    """What the session that began to end a run knew before it killed anything. ``completed``: the master
    had ended by itself (the processes' final states then decide between ok and failed); None: undecided,
    the master's exit file decides."""

    status: str
    error: str | None
    failures: dict[str, str] = field(default_factory=dict)
    completed: bool | None = None

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "error": self.error, "failures": self.failures,
                           "completed": self.completed})

    @classmethod
    def read(cls, path: Path) -> Outcome | None:
        try:
            data = json.loads(path.read_text())
            return cls(status=str(data["status"]), error=data.get("error"), failures=dict(data.get("failures") or {}),
                       completed=data.get("completed"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def outcome_script(benchmark: str, run_id: str, outcome: Outcome) -> str:
    """Keep ``outcome`` on the master (the host with the run's state) unless an earlier session's is there."""
    rdir = run_dir(benchmark, run_id)
    return (f"if [ -e {rdir}/state.json ] && [ ! -e {rdir}/{OUTCOME_FILE} ]; then "
            f"printf '%s\\n' {shlex.quote(outcome.to_json())} > {rdir}/{OUTCOME_FILE}; fi")


def killed_script(benchmark: str, run_id: str, *, by: str) -> str:
    """Mark the run as killed by ``by`` (on every host; the master's mark is the one read)."""
    rdir = run_dir(benchmark, run_id)
    return f"if [ -d {rdir} ]; then printf '%s\\n' {shlex.quote(by)} > {rdir}/{KILLED_FILE}; fi"


def killed_by(folder: Path) -> str | None:
    try:
        return folder.joinpath(KILLED_FILE).read_text().strip() or None
    except OSError:
        return None


def _number(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def exit_code(folder: Path, key: str) -> int | None:
    """The exit code a process wrote when it ended by itself, or None."""
    value = _number(folder / f"{key}.exit")
    return None if value is None else int(value)


def host_times(folder: Path, key: str) -> tuple[float | None, float | None]:
    """When a process started and ended by its host's clock (epoch seconds), each None if not recorded."""
    return _number(folder / f"{key}.started"), _number(folder / f"{key}.ended")


def iso(epoch: float) -> str:
    """An epoch time as run.json records times."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


def recorded_pids(folder: Path) -> dict[str, int]:
    """The ``pids`` file of a host's downloaded folder: process key -> PID."""
    out = {}
    try:
        lines = folder.joinpath("pids").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            out[parts[1] + ("" if parts[2] == "-" else parts[2])] = int(parts[0])
    return out


def adopt_pids(procs: list[Proc], local_dir: Path) -> None:
    """Processes whose start a session did not see through (it died while starting them): what their
    hosts recorded. A process its host recorded was started (and is killed with the run); one it did not
    never started."""
    for proc in procs:
        if proc.status != "starting":
            continue
        pid = recorded_pids(local_dir / proc.host).get(proc.key)
        proc.pid, proc.status = (pid, "running") if pid else (None, "not started")



def final_states(procs: list[Proc], probes: dict[str, Probe]) -> dict[str, str]:
    """After the master: a worker or manager that died on its own is a failure."""
    failed: dict[str, str] = {}
    for host in sorted({p.host for p in procs if p.role != "master"}):
        probe = probes.get(host)
        if probe is None:
            failed[host] = "no final state recorded (see the kill and log download error)"
            continue
        for proc in (p for p in procs if p.host == host and p.role != "master" and p.pid):
            if proc.pid in probe.alive:
                proc.status = "ok"
            else:
                proc.exit = probe.exits.get(proc.key)
                proc.status = "died"
                failed.setdefault(host, f"{proc.key} died during the run"
                                  + ("" if proc.exit is None else f" (exit {proc.exit})"))
    return failed


@dataclass(frozen=True)
class Verdict:
    """How a run ended: its status and error, when its master ended and how long it ran, by its host's
    clock (None when it did not end by itself)."""

    status: str
    error: str | None
    ended: float | None
    master_s: float | None


def judge(procs: list[Proc], *, local_dir: Path, hosts: list[str], master: str, given: Outcome,
          failures: dict[str, str]) -> Verdict:
    """The verdict on a run from its downloaded folder: the first session's (its ``outcome.json``) over
    ``given``; a run whose master was killed by exp.killall or cluster.destroy is killed; once the master
    ended by itself, ok or failed by its exit code and the other processes' final states. Updates
    ``procs`` and ``failures``."""
    mdir = local_dir / master
    decided = Outcome.read(mdir / OUTCOME_FILE) or given
    status, error, completed = decided.status, decided.error, decided.completed
    for host, text in decided.failures.items():
        failures.setdefault(host, text)
    proc = next((p for p in procs if p.role == "master"), None)
    own_exit = exit_code(mdir, proc.key) if proc else None
    if proc and proc.exit is None:
        proc.exit = own_exit
    if completed is None:  # nobody followed the master to its end: its exit file tells whether it ended
        completed = proc is not None and proc.exit is not None
        if completed and proc.exit != 0:
            failures.setdefault(master, f"master exited with {proc.exit}")
    killer = killed_by(mdir)
    if killer and own_exit is None:
        status, error, completed = "killed", f"killed by {killer}", False
        if failures.get(master, "").startswith(MASTER_KILLED):  # what the kill did, not a failure
            del failures[master]
    if completed:
        probes = {host: parse_probe(path.read_text()) for host in hosts
                  if (path := local_dir / host / FINAL_STATE).exists()}
        for host, text in final_states(procs, probes).items():
            failures[host] = f"{failures[host]}; {text}" if host in failures else text
        status = "ok" if not failures else "failed"
        proc.status = "ok" if proc.exit == 0 else "failed"
    if failures and error is None:
        error = "\n".join(f"[{host}] {text}" for host, text in failures.items())
    started, ended = host_times(mdir, proc.key) if proc else (None, None)
    return Verdict(status=status, error=error, ended=ended if completed else None,
                   master_s=None if started is None or ended is None else ended - started)
