"""One run at a time per cluster: a lock file on the master, ``~/cloister/runs/run.lock``.

Two runs of benchmarks on the same ports would fail late with the benchmark's own "Address already
in use", so ``exp.run`` takes the lock before it starts anything. The file says ``BENCHMARK RUN_ID
SESSION_PID``: the PID of the SSH session that took it (the run's connection to the master,
``remote.session_pid``). A lock is held while that session lives, while the run has not concluded (its
``state.json`` on the master: a run whose exp.run was detached or died, until exp.attach or exp.killall
--run ends it) or while any process group the run recorded on the master runs (one left running with
--keep); otherwise it is stale and the next run replaces it.
"""

from __future__ import annotations

import shlex

from fabric import Connection

from ..transport import hosts, remote
from ..errors import ExperimentError
from ..cluster.servers import ClusterInfo
from ..layout import RUNS_DIR

LOCK_FILE = f"{RUNS_DIR}/run.lock"


def _held_check() -> list[str]:
    """Shell defining ``held``: prints session|state|processes and succeeds while the lock's run lives."""
    return [
        f'D="$HOME"/{RUNS_DIR}; L="$HOME"/{LOCK_FILE}',
        'mkdir -p "$D"',
        # Two runs looking at a stale lock at once: one at a time, or both would replace it.
        'exec 9<"$D"; if command -v flock >/dev/null; then flock 9; fi',
        "held() {",
        '  set -- $(cat "$L" 2>/dev/null)',
        '  case "$3" in ""|*[!0-9]*) return 1;; esac',
        # The session's process is sshd's (sshd-session on newer OpenSSH); a reused PID is anything else.
        f'  case "$(tr "\\0" " " < /proc/$3/cmdline 2>/dev/null)" in {remote.SESSION_PATTERN}) echo session; return 0;; esac',
        # A run that has not concluded (its state.json) holds it until exp.attach or exp.killall --run ends it.
        '  [ -e "$D/$1/$2/state.json" ] && { echo state; return 0; }',
        '  for p in $(awk \'{print $1}\' "$D/$1/$2/pids" 2>/dev/null); do',
        '    kill -0 -- -"$p" 2>/dev/null && { echo processes; return 0; }',
        "  done",
        "  return 1",
        "}",
    ]


def acquire_script(*, benchmark: str, run_id: str, session: str = '"$PPID"') -> str:
    """Take the lock for this run unless a live run holds it; prints ``acquired``, or ``held BENCHMARK
    RUN_ID session|state|processes`` (what keeps it held)."""
    return "\n".join([
        *_held_check(),
        'if [ -f "$L" ] && why=$(held); then echo "held $(cat "$L" | cut -d" " -f1,2) $why"; exit 0; fi',
        # ``session`` is the session's process (remote.session_pid; $PPID: the sshd that started this script).
        f'echo {shlex.quote(benchmark)} {shlex.quote(run_id)} {session} > "$L.$$" && mv -f "$L.$$" "$L" && echo acquired',
    ])


def in_flight_on(info: ClusterInfo, *, connect_timeout: float) -> str | None:
    """The run in flight on the cluster ("B run R"), or None, also when the master cannot be asked."""
    if info.master is None:
        return None
    try:
        with hosts.connection(info, info.master, connect_timeout=connect_timeout) as cxn:
            return in_flight(cxn)
    except Exception:  # noqa: BLE001 - a master that does not answer has no run to warn about
        return None


def in_flight(cxn: Connection) -> str | None:
    """The run in flight on the cluster whose master is ``cxn`` ("B run R"), or None."""
    script = "\n".join([*_held_check(),
                        'if [ -f "$L" ] && held >/dev/null; then cut -d" " -f1,2 "$L"; fi'])
    words = cxn.run(script, warn=True, timeout=15).stdout.split()
    return f"{words[0]} run {words[1]}" if len(words) == 2 else None


def release_script(run_id: str) -> str:
    """Remove the lock if this run holds it (safe to run twice, and on hosts without it)."""
    return (f'L="$HOME"/{LOCK_FILE}; '
            f'if [ "$(cut -d" " -f2 "$L" 2>/dev/null)" = {shlex.quote(run_id)} ]; then rm -f "$L"; fi')


def acquire(cxn: Connection, *, benchmark: str, run_id: str) -> None:
    """Take the cluster's run lock on the master ``cxn``; refuse, naming the run in flight, if it is held."""
    result = cxn.run(acquire_script(benchmark=benchmark, run_id=run_id, session=remote.session_pid(cxn)),
                     warn=True, timeout=30)
    words = result.stdout.split()
    if result.exited == 0 and words == ["acquired"]:
        return
    if result.exited != 0 or len(words) != 4 or words[0] != "held":
        tail = (result.stderr or result.stdout).strip().splitlines()
        raise ExperimentError(f"[{cxn.host}] could not take the run lock ~/{LOCK_FILE}: "
                              + (tail[-1] if tail else f"exit {result.exited}"), benchmark=benchmark, run_id=run_id)
    _, other, other_run, why = words
    holder = {"session": "its exp.run is connected", "state": "it has not concluded: detached, or its inv died",
              "processes": "its processes are running: left by --keep"}.get(why, why)
    raise ExperimentError(f"run {other_run} of {other} is in flight on this cluster ({holder}; ~/{LOCK_FILE} on "
                          f"{cxn.host}): wait for it to end (inv exp.attach --run {other_run} follows and finishes "
                          f"it), end it with inv exp.killall --run {other_run}, or pass --concurrent if the two "
                          "runs use different ports", benchmark=benchmark, run_id=run_id)
