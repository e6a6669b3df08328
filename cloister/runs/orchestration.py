"""One experiment run over one open connection per host: start, readiness, master, kill, logs, run.json."""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from fabric import Connection
from invoke.exceptions import CommandTimedOut

from .. import __version__
from ..transport import hosts, remote
from ..errors import CloisterError, ExperimentError, HostsFailed, RunTimeout
from ..interrupts import shielded
from ..layout import run_dir
from ..cluster.servers import Node
from . import draw
from .detached import RunState, conclude_script, save
from .kill import kill_run
from .lock import acquire, release_script
from .logs import download_run, read_metric
from .prepare import parse_report
from .readiness import Readiness
from .record import GitState, Proc, RunHosts, RunRecord, now
from .resources import collect as collect_resources
from .resources import sampler_launch
from .scripts import Probe, kill_script, log_name, parse_pids, parse_probe, probe_script, start_script
from .spec import RunSpec, address

log = logging.getLogger("cloister.runs")
_OUTPUT_LOCK = threading.Lock()
FINAL_STATE = "final-state"  # the processes' states when the master had ended, before the kill
ATTACH_CONTEXT_LINES = 10  # of the master's log shown again when attaching, before what comes next


class Run:
    """One experiment run over one open connection per host; ``out`` receives the master's output."""

    def __init__(self, spec: RunSpec, *, out: TextIO | None = None,
                 connections: dict[str, Connection] | None = None,
                 gone: Callable[[], dict[str, str]] | None = None):
        """``connections`` (host -> an open Connection, owned by the caller) are used instead of new ones,
        so a sweep pays for SSH set-up once, not once per run. ``gone`` names the hosts the provider knows
        to have ended (host -> why); a failed run asks it, so run.json says a node was lost and why."""
        self._gone = gone
        self.spec = spec
        self.bench = spec.bench
        self.run_id = spec.run_id
        self.local_dir = spec.local_dir
        self.out = out
        self.procs: list[Proc] = []
        self.nodes = [spec.master, *spec.workers]
        self._owns = connections is None
        warm = hosts.sharing(spec.info, state_dir=spec.settings.state_dir, idle=spec.settings.ssh_idle)
        self.group = (hosts.group(spec.info, self.nodes, concurrency=spec.settings.concurrency,
                                  connect_timeout=spec.settings.connect_timeout, sharing=warm) if connections is None
                      else hosts.CappedGroup.of([connections[n.host] for n in self.nodes],
                                                concurrency=spec.settings.concurrency))
        self.cxn = {c.host: c for c in self.group}
        self.timings: dict[str, float] = {}
        self.prepared: dict[str, list[dict[str, str]]] = {}  # host -> its preparation report
        self.readiness = Readiness(bench=self.bench, run_id=self.run_id, group=self._group,
                                   addresses={n.host: address(n) for n in self.nodes})
        self.git = GitState.of(Path.cwd())
        self.started = now()
        self._t0 = time.monotonic()

    def _close(self) -> None:
        if self._owns:
            self.group.close()

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
            if self.spec.sample_interval:
                script += "\n" + sampler_launch(self.bench.name, self.run_id, interval=self.spec.sample_interval)
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

    # -- phases ------------------------------------------------------------
    def start_manager(self) -> Proc:
        proc = self._proc("manager", self.spec.master, port=self.bench.manager_port)
        self._start({proc.host: [proc]})
        self.readiness.wait([proc])
        return proc

    def start_workers(self) -> list[Proc]:
        nprocs = self.spec.nprocs
        by_host = {node.host: [self._proc("worker", node, index=h * nprocs + j, port=self.bench.worker_port(j))
                               for j in range(nprocs)]
                   for h, node in enumerate(self.spec.workers)}
        self._start(by_host)
        procs = [p for group in by_host.values() for p in group]
        self.readiness.wait(procs)
        return procs

    def run_master(self) -> Proc:
        """Start the master detached, stream its log as ``[master]`` lines, wait for it or time out."""
        return self.follow_master(self.start_master(), timeout=self.spec.master_timeout)

    def start_master(self) -> Proc:
        proc = self._proc("master", self.spec.master, port=self.bench.master_port)
        self._start({proc.host: [proc]})
        return proc

    def follow_master(self, proc: Proc, *, timeout: float, lines: str = "+1") -> Proc:
        """Stream the master's log from line ``lines`` (tail's -n) until it ends; wait for it or time out."""
        rdir = run_dir(self.bench.name, self.run_id)
        logfile = f"{rdir}/{log_name('master', None, self.run_id)}"
        exit_file = f"{rdir}/{proc.key}.exit"
        # -F, not -f: the log may not exist yet when the PID is already known. An ended master's PID may have
        # been reused by the time an attach comes: its exit file says it ended. The exit code comes back on
        # stderr once tail ends with the master, so no second round trip asks for it.
        command = (f"if [ -e {exit_file} ]; then tail -n {shlex.quote(lines)} {logfile} 2>/dev/null; "
                   f"else tail -n {shlex.quote(lines)} -s 0.05 -F --pid={proc.pid} {logfile} 2>/dev/null; fi; "
                   f"cat {exit_file} >&2 2>/dev/null; true")
        writer = remote.LineWriter("master", self.out, _OUTPUT_LOCK) if self.out else None
        exit_text = bytearray()
        try:
            # Guarded: a tail whose session is lost ends with it instead of outliving the run.
            remote.execute(self.cxn[proc.host], f"bash -c {shlex.quote(command)}", timeout=timeout,
                           stdout=writer.write if writer else _discard, stderr=exit_text.extend)
        except CommandTimedOut:
            proc.status = "timeout"
            outcome = "left running (--keep)" if self.spec.keep else "killed"
            limit = self.spec.master_timeout  # an attach waits only what is left of it
            raise RunTimeout(f"[{proc.host}] master still running after the {limit:g}s timeout; {outcome}",
                             benchmark=self.bench.name, run_id=self.run_id, timeout=limit)
        except Exception as exc:
            if not remote.connection_lost(exc):
                raise
            why = remote.lost_session(self.cxn[proc.host]) or hosts.describe_error(exc)
            raise HostsFailed({proc.host: f"SSH session lost while the master ran ({why})"}, total=len(self.nodes),
                              what="master")
        finally:
            if writer:
                writer.flush()
        code = exit_text.decode(errors="replace").strip()
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
        return download_run(self.group, benchmark=self.bench.name, run_id=self.run_id, local_dir=self.local_dir)[0]

    # -- the whole run -----------------------------------------------------
    def execute(self, *, detach: bool = False) -> RunRecord | None:
        """The whole run; whatever happens, its processes are killed (unless keep) and its logs collected.
        With ``detach``, return None once the master has started, leaving the run to exp.attach."""
        if not self.spec.concurrent:
            self._lock()
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.record("running", None, {}).write(self.local_dir)
        return self._guarded(lambda: self._phases(detach=detach))

    def attach(self, state: RunState) -> RunRecord:
        """Take over the run in flight ``state`` from its master's log onwards and finish it as execute would."""
        self.procs, self.prepared, self.git, self.started = list(state.procs), dict(state.prepared), state.git, \
            state.started
        self.timings = dict(state.timings)
        self._t0 = time.monotonic() - (time.time() - state.t0)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        return self._guarded(self._resume)

    def _guarded(self, phases: Callable[[], dict[str, str] | None]) -> RunRecord | None:
        """Run ``phases`` (the master's failure, or None when detached), then conclude the run unless detached."""
        status, error, completed, detached = "failed", None, False, False
        failures: dict[str, str] = {}
        try:
            outcome = phases()
            detached = outcome is None
            failures.update(outcome or {})
            completed = not detached
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted (Ctrl-C)"
            raise
        except CloisterError as err:
            status, error = ("timeout" if isinstance(err, RunTimeout) else "failed"), str(err)
            if isinstance(err, HostsFailed):
                failures.update(err.failures)
        finally:
            if detached:
                self._close()
            else:
                with shielded():  # the kill and the log download must finish, Ctrl-C or not
                    record = self._conclude(status, error, failures, completed=completed)
        return None if detached else record

    def _lock(self) -> None:
        """Take the cluster's run lock before anything is written or started: a refused run leaves nothing."""
        master = self.cxn[self.spec.master.host]
        try:
            acquire(master, benchmark=self.bench.name, run_id=self.run_id)
        except Exception as exc:
            self._close()
            if isinstance(exc, CloisterError):
                raise
            raise ExperimentError(f"[{master.host}] {hosts.describe_error(exc)}", benchmark=self.bench.name,
                                  run_id=self.run_id) from exc

    def _phases(self, *, detach: bool) -> dict[str, str] | None:
        """Connect, manager, workers, master; the master's failure, if it failed (None: left detached)."""
        spec = self.spec
        log.info("run %s: %s on %d workers x %d processes", self.run_id, self.bench.name, spec.k, spec.nprocs)
        # Every handshake at once, up front: the phases below then only run commands.
        hosts.check(hosts.call(self.group, lambda c: c.open()), what="connect")
        if spec.manager:
            self.start_manager()
            self.timings["manager_ready_s"] = time.monotonic() - self._t0
            log.info("[%s] manager ready", spec.master.host)
        self.timings["workers_started_s"] = time.monotonic() - self._t0
        workers = self.start_workers()
        self.timings["workers_ready_s"] = time.monotonic() - self._t0
        log.info("%d worker processes ready on %d hosts (%.2fs)", len(workers), spec.k, self.timings["workers_ready_s"])
        self.timings["master_started_s"] = time.monotonic() - self._t0
        self.start_master()
        self._save_state(follow=not detach)
        return None if detach else self._master_outcome(lines="+1")

    def _resume(self) -> dict[str, str]:
        """The phases left to an attach (the state is written once the master started): follow it to its end."""
        self._save_state(follow=True)  # this session follows the run now
        return self._master_outcome(lines=str(ATTACH_CONTEXT_LINES))

    def _master_outcome(self, *, lines: str) -> dict[str, str]:
        """Follow the started master to its end; its failure, if it failed."""
        master = next(p for p in self.procs if p.role == "master")
        master_start = self._t0 + self.timings["master_started_s"]
        # At least a second: a master that ended while nobody followed it is read, not timed out.
        remaining = max(self.spec.master_timeout - (time.monotonic() - master_start), 1.0)
        self.follow_master(master, timeout=remaining, lines=lines)
        self.timings["master_s"] = time.monotonic() - master_start
        if master.exit == 0:
            return {}
        return {self.spec.master.host: "master ended without an exit code (killed?)" if master.exit is None
                else f"master exited with {master.exit}"}

    def _save_state(self, *, follow: bool) -> None:
        """Record the run in its folder on the master, so that exp.attach can finish it from anywhere."""
        spec = self.spec
        state = RunState(benchmark=self.bench.name, run_id=self.run_id, k=spec.k, p=spec.nprocs, args=list(spec.args),
                         manager=spec.manager, keep=spec.keep, timeout=spec.timeout, resources=spec.resources,
                         lock=not spec.concurrent, config=spec.config_name,
                         hosts=RunHosts(master=spec.master.host, workers=[w.host for w in spec.workers]),
                         started=self.started, t0=time.time() - (time.monotonic() - self._t0),
                         timings=dict(self.timings), git=self.git, procs=[replace(p) for p in self.procs],
                         prepared=dict(self.prepared))
        save(self.cxn[spec.master.host], state=state, follow=follow)

    def _conclude(self, status: str, error: str | None, failures: dict[str, str], *, completed: bool) -> RunRecord:
        """Kill, collect the logs, judge the processes that outlived the master, write run.json."""
        if status == "interrupted":
            log.warning("interrupted: killing the run's processes and collecting its logs")
        lost = self._lost_sessions(failures)
        probes = self._finish(failures, final_state=completed, lost=lost)
        if failures and self._gone is not None:
            for host, why in self._gone().items():
                if host in self.cxn:
                    _add(failures, host=host, text=f"node gone: {why}")
        if completed:
            for host, text in self._final_states(probes).items():
                _add(failures, host=host, text=text)
            status = "ok" if not failures else "failed"
        if failures and error is None:
            error = "\n".join(f"[{host}] {text}" for host, text in failures.items())
        self.timings["total_s"] = time.monotonic() - self._t0
        record = self.record(status, error, failures)
        record = replace(record, resources=collect_resources(self.local_dir, record=record))
        record.write(self.local_dir)
        if record.resources:
            draw.in_background(self.local_dir)  # resources.png: nobody waits for it
        self._close()
        return record

    def _lost_sessions(self, failures: dict[str, str]) -> set[str]:
        """The hosts whose SSH session died under the run, named in ``failures``; looked at before the
        clean-up reconnects to them."""
        lost = {host: why for host, cxn in self.cxn.items() if (why := remote.lost_session(cxn))}
        for host, why in lost.items():
            failures.setdefault(host, f"SSH session lost during the run ({why})")
        return set(lost)

    def _finish(self, failures: dict[str, str], *, final_state: bool, lost: set[str]) -> dict[str, Probe]:
        """One command per host: record the final process states, kill (unless keep), release the run
        lock, send the logs back. Each step is safe to repeat: a lost session is reconnected and asked again."""
        self.group.stop.clear()  # the clean-up must reach every host, even after a Ctrl-C
        rdir = run_dir(self.bench.name, self.run_id)
        steps = []
        if final_state:
            steps.append(f"[ -e {rdir}/{FINAL_STATE} ] || {{ ( {probe_script(self.bench, self.run_id, with_logs=False)}"
                         f"\n) > {rdir}/{FINAL_STATE}.tmp && mv {rdir}/{FINAL_STATE}.tmp {rdir}/{FINAL_STATE}; }}")
        if not self.spec.keep:
            steps += [kill_script(self.bench, self.run_id), release_script(self.run_id)]
        steps.append(conclude_script(self.bench.name, self.run_id))
        fetched, _ = download_run(self.group, benchmark=self.bench.name, run_id=self.run_id, local_dir=self.local_dir,
                                  before="\n".join(steps))
        what = "log download" if self.spec.keep else "kill and log download"
        for host, err in fetched.items():
            _add(failures, host=host, text=f"{what} failed: {err}")
        for host in sorted(lost - set(fetched)):
            _add(failures, host=host, text="reconnected: " + ("logs collected" if self.spec.keep else
                                                              "its processes killed and its logs collected"))
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
            self._close()
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


def _add(failures: dict[str, str], *, host: str, text: str) -> None:
    """One more failure of ``host``: a host's failures are one line."""
    failures[host] = f"{failures[host]}; {text}" if host in failures else text


def _discard(chunk: bytes) -> None:
    """A sink for output nobody reads (a run without ``out``)."""
