"""Who follows a run: one session at a time, by an atomic claim on the master, kept alive by heartbeats.

The run's folder on the master holds ``follower``: ``SESSION_PID TOKEN``, the SSH session (sshd's
process) of the inv that follows the run and that inv's random token, or ``- -`` when nobody follows
(a detached run). Its modification time is the follower's last heartbeat: the following inv touches it
every ``HEARTBEAT_EVERY`` seconds from its own process, so an inv that is frozen (a closed lid,
SIGSTOP) or cut off (a dead network whose TCP connection still looks open) stops beating while its
session may still look alive on the master. Every operation runs under ``flock`` of the run folder:
two sessions that claim a run at once cannot both get it.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import threading
from dataclasses import dataclass

from fabric import Connection

from ..errors import ExperimentError
from ..transport import remote
from ..layout import run_dir

FOLLOWER_FILE = "follower"
HEARTBEAT_EVERY = 2.0  # seconds between a follower's heartbeats
STALE_AFTER = 10  # seconds without a heartbeat after which a follower no longer answers
CLAIM_TIMEOUT = 30.0


def new_token() -> str:
    """This inv's identity as a follower."""
    return secrets.token_hex(8)


def _prelude(benchmark: str, run_id: str) -> list[str]:
    """Shell: into the run folder under its lock; ``pid``, ``tok``, ``live`` (the session lives) and
    ``age`` (seconds since the last heartbeat) of the current follower."""
    return [
        f"cd {run_dir(benchmark, run_id)} 2>/dev/null || {{ echo gone; exit 0; }}",
        "exec 8<. ; if command -v flock >/dev/null; then flock 8; fi",
        f"set -- $(cat {FOLLOWER_FILE} 2>/dev/null); pid=${{1:--}}; tok=${{2:--}}; live=0",
        # The session's process (``remote.session_pid``) is sshd's or a shared connection's keeper; a reused
        # PID is anything else.
        f'case "$(tr "\\0" " " < /proc/"$pid"/cmdline 2>/dev/null)" in {remote.SESSION_PATTERN}) live=1;; esac',
        f'age=$(( $(date +%s) - $(stat -c %Y {FOLLOWER_FILE} 2>/dev/null || echo 0) ))',
    ]


def _write(token: str, session: str) -> str:
    # ``session``: a shell word for this session's process on the host (``remote.session_pid``).
    return f'echo {session} {shlex.quote(token)} > {FOLLOWER_FILE}.$$ && mv -f {FOLLOWER_FILE}.$$ {FOLLOWER_FILE}'


def take_script(benchmark: str, run_id: str, *, token: str, mode: str, session: str = '"$PPID"') -> str:
    """Claim the run for ``token``. ``mode``: ``new`` (the run's own exp.run), ``attach`` (only if no
    session follows), ``force`` (also from a session that no longer answers, which is ended). Prints
    ``taken``, ``followed AGE`` (a live follower), ``frozen AGE`` (a silent one) or ``gone``."""
    mine = f'[ "$tok" = {shlex.quote(token)} ]'
    steps = _prelude(benchmark, run_id)
    if mode != "new":
        steps.append(f'if ! {mine} && [ "$tok" != - ] && [ "$live" = 1 ]; then '
                     f'if [ "$age" -le {STALE_AFTER} ]; then echo "followed $age"; exit 0; fi; '
                     + ('kill -TERM "$pid" 2>/dev/null; ' if mode == "force" else 'echo "frozen $age"; exit 0; ')
                     + "fi")
    steps.append(f"{_write(token, session)} && echo taken")
    return "\n".join(steps)


def owner_script(benchmark: str, run_id: str, *, token: str, then: str) -> str:
    """If ``token`` holds the claim, run ``then`` and print ``ok``; else print ``lost`` (or ``gone``)."""
    return "\n".join([*_prelude(benchmark, run_id),
                      f'if [ "$tok" = {shlex.quote(token)} ]; then {then}; echo ok; else echo lost; fi'])


def beat_script(benchmark: str, run_id: str, *, token: str) -> str:
    return owner_script(benchmark, run_id, token=token, then=f"touch {FOLLOWER_FILE}")


def drop_script(benchmark: str, run_id: str, *, token: str) -> str:
    """Leave the run unfollowed (detached)."""
    return owner_script(benchmark, run_id, token=token, then=f"echo - - > {FOLLOWER_FILE}")


