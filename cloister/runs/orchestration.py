"""One experiment run over one open connection per host: start, readiness, master, kill, logs, run.json."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from fabric import Connection

from .. import __version__
from ..transport import hosts, remote
from ..errors import CloisterError, ExperimentError, HostsFailed, RunFollowed, RunTimeout
from ..interrupts import shielded
from ..layout import run_dir
from ..cluster.servers import Node
from . import claim, draw
from .conclusion import FINAL, FINAL_STATE, MASTER_KILLED, Outcome, adopt_pids, iso, judge, outcome_script
from .detached import ENDED_FILE, STATE_FILE, RunState, conclude_script, save
from .lock import acquire, release_script
from .logs import download_run, read_metric
from .prepare import parse_report
from .readiness import Readiness
from .follow import follow
from .record import GitState, Proc, RunHosts, RunRecord, now
from .resources import collect as collect_resources
from .resources import sampler_launch
from .scripts import extra_logs_script, kill_script, log_name, parse_pids, probe_script, start_script
from .spec import RunSpec, address

log = logging.getLogger("cloister.runs")
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
        self.readiness = Readiness(bench=self.bench, run_id=self.run_id, group=self.group_of,
                                   addresses={n.host: address(n) for n in self.nodes})
        self.git = GitState.of(Path.cwd())
        self.started = now()
        self._t0 = time.monotonic()
        self.phase = "starting"  # the last phase that began, as the master's state says
        self.follower = claim.Follower(self.cxn[spec.master.host], benchmark=self.bench.name, run_id=self.run_id)
        self._tracked = False  # the run's state is kept on the master (not a role started by hand)
        self._watching = False  # an attach: Ctrl-C stops watching instead of ending the run
        self._concluding_at = 0.0

    def close(self) -> None:
        self.follower.stop()
        if self._owns:
            self.group.close()

    # -- building ----------------------------------------------------------
    def group_of(self, host_names: Iterable[str]) -> hosts.CappedGroup:
        """The run's open connections to ``host_names``."""
        return hosts.CappedGroup.of([self.cxn[h] for h in host_names], concurrency=self.group.concurrency)

    def _node(self, host: str) -> Node:
        return next(n for n in self.nodes if n.host == host)

    def _proc(self, role: str, node: Node, *, index: int | None = None, port: int | None = None) -> Proc:
        command = self.spec.command(role, node, port=port, index=index)
        proc = Proc(role=role, host=node.host, index=index, port=port, command=command, status="starting")
        self.procs.append(proc)
        return proc

    def _start(self, by_host: dict[str, list[Proc]]) -> None:
        def start(cxn: Connection):
            procs = by_host[cxn.host]
            on_master = cxn.host == self.spec.master.host
            script = start_script(self.bench, self.run_id, procs, node=self.spec.node_facts(self._node(cxn.host)),
                                  hostfile=self.spec.hostfile if on_master else None)
            if self.spec.sample_interval:
                script += "\n" + sampler_launch(self.bench.name, self.run_id, interval=self.spec.sample_interval,
                                                wait=self.bench.ready_timeout + self.spec.master_timeout)
            result = cxn.run(script, warn=True, timeout=60)
            self.prepared[cxn.host] = parse_report(result.stdout)
            if result.exited != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()
                raise ExperimentError(tail[-1] if tail else f"start failed with exit {result.exited}")
            pids = parse_pids(result.stdout)
            for proc in procs:
                proc.pid = pids.get(proc.key)
                proc.status = "running" if proc.pid else "not started"

        hosts.check(hosts.call(self.group_of(by_host), start), what="start")

    # -- phases ------------------------------------------------------------
    def start_manager(self) -> Proc:
        proc = self._proc("manager", self.spec.master, port=self.bench.manager_port)
        self._track("manager")
        self._start({proc.host: [proc]})
        self.readiness.wait([proc])
        return proc

    def start_workers(self) -> list[Proc]:
        """The worker processes of every worker host (none for a benchmark without workers: its hosts are only
        prepared and sampled, for the processes a launcher such as mpirun starts there)."""
        per_host = self.spec.worker_processes
        by_host = {node.host: [self._proc("worker", node, index=h * per_host + j, port=self.bench.worker_port(j))
                               for j in range(per_host)]
                   for h, node in enumerate(self.spec.workers)}
        self._track("workers")
        self._start(by_host)
        procs = [p for group in by_host.values() for p in group]
        self.readiness.wait(procs)
        return procs

    def start_master(self) -> Proc:
        proc = self._proc("master", self.spec.master, port=self.bench.master_port)
        self._track("master")
        self._start({proc.host: [proc]})
        return proc

    def follow_master(self, proc: Proc, *, timeout: float, lines: str = "+1") -> Proc:
        """Stream the master's log from line ``lines`` (tail's -n) until it ends; wait for it or time out."""
        follow(self.cxn[proc.host], proc, bench=self.bench, run_id=self.run_id, out=self.out, timeout=timeout,
               lines=lines, limit=self.spec.master_timeout, keep=self.spec.keep, total=len(self.nodes))
        return proc

    def mark_killed(self, failed_hosts: set[str]) -> None:
        """run.json must not say "running" about a process this run has just killed (but on ``failed_hosts``)."""
        for proc in self.procs:
            if proc.status == "running" and proc.pid and proc.host not in failed_hosts:
                proc.status = "killed"

    # -- the whole run -----------------------------------------------------
    def execute(self, *, detach: bool = False) -> RunRecord | None:
        """The whole run; whatever happens, its processes are killed (unless keep) and its logs collected.
        With ``detach``, return None once the master has started, leaving the run to exp.attach."""
        if not self.spec.concurrent:
            self._lock()
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._tracked = True
        return self._guarded(lambda: self._phases(detach=detach))

    def attach(self, state: RunState, *, force: bool = False) -> RunRecord | None:
        """Take over the run in flight ``state`` and finish it as execute would: follow its master from its
        log onwards, or end a run whose exp.run died during start-up. Ctrl-C stops following and leaves
        the run in flight (KeyboardInterrupt is raised again). Refused (RunFollowed) while another
        session follows it; with ``force``, a session that no longer answers is ended and replaced."""
        self._adopt(state)
        self._claim("force" if force else "attach")
        if not state.master_started or not self._master_pid():
            return self._end_now("interrupted", f"its exp.run ended during start-up (while starting the {state.phase}); "
                                 "ended by exp.attach")
        self._watching = True
        return self._guarded(self._resume)

    def _master_pid(self) -> int | None:
        """The started master's PID; its host's record of it when the session that started it died before
        saving it (None: it never started)."""
        master = next(p for p in self.procs if p.role == "master")
        if master.pid is None:
            out = self.cxn[master.host].run(f"cat {run_dir(self.bench.name, self.run_id)}/pids 2>/dev/null; true",
                                            warn=True, timeout=30).stdout
            master.pid = parse_pids(out).get(master.key)
            master.status = "running" if master.pid else "not started"
        return master.pid

    def end(self, state: RunState, *, status: str, error: str) -> RunRecord:
        """End the run in flight ``state`` that no live session follows (RunFollowed otherwise): kill, collect,
        record as ``status`` (unless its master had ended by itself, or an earlier session's verdict is on
        the master)."""
        self._adopt(state)
        self._claim("force")
        return self._end_now(status, error)

    def complete(self, state: RunState) -> RunRecord:
        """Write run.json from what exp.logs downloaded of a run that has concluded (``state`` is its last)."""
        self._adopt(state)
        self._concluding_at = time.time()
        adopt_pids(self.procs, self.local_dir)
        if not self.spec.keep:
            self.mark_killed(set())
        return self._judge(Outcome(status="incomplete", error="its record was completed by exp.logs"), {})

    def _adopt(self, state: RunState) -> None:
        self.procs, self.prepared, self.git, self.started = list(state.procs), dict(state.prepared), state.git, \
            state.started
        self.timings, self.phase = dict(state.timings), state.phase
        self._t0 = time.monotonic() - (time.time() - state.t0)
        self._tracked = True
        self.local_dir.mkdir(parents=True, exist_ok=True)

    def _end_now(self, status: str, error: str) -> RunRecord:
        with shielded():
            return self._conclude(status, error, {}, completed=None)

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
            if self._watching:  # an attach stops watching; the run goes on
                detached = True
                self.follower.leave()
            status, error = "interrupted", "interrupted (Ctrl-C)"
            raise
        except CloisterError as err:
            status, error = ("timeout" if isinstance(err, RunTimeout) else "failed"), str(err)
            if isinstance(err, HostsFailed):
                failures.update(err.failures)
        finally:
            if detached:
                self.close()
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
            self.close()
            if isinstance(exc, CloisterError):
                raise
            raise ExperimentError(f"[{master.host}] {hosts.describe_error(exc)}", benchmark=self.bench.name,
                                  run_id=self.run_id) from exc

    def _phases(self, *, detach: bool) -> dict[str, str] | None:
        """Connect, manager, workers, master; the master's failure, if it failed (None: left detached)."""
        spec = self.spec
        log.info("run %s: %s on %d workers x %d processes", self.run_id, self.bench.name, spec.k, spec.nprocs)
        # The run exists on the master, followed by this session, before any process starts anywhere.
        self._save_state(then=self.follower.take_script())
        self.follower.beat()
        self.record("running", None, {}).write(self.local_dir)
        # Every handshake at once, up front: the phases below then only run commands.
        hosts.check(hosts.call(self.group, lambda c: c.open()), what="connect")
        if spec.with_manager:
            self.start_manager()
            self.timings["manager_ready_s"] = time.monotonic() - self._t0
            log.info("[%s] manager ready", spec.master.host)
        self.timings["workers_started_s"] = time.monotonic() - self._t0
        workers = self.start_workers()
        self.timings["workers_ready_s"] = time.monotonic() - self._t0
        log.info("%d worker processes ready on %d hosts (%.2fs)", len(workers), spec.k, self.timings["workers_ready_s"])
        self.timings["master_started_s"] = time.monotonic() - self._t0
        self.start_master()
        self._save_state()
        if detach:
            self.follower.leave()
            return None
        return self._master_outcome(lines="+1")

    def _resume(self) -> dict[str, str]:
        """The phases left to an attach once the master has started: follow it to its end."""
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
        return {self.spec.master.host: f"{MASTER_KILLED} (killed?)" if master.exit is None
                else f"master exited with {master.exit}"}

    # -- the run's state and its follower on the master ------------------------
    def _track(self, phase: str) -> None:
        """Entering ``phase``: the master's state says so, with the processes about to start, before they do."""
        self.phase = phase
        if self._tracked:
            self._save_state()

    def _save_state(self, *, then: str | None = None) -> None:
        """Record the run in its folder on the master, so that exp.attach can finish it from anywhere."""
        spec = self.spec
        state = RunState(benchmark=self.bench.name, run_id=self.run_id, k=spec.k, p=spec.nprocs, args=list(spec.args),
                         manager=spec.manager, keep=spec.keep, timeout=spec.timeout, resources=spec.resources,
                         lock=not spec.concurrent, config=spec.config_name,
                         hosts=RunHosts(master=spec.master.host, workers=[w.host for w in spec.workers]),
                         started=self.started, t0=time.time() - (time.monotonic() - self._t0),
                         timings=dict(self.timings), git=self.git, procs=[replace(p) for p in self.procs],
                         prepared=dict(self.prepared), phase=self.phase)
        save(self.cxn[spec.master.host], state=state, then=then)

    def _claim(self, mode: str) -> None:
        """Become the run's follower (``attach`` or ``force``), or raise RunFollowed naming who follows it."""
        try:
            taken = self.follower.take(mode)
        except Exception as exc:
            self.close()
            if isinstance(exc, CloisterError):
                raise
            raise ExperimentError(f"[{self.spec.master.host}] {hosts.describe_error(exc)}", run_id=self.run_id) from exc
        if taken.outcome != "taken":
            self.close()
            why = claim.describe(taken, run_id=self.run_id, benchmark=self.bench.name)
            if taken.outcome == "gone":
                raise ExperimentError(why, benchmark=self.bench.name, run_id=self.run_id)
            raise RunFollowed(why, benchmark=self.bench.name, run_id=self.run_id, frozen=taken.outcome == "frozen")

    # -- the end -------------------------------------------------------------
    def _conclude(self, status: str, error: str | None, failures: dict[str, str], *,
                  completed: bool | None) -> RunRecord:
        """Kill, collect the logs, judge the processes that outlived the master, write run.json, and only
        then take the run off the runs in flight."""
        lost = self._lost_sessions(failures)  # before anything reconnects
        if self._tracked and not self.follower.still_follows():
            return self._taken_over(failures)
        if status == "interrupted":
            log.warning("interrupted: killing the run's processes and collecting its logs")
        self._concluding_at = time.time()
        self._finish(failures, lost=lost, outcome=Outcome(status=status, error=error, failures=dict(failures),
                                                          completed=completed))
        self._name_gone(failures)
        record = self._judge(Outcome(status=status, error=error, failures=failures, completed=completed), failures)
        if self._tracked:
            with contextlib.suppress(Exception):  # unreachable: exp.ps keeps listing it for exp.attach to end
                conclude = conclude_script(self.bench.name, self.run_id, kept=self.spec.keep)
                self.cxn[self.spec.master.host].run(self.follower.owner_only(conclude), warn=True, timeout=30)
                # The local copy of the master's folder as the master has it now.
                mdir = self.local_dir / self.spec.master.host
                if (mdir / STATE_FILE).exists():
                    (mdir / STATE_FILE).replace(mdir / ENDED_FILE)
        self.close()
        return record

    def _name_gone(self, failures: dict[str, str]) -> None:
        """A host that failed because its node is gone (a reclaimed spot worker) says so, with the reason."""
        if failures and self._gone is not None:
            for host, why in self._gone().items():
                if host in self.cxn:
                    _add(failures, host=host, text=f"node gone: {why}")

    def _taken_over(self, failures: dict[str, str]) -> RunRecord:
        error = ("taken over by another session (exp.attach --force), which ends the run and records it; "
                 "inv exp.logs completes this record")
        record = self.record("incomplete", error, failures)
        try:
            written = RunRecord.read(self.local_dir).status in FINAL  # by the other session, on this machine
        except (OSError, ValueError):
            written = False
        if not written:
            record.write(self.local_dir)
        self.close()
        return record

    def _judge(self, given: Outcome, failures: dict[str, str]) -> RunRecord:
        """run.json from the run's downloaded folder (``conclusion.judge``), with the master's own times."""
        verdict = judge(self.procs, local_dir=self.local_dir, hosts=[n.host for n in self.nodes],
                        master=self.spec.master.host, given=given, failures=failures)
        if verdict.master_s is not None:
            self.timings["master_s"] = verdict.master_s
        end = verdict.ended if verdict.ended is not None else self._concluding_at
        self.timings["total_s"] = max(end - (time.time() - (time.monotonic() - self._t0)), 0.0)
        self.timings["collect_s"] = time.time() - self._concluding_at
        record = self.record(verdict.status, verdict.error, failures, ended=iso(end))
        record = replace(record, resources=collect_resources(self.local_dir, record=record))
        record.write(self.local_dir)
        if record.resources:
            draw.in_background(self.local_dir)  # resources.png: nobody waits for it
        return record

    def _lost_sessions(self, failures: dict[str, str]) -> set[str]:
        """The hosts whose SSH session died under the run, named in ``failures``; looked at before the
        clean-up reconnects to them."""
        lost = {host: why for host, cxn in self.cxn.items() if (why := remote.lost_session(cxn))}
        for host, why in lost.items():
            failures.setdefault(host, f"SSH session lost during the run ({why})")
        return set(lost)

    def _finish(self, failures: dict[str, str], *, lost: set[str], outcome: Outcome) -> None:
        """One command per host: record the final process states, this session's verdict (unless an earlier
        one's is there), kill (unless keep), release the run lock, send the logs back. Each step is safe to
        repeat: a lost session is reconnected and asked again."""
        self.group.stop.clear()  # the clean-up must reach every host, even after a Ctrl-C
        rdir = run_dir(self.bench.name, self.run_id)
        steps = [f"[ -e {rdir}/{FINAL_STATE} ] || {{ ( {probe_script(self.bench, self.run_id, with_logs=False)}"
                 f"\n) > {rdir}/{FINAL_STATE}.tmp && mv {rdir}/{FINAL_STATE}.tmp {rdir}/{FINAL_STATE}; }}",
                 outcome_script(self.bench.name, self.run_id, outcome)]
        if not self.spec.keep:
            steps += [kill_script(self.bench, self.run_id), release_script(self.run_id)]
        steps.append(extra_logs_script(self.bench, self.run_id))
        fetched, _ = download_run(self.group, benchmark=self.bench.name, run_id=self.run_id, local_dir=self.local_dir,
                                  before="\n".join(steps))
        what = "log download" if self.spec.keep else "kill and log download"
        for host, err in fetched.items():
            _add(failures, host=host, text=f"{what} failed: {err}")
        for host in sorted(lost - set(fetched)):
            _add(failures, host=host, text="reconnected: " + ("logs collected" if self.spec.keep else
                                                              "its processes killed and its logs collected"))
        adopt_pids(self.procs, self.local_dir)
        if not self.spec.keep:
            self.mark_killed(set(fetched))

    # -- run.json ------------------------------------------------------------
    def record(self, status: str, error: str | None, failures: dict[str, str], *, ended: str | None = None) -> RunRecord:
        spec = self.spec
        metric = None
        if self.bench.metric and any(p.role == "master" for p in self.procs):
            master_log = self.local_dir / spec.master.host / log_name("master", None, self.run_id)
            metric = read_metric(master_log, pattern=self.bench.metric)
        return RunRecord(
            benchmark=self.bench.name, run_id=self.run_id, status=status, error=error, k=spec.k, p=spec.nprocs,
            args=list(spec.args), manager=spec.with_manager, keep=spec.keep, timeout_s=spec.master_timeout,
            hosts=RunHosts(master=spec.master.host, workers=[w.host for w in spec.workers]),
            cluster=spec.info.cluster_name, provider=spec.info.provider, config=spec.config_name, git=self.git,
            cloister_version=__version__, started=self.started,
            ended=ended or (now() if status != "running" else None),
            timings={k: round(v, 4) for k, v in self.timings.items()}, exit_codes={p.key: p.exit for p in self.procs},
            roles=[replace(p) for p in self.procs], failures=dict(failures), metric=metric,
            preparation={"declared": self.bench.prepare.declared(), "hosts": dict(self.prepared)})


def _add(failures: dict[str, str], *, host: str, text: str) -> None:
    """One more failure of ``host``: a host's failures are one line."""
    failures[host] = f"{failures[host]}; {text}" if host in failures else text
