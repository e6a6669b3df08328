"""One experiment run over one open connection per host: start, readiness, master, kill, logs, run.json."""

from __future__ import annotations

import codecs
import logging
import re
import shlex
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from fabric import Connection
from invoke.exceptions import CommandTimedOut

from .. import __version__, hosts
from ..errors import CloisterError, ExperimentError, HostsFailed, RunTimeout
from ..layout import run_dir
from ..poll import Backoff
from ..servers import Node
from .kill import kill_run
from .logs import download_run, read_metric
from .prepare import parse_report
from .record import GitState, Proc, RunHosts, RunRecord, now
from .scripts import Probe, kill_script, log_name, parse_pids, parse_probe, probe_script, start_script
from .spec import RunSpec, address

log = logging.getLogger("cloister.runs")
_OUTPUT_LOCK = threading.Lock()
FINAL_STATE = "final-state"  # the processes' states when the master had ended, before the kill


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """Clean-up must finish: hold SIGINT until it has (main thread only)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Run:
    """One experiment run over one open connection per host; ``out`` receives the master's output."""

    def __init__(self, spec: RunSpec, *, out: TextIO | None = None):
        self.spec = spec
        self.bench = spec.bench
        self.run_id = spec.run_id
        self.local_dir = spec.local_dir
        self.out = out
        self.procs: list[Proc] = []
        self.nodes = [spec.master, *spec.workers]
        self.group = hosts.group(spec.info, self.nodes, concurrency=spec.settings.concurrency,
                                 connect_timeout=spec.settings.connect_timeout)
        self.cxn = {c.host: c for c in self.group}
        self.timings: dict[str, float] = {}
        self.prepared: dict[str, list[dict[str, str]]] = {}  # host -> its preparation report
        self._ready_seen: set[str] = set()
        self.git = GitState.of(Path.cwd())
        self.started = now()
        self._t0 = time.monotonic()

    # -- building ----------------------------------------------------------
    def _group(self, host_names: Iterable[str]) -> hosts.CappedGroup:
        """The run's open connections to ``host_names``."""
        return hosts.CappedGroup.of([self.cxn[h] for h in host_names], concurrency=self.group.concurrency)

    def _node(self, host: str) -> Node:
        return next(n for n in self.nodes if n.host == host)

    def _proc(self, role: str, node: Node, *, index: int | None = None, port: int | None = None) -> Proc:
        command = self.spec.command(role, node, port=port, index=index)
        proc = Proc(role=role, host=node.host, index=index, port=port, command=command)
        self.procs.append(proc)
        return proc

    def _start(self, by_host: dict[str, list[Proc]]) -> None:
        def start(cxn: Connection):
            procs = by_host[cxn.host]
            script = start_script(self.bench, self.run_id, procs, node=self.spec.node_facts(self._node(cxn.host)))
            result = cxn.run(script, warn=True, timeout=60)
            self.prepared[cxn.host] = parse_report(result.stdout)
            if result.exited != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()
                raise ExperimentError(tail[-1] if tail else f"start failed with exit {result.exited}")
            pids = parse_pids(result.stdout)
            for proc in procs:
                proc.pid = pids.get(proc.key)
                proc.status = "running" if proc.pid else "not started"

        hosts.check(hosts.call(self._group(by_host), start), what="start")

    # -- readiness -----------------------------------------------------------
    def _wait_ready(self, procs: list[Proc]) -> None:
        """Poll over the open connections until every proc listens (or logs readiness); fail fast,
        naming every host where a process exited at start-up."""
        pending = {p.host for p in procs}
        # Workers are often up within tens of milliseconds: poll early, and never less than 4 times a second.
        backoff = Backoff(self.bench.ready_timeout, initial=0.02, factor=1.5, maximum=0.25)
        while True:
            pending -= self._probe_ready(procs, pending)
            if not pending:
                return
            if not backoff.wait():
                raise ExperimentError(f"not ready after {self.bench.ready_timeout:g}s on {', '.join(sorted(pending))} "
                                      f"({self._awaited(procs)})", benchmark=self.bench.name, run_id=self.run_id)

    def _probe_ready(self, procs: list[Proc], pending: set[str]) -> set[str]:
        """One probe of the ``pending`` hosts: those where every proc is ready. Raises HostsFailed
        when a proc has exited."""
        script = probe_script(self.bench, self.run_id, with_logs=True)
        result = hosts.check(hosts.call(self._group(pending), lambda c: c.run(script, warn=True, timeout=30)),
                             what="readiness")
        ready: set[str] = set()
        exited: dict[str, str] = {}
        for cxn, res in result.items():
            probe = parse_probe(res.stdout)
            mine = [p for p in procs if p.host == cxn.host]
            dead = [p for p in mine if p.pid not in probe.alive]
            if dead:
                exited[cxn.host] = self._exited_at_start(cxn, dead, probe)
            elif all(self._is_ready(p, probe) for p in mine):
                ready.add(cxn.host)
        if exited:
            raise HostsFailed(exited, total=len({p.host for p in procs}), what="start-up")
        return ready

    def _exited_at_start(self, cxn: Connection, dead: list[Proc], probe: Probe) -> str:
        for proc in dead:
            proc.status = "exited early"
            proc.exit = probe.exits.get(proc.key)
        first = dead[0]
        more = f" (and {len(dead) - 1} more)" if len(dead) > 1 else ""
        code = "" if first.exit is None else f" with exit {first.exit}"
        return f"{first.key}{more} exited at start-up{code}: {self._log_tail(cxn, first)}"

    def _awaited(self, procs: list[Proc]) -> str:
        if self.bench.ready_log and any(p.role == "worker" for p in procs):
            return f"waiting for {self.bench.ready_log!r} in the worker logs"
        ports = sorted({p.port for p in procs if p.port is not None})
        shown = f"{ports[0]}-{ports[-1]}" if len(ports) > 2 else ", ".join(map(str, ports))
        return f"waiting for port{'s' if len(ports) > 1 else ''} {shown} to listen"

    def _is_ready(self, proc: Proc, probe: Probe) -> bool:
        if self.bench.ready_log and proc.role == "worker":
            name = log_name(proc.role, proc.index, self.run_id)
            if re.search(self.bench.ready_log, probe.logs.get(name, ""), flags=re.MULTILINE):
                self._ready_seen.add(name)
            return name in self._ready_seen
        if proc.port is None:
            return True
        ip_of_host = address(self._node(proc.host))
        return any(port == proc.port and ip in (ip_of_host, "0.0.0.0", "::") for ip, port in probe.listening)

    def _log_tail(self, cxn: Connection, proc: Proc, lines: int = 5) -> str:
        path = f"{run_dir(self.bench.name, self.run_id)}/{log_name(proc.role, proc.index, self.run_id)}"
        result = cxn.run(f"tail -n {lines} {path} 2>/dev/null", warn=True, timeout=15)
        text = [line.strip() for line in result.stdout.strip().splitlines() if line.strip()]
        return " | ".join(text) if text else "(empty log)"

    # -- phases ------------------------------------------------------------
    def start_manager(self) -> Proc:
        proc = self._proc("manager", self.spec.master, port=self.bench.manager_port)
        self._start({proc.host: [proc]})
        self._wait_ready([proc])
        return proc

    def start_workers(self) -> list[Proc]:
        nprocs = self.spec.nprocs
        by_host = {node.host: [self._proc("worker", node, index=h * nprocs + j, port=self.bench.worker_port(j))
                               for j in range(nprocs)]
                   for h, node in enumerate(self.spec.workers)}
        self._start(by_host)
        procs = [p for group in by_host.values() for p in group]
        self._wait_ready(procs)
        return procs

    def run_master(self) -> Proc:
        """Start the master detached, stream its log as ``[master]`` lines, wait for it or time out."""
        proc = self._proc("master", self.spec.master, port=self.bench.master_port)
        self._start({proc.host: [proc]})
        rdir = run_dir(self.bench.name, self.run_id)
        logfile = f"{rdir}/{log_name('master', None, self.run_id)}"
        # -F, not -f: the log may not exist yet when the PID is already known. The exit code comes back
        # on stderr once tail ends with the master, so no second round trip asks for it.
        command = (f"tail -n +1 -s 0.05 -F --pid={proc.pid} {logfile} 2>/dev/null; "
                   f"cat {rdir}/{proc.key}.exit >&2 2>/dev/null; true")
        timeout = self.spec.master_timeout
        writer = hosts.PrefixWriter("master", self.out, _OUTPUT_LOCK) if self.out else None
        try:
            _, _, exit_text = hosts.stream(self.cxn[proc.host], f"bash -c {shlex.quote(command)}", timeout=timeout,
                                           on_stdout=_decoding(writer.write) if writer else None)
        except CommandTimedOut:
            proc.status = "timeout"
            outcome = "left running (--keep)" if self.spec.keep else "killed"
            raise RunTimeout(f"[{proc.host}] master still running after the {timeout:g}s timeout; {outcome}",
                             benchmark=self.bench.name, run_id=self.run_id, timeout=timeout)
        finally:
            if writer:
                writer.flush()
        code = exit_text.strip()
        proc.exit = int(code) if code.lstrip("-").isdigit() else None
        proc.status = "ok" if proc.exit == 0 else "failed"
        return proc

    def _final_states(self, probes: dict[str, Probe]) -> dict[str, str]:
        """After the master: a worker or manager that died on its own is a failure."""
        failed: dict[str, str] = {}
        for host in sorted({p.host for p in self.procs if p.role != "master"}):
            probe = probes.get(host)
            if probe is None:
                failed[host] = "no final state recorded (see the kill and log download error)"
                continue
            for proc in (p for p in self.procs if p.host == host and p.role != "master"):
                if proc.pid in probe.alive:
                    proc.status = "ok"
                else:
                    proc.exit = probe.exits.get(proc.key)
                    proc.status = "died"
                    failed.setdefault(host, f"{proc.key} died during the run"
                                      + ("" if proc.exit is None else f" (exit {proc.exit})"))
        return failed

    def kill(self) -> dict[str, str]:
        """Kill every process group this run started; per-host errors are returned, not raised."""
        started = sorted({p.host for p in self.procs if p.pid})
        if not started:
            return {}
        failed = kill_run(self._group(started), bench=self.bench, run_id=self.run_id)
        self._mark_killed(set(failed))
        return failed

    def _mark_killed(self, failed_hosts: set[str]) -> None:
        # run.json must not say "running" about a process this run has just killed.
        for proc in self.procs:
            if proc.status == "running" and proc.pid and proc.host not in failed_hosts:
                proc.status = "killed"

    def download(self) -> dict[str, str]:
        """Copy every file of this run from each host into runs/{benchmark}/{run_id}/{host}/."""
        return download_run(self.group, benchmark=self.bench.name, run_id=self.run_id, local_dir=self.local_dir)

    # -- the whole run -----------------------------------------------------
    def execute(self) -> RunRecord:
        """The whole run; whatever happens, its processes are killed (unless keep) and its logs collected."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.record("running", None, {}).write(self.local_dir)
        status, error, completed = "failed", None, False
        failures: dict[str, str] = {}
        try:
            failures.update(self._phases())
            completed = True
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted (Ctrl-C)"
            raise
        except CloisterError as err:
            status, error = ("timeout" if isinstance(err, RunTimeout) else "failed"), str(err)
            if isinstance(err, HostsFailed):
                failures.update(err.failures)
        finally:
            with _no_interrupts():
                record = self._conclude(status, error, failures, completed=completed)
        return record

    def _phases(self) -> dict[str, str]:
        """Connect, manager, workers, master; return the master's failure, if it failed."""
        spec = self.spec
        log.info("run %s: %s on %d workers x %d processes", self.run_id, self.bench.name, spec.k, spec.nprocs)
        # Every handshake at once, up front: the phases below then only run commands.
        hosts.check(hosts.call(self.group, lambda c: c.open()), what="connect")
        if spec.manager:
            self.start_manager()
            self.timings["manager_ready_s"] = time.monotonic() - self._t0
            log.info("[%s] manager ready", spec.master.host)
        workers = self.start_workers()
        self.timings["workers_ready_s"] = time.monotonic() - self._t0
        log.info("%d worker processes ready on %d hosts (%.2fs)", len(workers), spec.k, self.timings["workers_ready_s"])
        master_start = time.monotonic()
        master = self.run_master()
        self.timings["master_s"] = time.monotonic() - master_start
        if master.exit == 0:
            return {}
        return {spec.master.host: "master ended without an exit code (killed?)" if master.exit is None
                else f"master exited with {master.exit}"}

    def _conclude(self, status: str, error: str | None, failures: dict[str, str], *, completed: bool) -> RunRecord:
        """Kill, collect the logs, judge the processes that outlived the master, write run.json."""
        if status == "interrupted":
            log.warning("interrupted: killing the run's processes and collecting its logs")
        probes = self._finish(failures, final_state=completed)
        if completed:
            failures.update(self._final_states(probes))
            status = "ok" if not failures else "failed"
        self.timings["total_s"] = time.monotonic() - self._t0
        record = self.record(status, error, failures)
        record.write(self.local_dir)
        self.group.close()
        return record

    def _finish(self, failures: dict[str, str], *, final_state: bool) -> dict[str, Probe]:
        """One command per host: record the final process states, kill (unless keep), send the logs back."""
        steps = []
        if final_state:
            steps.append(f"( {probe_script(self.bench, self.run_id, with_logs=False)}\n) > "
                         f"{run_dir(self.bench.name, self.run_id)}/{FINAL_STATE}")
        if not self.spec.keep:
            steps.append(kill_script(self.bench, self.run_id))
        fetched = download_run(self.group, benchmark=self.bench.name, run_id=self.run_id, local_dir=self.local_dir,
                               before="\n".join(steps) or None)
        for host, err in fetched.items():
            failures.setdefault(host, ("log download failed: " if self.spec.keep else
                                       "kill and log download failed: ") + err)
        if not self.spec.keep:
            self._mark_killed(set(fetched))
        probes = {}
        for node in self.nodes:
            path = self.local_dir / node.host / FINAL_STATE
            if final_state and node.host not in fetched and path.exists():
                probes[node.host] = parse_probe(path.read_text())
        return probes

    # -- run.json ------------------------------------------------------------
    def record(self, status: str, error: str | None, failures: dict[str, str]) -> RunRecord:
        spec = self.spec
        metric = None
        if self.bench.metric and any(p.role == "master" for p in self.procs):
            master_log = self.local_dir / spec.master.host / log_name("master", None, self.run_id)
            metric = read_metric(master_log, pattern=self.bench.metric)
        return RunRecord(
            benchmark=self.bench.name, run_id=self.run_id, status=status, error=error, k=spec.k, p=spec.nprocs,
            args=list(spec.args), manager=spec.manager, keep=spec.keep, timeout_s=spec.master_timeout,
            hosts=RunHosts(master=spec.master.host, workers=[w.host for w in spec.workers]),
            cluster=spec.info.cluster_name, provider=spec.info.provider, config=spec.config_name, git=self.git,
            cloister_version=__version__, started=self.started, ended=now() if status != "running" else None,
            timings={k: round(v, 4) for k, v in self.timings.items()}, exit_codes={p.key: p.exit for p in self.procs},
            roles=[replace(p) for p in self.procs], failures=dict(failures), metric=metric,
            preparation={"declared": self.bench.prepare.declared(), "hosts": dict(self.prepared)})

    def start_by_hand(self, role: str) -> list[Proc]:
        """Start one role ("manager", "workers" or "master") and leave it running (exp.manager/workers/master).

        Whatever happens, the logs so far are fetched and this call's processes are added to run.json, so
        the run is listed and is the latest one for exp.logs and exp.clean.
        """
        start = {"manager": lambda: [self.start_manager()], "workers": self.start_workers,
                 "master": lambda: [self.run_master()]}[role]
        try:
            return start()
        except BaseException:
            self.kill()
            raise
        finally:
            self.download()
            self.group.close()
            self._record_by_hand()

    def _record_by_hand(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        record = self.record("started by hand", None, {})
        try:
            earlier = RunRecord.read(self.local_dir)
        except (OSError, ValueError):
            earlier = None
        if earlier:
            hosts = {**earlier.preparation.get("hosts", {}), **self.prepared}
            record = replace(record, roles=earlier.roles + record.roles, started=earlier.started,
                             exit_codes={**earlier.exit_codes, **record.exit_codes},
                             preparation={**record.preparation, "hosts": hosts})
        record.write(self.local_dir)


def _decoding(write: Callable[[str], object]) -> Callable[[bytes], None]:
    """A sink for raw chunks that passes text on; a UTF-8 character split across two chunks stays whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return lambda chunk: write(decoder.decode(chunk))
