"""Waiting until a run's processes are ready, over the run's open connections.

A process is ready when a socket that one of its own processes holds (its process group's socket
inodes, matched against the host's listening sockets) listens on its port, or when its log shows the
benchmark's ready line. Where hosts share one network (local hosts in loopback mode), a port held by
another host's process must not count. A process that ends before it is ready fails the run at once,
and one still running but not ready when the wait times out is named too: each with an excerpt of its
log that holds the error (the lines that name one, a traceback's exception) and its last lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import NoReturn

from ..transport import hosts
from ..errors import HostsFailed
from .experiments import Benchmark
from ..poll import Backoff
from .record import Proc
from .scripts import TAIL_BYTES, Probe, log_name, parse_probe, probe_script

ANY_ADDRESS = ("0.0.0.0", "::")
LAST_LINES = 3      # of a log, always in its excerpt
NOTABLE_LINES = 4   # lines that name an error, at most, from above the last ones
LINE_CHARS = 240
ERROR_LINE = re.compile(r"error|exception|fatal|panic|abort|denied|refused|in use|cannot|can't|unable|fail|"
                        r"not found|no such|segmentation|killed|invalid", re.IGNORECASE)


class Readiness:
    """The readiness of one run's processes; ``group`` gives the run's open connections to some hosts,
    ``addresses`` the address each host's processes are reached at."""

    def __init__(self, *, bench: Benchmark, run_id: str, group: Callable[[Iterable[str]], hosts.CappedGroup],
                 addresses: dict[str, str]):
        self.bench = bench
        self.run_id = run_id
        self.group = group
        self.addresses = addresses
        self._ready_seen: set[str] = set()  # logs that showed the ready line (a later tail may no longer)

    def wait(self, procs: list[Proc]) -> None:
        """Poll until every proc is ready; fail at once when one has ended."""
        if not procs:
            return
        pending = {p.host for p in procs}
        # Workers are often up within tens of milliseconds: poll early, and never less than 4 times a second.
        backoff = Backoff(self.bench.ready_timeout, initial=0.02, factor=1.5, maximum=0.25)
        while True:
            probes = self._probe(pending, with_logs=True)
            if any(p.pid not in probes[p.host].alive for p in procs if p.host in probes):
                self._fail(procs)
            pending -= {host for host, probe in probes.items()
                        if all(self._is_ready(p, probe=probe) for p in procs if p.host == host)}
            if not pending:
                return
            if not backoff.wait():
                self._fail(procs, not_ready=pending)

    def _probe(self, host_names: Iterable[str], *, with_logs: bool, tails: bool = False) -> dict[str, Probe]:
        script = probe_script(self.bench, self.run_id, with_logs=with_logs, tails=tails)
        result = hosts.check(hosts.call(self.group(host_names), lambda c: c.run(script, warn=True, timeout=30)),
                             what="readiness")
        return {cxn.host: parse_probe(res.stdout) for cxn, res in result.items()}

    def _fail(self, procs: list[Proc], *, not_ready: set[str] = frozenset()) -> NoReturn:
        """Name every process of the phase that has ended, on every host, and on the ``not_ready`` hosts
        (the wait timed out) every process still running but not ready; each with an excerpt of its log.

        Ends come in bursts (one cause, such as a port taken, ends many processes): one more look at
        every host of the phase finds those that ended since the look that saw the first.
        """
        probes = self._probe({p.host for p in procs}, with_logs=False, tails=True)
        failures: dict[str, str] = {}
        for host in sorted(probes):
            probe = probes[host]
            dead = [p for p in procs if p.host == host and p.pid not in probe.alive]
            for proc in dead:
                proc.status = "exited early"
                proc.exit = probe.exits.get(proc.key)
            stuck = [] if dead or host not in not_ready else \
                [p for p in procs if p.host == host and not self._is_ready(p, probe=probe)]
            if dead or stuck:
                failures[host] = "; ".join([*(self._ended(proc, probe=probe) for proc in dead),
                                            *(self._stuck(proc, probe=probe) for proc in stuck)])
        if not_ready and not failures:  # every process got ready in the last moment: say what the wait saw
            failures = {host: f"not ready after {self.bench.ready_timeout:g}s" for host in sorted(not_ready)}
        raise HostsFailed(failures, total=len(probes), what="start-up")

    def _log(self, proc: Proc, *, probe: Probe) -> str:
        return excerpt(probe.logs.get(log_name(proc.role, proc.index, self.run_id), ""))

    def _ended(self, proc: Proc, *, probe: Probe) -> str:
        code = "" if proc.exit is None else f" with exit {proc.exit}"
        return f"{proc.key} exited at start-up{code}: {self._log(proc, probe=probe)}"

    def _stuck(self, proc: Proc, *, probe: Probe) -> str:
        return (f"{proc.key} running but not ready after {self.bench.ready_timeout:g}s "
                f"({self._awaited([proc])}): {self._log(proc, probe=probe)}")

    def _is_ready(self, proc: Proc, *, probe: Probe) -> bool:
        if self.bench.ready_log and proc.role == "worker":
            name = log_name(proc.role, proc.index, self.run_id)
            if re.search(self.bench.ready_log, probe.logs.get(name, ""), flags=re.MULTILINE):
                self._ready_seen.add(name)
            return name in self._ready_seen
        if proc.port is None:
            return True
        reachable = (self.addresses[proc.host], *ANY_ADDRESS)
        return any(port == proc.port and ip in reachable for ip, port in probe.listens(proc.pid))

    def _awaited(self, procs: list[Proc]) -> str:
        if self.bench.ready_log and any(p.role == "worker" for p in procs):
            return f"waiting for {self.bench.ready_log!r} in the worker logs"
        ports = sorted({p.port for p in procs if p.port is not None})
        shown = f"{ports[0]}-{ports[-1]}" if len(ports) > 2 else ", ".join(map(str, ports))
        return f"waiting for port{'s' if len(ports) > 1 else ''} {shown} to listen"


def excerpt(tail: str) -> str:
    """The lines of a log's tail that explain a failure, as one line: those that name an error and each
    traceback's exception (a chained traceback's cause sits far above its last lines), then the last
    lines; '...' where lines were left out."""
    lines = tail.splitlines()
    if len(tail) > TAIL_BYTES:  # the tail starts mid-line
        lines = lines[1:]
    kept = [i for i, line in enumerate(lines) if line.strip()]
    if not kept:
        return "(empty log)"
    last = set(kept[-LAST_LINES:])
    notable = [i for i in kept if i not in last and ERROR_LINE.search(lines[i]) and not _traceback_header(lines[i])]
    notable += [i for i in _exception_lines(lines) if i not in last and i not in notable]
    chosen = sorted(set(sorted(notable)[-NOTABLE_LINES:]) | last)
    out = []
    for before, index in zip([None, *chosen], chosen):
        if before is not None and any(lines[j].strip() for j in range(before + 1, index)):
            out.append("...")
        line = lines[index].strip()
        out.append(line if len(line) <= LINE_CHARS else line[:LINE_CHARS] + "...")
    return " | ".join(out)


def _traceback_header(line: str) -> bool:
    """A line that only frames a traceback: its header, or the sentence that chains two."""
    return line.startswith(("Traceback (most recent call last)", "During handling of the above exception",
                            "The above exception was the direct cause"))


def _exception_lines(lines: list[str]) -> list[int]:
    """The exception line of each Python traceback: the first unindented line after its frames."""
    found, inside = [], False
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line and not line[0].isspace():
            found.append(i)
            inside = False
    return found