def status_lines() -> str:
    """Shell for a loop over run folders ``$d``: prints ``yes``, ``no`` or ``frozen`` for ``$d``'s follower."""
    return (f'set -- $(cat "$d"/{FOLLOWER_FILE} 2>/dev/null); fp=${{1:--}}; ft=${{2:--}}; fl=no; '
            'case "$(tr "\\0" " " < /proc/"$fp"/cmdline 2>/dev/null)" in ' + remote.SESSION_PATTERN + ') fl=yes;; esac; '
            f'[ "$ft" = - ] && fl=no; if [ "$fl" = yes ] && [ $(( $(date +%s) - $(stat -c %Y "$d"/{FOLLOWER_FILE}) )) '
            f'-gt {STALE_AFTER} ]; then fl=frozen; fi')


@dataclass(frozen=True)
class Claim:
    """The answer of a claim: ``taken``, ``followed``, ``frozen`` or ``gone``, and the heartbeat's age."""

    outcome: str
    age: int | None = None


def _ask(cxn: Connection, script: str) -> list[str]:
    result = cxn.run(script, warn=True, hide=True, timeout=CLAIM_TIMEOUT)
    words = result.stdout.split()
    if result.exited != 0 or not words:
        tail = (result.stderr or result.stdout).strip().splitlines()
        raise ExperimentError(f"[{cxn.host}] could not ask who follows the run: "
                              + (tail[-1] if tail else f"exit {result.exited}"))
    return words


class Heartbeat:
    """Beat for ``token`` every HEARTBEAT_EVERY seconds on a thread of this process until stopped;
    ``lost`` is set once another session holds the claim."""

    def __init__(self, cxn: Connection, *, benchmark: str, run_id: str, token: str):
        self.script = beat_script(benchmark, run_id, token=token)
        self.cxn = cxn
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat {run_id}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY):
            transport = self.cxn.client.get_transport()
            if transport is None or not transport.is_active():
                continue  # a lost session is the run's to find and reconnect, not the heartbeat's
            try:
                if _ask(self.cxn, self.script)[0] == "lost":
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a lost session is the run's own error to report
                continue

    def stop(self) -> None:
        self._stop.set()


def describe(claim: Claim, *, run_id: str, benchmark: str) -> str:
    """Why a claim was refused, for the user."""
    if claim.outcome == "followed":
        return (f"run {run_id} of {benchmark} is followed by a live session (its exp.run or an exp.attach, "
                f"heartbeat {claim.age}s ago): attach once that has ended")
    if claim.outcome == "frozen":
        return (f"run {run_id} of {benchmark} is followed by a session that has not answered for {claim.age}s "
                f"(a frozen or cut-off inv?): take it over with inv exp.attach --run {run_id} --force")
    return f"run {run_id} of {benchmark} is no longer in flight"


class Follower:
    """This session as the follower of one run whose master is ``cxn``: its claim and its heartbeat."""

    def __init__(self, cxn: Connection, *, benchmark: str, run_id: str):
        self.cxn, self.benchmark, self.run_id = cxn, benchmark, run_id
        self.token = new_token()
        self._heartbeat: Heartbeat | None = None

    def take_script(self) -> str:
        """The claim of a new run (its own exp.run), to run on the master with the run's first state."""
        return take_script(self.benchmark, self.run_id, token=self.token, mode="new",
                           session=remote.session_pid(self.cxn))

    def take(self, mode: str) -> Claim:
        """Claim the run (``attach`` or ``force``); beat from now on if it was taken."""
        words = _ask(self.cxn, take_script(self.benchmark, self.run_id, token=self.token, mode=mode,
                                           session=remote.session_pid(self.cxn)))
        taken = Claim(words[0], int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else None)
        if taken.outcome == "taken":
            self.beat()
        return taken

    def beat(self) -> None:
        """Start the heartbeat (after the claim of a new run was taken with its state)."""
        self._heartbeat = Heartbeat(self.cxn, benchmark=self.benchmark, run_id=self.run_id, token=self.token)

    def stop(self) -> None:
        if self._heartbeat:
            self._heartbeat.stop()

    def leave(self) -> None:
        """Stop following: the run goes on with no follower, for exp.attach. A lost session leaves no
        follower that answers either, so a failure here is not one."""
        self.stop()
        with contextlib.suppress(Exception):
            _ask(self.cxn, drop_script(self.benchmark, self.run_id, token=self.token))

    def still_follows(self) -> bool:
        """False once another session took the run over; True also when the master cannot say (what the
        follower does next, ending the run, is safe to repeat)."""
        self.stop()
        if self._heartbeat and self._heartbeat.lost.is_set():
            return False
        try:
            return _ask(self.cxn, beat_script(self.benchmark, self.run_id, token=self.token))[0] != "lost"
        except Exception:  # noqa: BLE001
            return True

    def owner_only(self, script: str) -> str:
        """``script``, run on the master only while this session holds the claim."""
        return owner_script(self.benchmark, self.run_id, token=self.token, then=script)

