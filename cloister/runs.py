"""Experiment runs: one run id, detached remote processes, readiness, logs, clean-up.

Remote layout: every file of a run lives in ``~/cloister/runs/{benchmark}/{run_id}/``
on each host: ``{role}{i}_{run_id}.log``, ``pids`` (``PID ROLE INDEX PORT`` per
process; each PID leads its own process group) and ``{role}{i}.exit`` written
when a process ends by itself. Locally, a run is ``runs/{benchmark}/{run_id}/``
with one folder per host and ``run.json``.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import tarfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, TextIO

from fabric import Connection
from invoke.exceptions import CommandTimedOut

from . import __version__, hosts
from .errors import CloisterError, ExperimentError, HostsFailed, RunTimeout
from .experiments import Benchmark, RunShape, remote_dir, render
from .servers import ClusterInfo, Node

log = logging.getLogger("cloister.runs")
_OUTPUT_LOCK = threading.Lock()

REMOTE_RUNS = "cloister/runs"
LOG_MARKER = "\\036LOG "  # printf escape for an ASCII record separator, then the log's name
READY_TAIL_BYTES = 65536
FINAL_STATE = "final-state"  # the processes' states when the master had ended, before the kill
RUN_ID_FORMAT = "%Y%m%d-%H%M%S"


def new_run_id() -> str:
    """UTC timestamp (second resolution) plus a short random suffix."""
    return datetime.now(timezone.utc).strftime(RUN_ID_FORMAT) + "-" + secrets.token_hex(2)


def remote_run_dir(benchmark: str, run_id: str) -> str:
    return f'"$HOME"/{REMOTE_RUNS}/{shlex.quote(benchmark)}/{shlex.quote(run_id)}'


def log_name(role: str, index: int | None, run_id: str) -> str:
    label = {"master": "driver"}.get(role, role)
    return f"{label}{'' if index is None else index}_{run_id}.log"


@dataclass
class Proc:
    """One process of a run on one host."""

    role: str
    host: str
    index: int | None
    port: int | None
    command: str
    pid: int | None = None
    status: str = "pending"
    exit: int | None = None

    @property
    def key(self) -> str:
        return f"{self.role}{'' if self.index is None else self.index}"


def start_script(bench: Benchmark, run_id: str, procs: list[Proc]) -> str:
    """One shell command that starts ``procs`` detached on one host and records their PIDs."""
    rdir = remote_run_dir(bench.name, run_id)
    prelude = []
    if bench.vars_file:
        vars_file = shlex.quote(bench.vars_file)
        prelude.append(f"if [ -f {vars_file} ]; then . ./{vars_file}; fi")
    prelude += [f"export {key}={shlex.quote(value)}" for key, value in bench.env.items()]
    lines = [
        "set -e",
        f"R={rdir}",
        'mkdir -p "$R"',
        f"cd {remote_dir(bench.dir)} || {{ echo \"benchmark directory {bench.dir} not found\" >&2; exit 66; }}",
        f"export CLOISTER_RUN_ID={shlex.quote(run_id)} CLOISTER_RUN_DIR=\"$R\"",
    ]
    for proc in procs:
        body = "; ".join([*prelude, proc.command, f'echo $? > "$CLOISTER_RUN_DIR"/{proc.key}.exit'])
        logfile = log_name(proc.role, proc.index, run_id)
        # A subshell with redirected stdio: the session closes at once and the process
        # survives it; setsid makes the PID lead a process group that kill -- -PID ends.
        lines.append(f'(setsid bash -c {shlex.quote(body)} > "$R"/{logfile} 2>&1 < /dev/null & '
                     f'echo "$! {proc.role} {"-" if proc.index is None else proc.index} '
                     f'{"-" if proc.port is None else proc.port}" >> "$R"/pids)')
    lines.append('cat "$R"/pids')
    return "\n".join(lines)


def _parse_pids(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            out[parts[1] + ("" if parts[2] == "-" else parts[2])] = int(parts[0])
    return out


def _probe_script(bench: Benchmark, run_id: str, with_logs: bool) -> str:
    rdir = remote_run_dir(bench.name, run_id)
    lines = [
        f"R={rdir}", 'cd "$R" 2>/dev/null || exit 0',
        # PID and state from /proc (no procps needed); the state follows the last ')' of the name.
        'for p in $(awk \'{print $1}\' pids 2>/dev/null); do '
        '[ -r /proc/$p/stat ] && echo "$p $(sed \'s/.*) //\' /proc/$p/stat | cut -d" " -f1)"; done',
        'echo "--exit"', 'for f in *.exit; do [ -f "$f" ] && echo "$f $(cat "$f")"; done',
        'echo "--net"', "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$4==\"0A\"{print $2}'",
    ]
    if with_logs and bench.ready_log:
        # The tails come back and are matched here with Python's re, the syntax experiments.yaml is
        # validated with; the log sections come last because a log line may look like a marker.
        lines.append(f'for f in worker*_*.log; do [ -f "$f" ] && printf "{LOG_MARKER}%s\\n" "$f" '
                     f'&& tail -c {READY_TAIL_BYTES} "$f" && echo; done')
    # No worker log on this host is not an error of the probe.
    lines.append("true")
    return "\n".join(lines)


@dataclass
class Probe:
    alive: set[int]
    exits: dict[str, int]
    listening: set[tuple[str, int]]
    logs: dict[str, str]


def _decode_address(hex_addr: str) -> tuple[str, int]:
    ip_hex, port_hex = hex_addr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), port
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    ip = socket.inet_ntop(socket.AF_INET6, words)
    return (ip[7:] if ip.startswith("::ffff:") else ip), port


def parse_probe(text: str) -> Probe:
    section = "ps"
    probe = Probe(alive=set(), exits={}, listening=set(), logs={})
    text, *logs = text.split("\x1eLOG ")
    for chunk in logs:
        name, _, body = chunk.partition("\n")
        probe.logs[name] = body
    for line in text.splitlines():
        if line.startswith("--"):
            section = line[2:]
            continue
        parts = line.split()
        if not parts:
            continue
        if section == "ps" and parts[0].isdigit() and not parts[1].startswith("Z"):
            probe.alive.add(int(parts[0]))
        elif section == "exit" and len(parts) == 2 and parts[1].lstrip("-").isdigit():
            probe.exits[parts[0].removesuffix(".exit")] = int(parts[1])
        elif section == "net":
            probe.listening.add(_decode_address(parts[0]))
    return probe


def kill_script(bench: Benchmark, run_id: str) -> str:
    """End every process group this run recorded on a host: TERM, a bounded wait, then KILL."""
    rdir = remote_run_dir(bench.name, run_id)
    return "\n".join([
        f"R={rdir}", 'cd "$R" 2>/dev/null || exit 0', "P=$(awk '{print $1}' pids 2>/dev/null)",
        'n=0; for p in $P; do kill -0 -- -$p 2>/dev/null && n=$((n+1)); kill -TERM -- -$p 2>/dev/null; done',
        'for i in $(seq 50); do a=; for p in $P; do kill -0 -- -$p 2>/dev/null && a=1; done; '
        '[ -z "$a" ] && break; sleep 0.05; done',
        'for p in $P; do kill -KILL -- -$p 2>/dev/null; done', 'echo "killed $n"',
    ])


def _git_commit(path: Path) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class RunResult:
    """What a run did; ``record`` is what run.json holds."""

    run_id: str
    local_dir: Path
    status: str
    record: dict[str, Any]
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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
    """One experiment run over one open connection per host."""

    def __init__(self, *, info: ClusterInfo, bench: Benchmark, k: int, nprocs: int, args: list[str],
                 runs_dir: str | os.PathLike, concurrency: int, connect_timeout: float,
                 manager: bool = True, timeout: float | None = None, keep: bool = False,
                 run_id: str | None = None, config_name: str = "", out: TextIO | None = None):
        workers = info.workers
        if info.master is None:
            raise ExperimentError("the cluster has no master", benchmark=bench.name)
        if k < 1 or k > len(workers):
            raise ExperimentError(f"-k {k}: the cluster has {len(workers)} workers (servers.txt); "
                                  f"expected 1..{len(workers)}", benchmark=bench.name)
        if nprocs < 1 or bench.worker_base + nprocs - 1 > 65535:
            raise ExperimentError(f"-p {nprocs}: expected 1..{65536 - bench.worker_base} processes per host",
                                  benchmark=bench.name)
        self.info = info
        self.bench = bench
        self.k = k
        self.nprocs = nprocs
        self.args = args
        self.manager = manager
        self.timeout = timeout or bench.timeout
        self.keep = keep
        self.run_id = run_id or new_run_id()
        self.config_name = config_name
        self.out = out
        self.master: Node = info.master
        self.workers: list[Node] = workers[:k]
        self.local_dir = Path(runs_dir) / bench.name / self.run_id
        self.shape = RunShape(
            run_id=self.run_id, k=k, nprocs=nprocs, manager=self.master.private or self.master.host,
            workers=[(w.private or w.host, bench.worker_port(j)) for w in self.workers for j in range(nprocs)],
            args=args)
        self.procs: list[Proc] = []
        self.nodes = [self.master, *self.workers]
        self.group = hosts.group(info, self.nodes, concurrency=concurrency, connect_timeout=connect_timeout)
        self.cxn = {c.host: c for c in self.group}
        self.timings: dict[str, float] = {}
        self._ready_seen: set[str] = set()
        self.started = _now()
        self._t0 = time.monotonic()

    # -- building ----------------------------------------------------------
    def _proc(self, role: str, node: Node, *, index: int | None = None, port: int | None = None) -> Proc:
        address = node.private or node.host
        command = render(self.bench, role, self.shape, host=address, port=port, index=index)
        proc = Proc(role=role, host=node.host, index=index, port=port, command=command)
        self.procs.append(proc)
        return proc

    def _start(self, by_host: dict[str, list[Proc]]) -> None:
        def start(cxn: Connection):
            procs = by_host[cxn.host]
            result = cxn.run(start_script(self.bench, self.run_id, procs), warn=True, timeout=60)
            if result.exited != 0:
                tail = (result.stderr or result.stdout).strip().splitlines()
                raise ExperimentError(tail[-1] if tail else f"start failed with exit {result.exited}")
            pids = _parse_pids(result.stdout)
            for proc in procs:
                proc.pid = pids.get(proc.key)
                proc.status = "running" if proc.pid else "not started"

        grp = hosts.CappedGroup.of([self.cxn[h] for h in by_host], concurrency=self.group.concurrency)
        hosts.check(hosts.call(grp, start), what="start")

    def _address(self, host: str) -> str:
        node = next(n for n in self.nodes if n.host == host)
        return node.private or node.host

    def _wait_ready(self, procs: list[Proc], *, deadline: float) -> None:
        """Poll over the open connections until every proc listens (or logs readiness); fail fast,
        naming every host where a process exited at start-up."""
        pending = {p.host for p in procs}
        delay = 0.02
        while pending:
            grp = hosts.CappedGroup.of([self.cxn[h] for h in pending], concurrency=self.group.concurrency)
            result = hosts.check(hosts.call(grp, lambda c: c.run(
                _probe_script(self.bench, self.run_id, with_logs=True), warn=True, timeout=30)), what="readiness")
            exited: dict[str, str] = {}
            for cxn, res in result.items():
                probe = parse_probe(res.stdout)
                mine = [p for p in procs if p.host == cxn.host]
                dead = [p for p in mine if p.pid not in probe.alive]
                for proc in dead:
                    proc.status = "exited early"
                    proc.exit = probe.exits.get(proc.key)
                if dead:
                    first = dead[0]
                    more = f" (and {len(dead) - 1} more)" if len(dead) > 1 else ""
                    exited[cxn.host] = (f"{first.key}{more} exited at start-up"
                                        f"{'' if first.exit is None else f' with exit {first.exit}'}: "
                                        f"{self._log_tail(cxn, first)}")
                elif all(self._is_ready(p, probe) for p in mine):
                    pending.discard(cxn.host)
            if exited:
                raise HostsFailed(exited, total=len({p.host for p in procs}), what="start-up")
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ExperimentError(f"not ready after {self.bench.ready_timeout:g}s on {', '.join(sorted(pending))} "
                                      f"({self._awaited(procs)})", benchmark=self.bench.name, run_id=self.run_id)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

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
        address = self._address(proc.host)
        return any(port == proc.port and ip in (address, "0.0.0.0", "::") for ip, port in probe.listening)

    def _log_tail(self, cxn: Connection, proc: Proc, lines: int = 5) -> str:
        path = f"{remote_run_dir(self.bench.name, self.run_id)}/{log_name(proc.role, proc.index, self.run_id)}"
        result = cxn.run(f"tail -n {lines} {path} 2>/dev/null", warn=True, timeout=15)
        text = [line.strip() for line in result.stdout.strip().splitlines() if line.strip()]
        return " | ".join(text) if text else "(empty log)"

    # -- phases ------------------------------------------------------------
    def start_manager(self) -> Proc:
        proc = self._proc("manager", self.master, port=self.bench.manager_port)
        self._start({self.master.host: [proc]})
        self._wait_ready([proc], deadline=time.monotonic() + self.bench.ready_timeout)
        return proc

    def start_workers(self) -> list[Proc]:
        by_host: dict[str, list[Proc]] = {}
        for h, node in enumerate(self.workers):
            by_host[node.host] = [self._proc("worker", node, index=h * self.nprocs + j,
                                             port=self.bench.worker_port(j)) for j in range(self.nprocs)]
        self._start(by_host)
        procs = [p for group in by_host.values() for p in group]
        self._wait_ready(procs, deadline=time.monotonic() + self.bench.ready_timeout)
        return procs

    def run_master(self) -> Proc:
        """Start the master detached, stream its log as ``[master]`` lines, wait for it or time out."""
        proc = self._proc("master", self.master, port=self.bench.master_port)
        self._start({self.master.host: [proc]})
        rdir = remote_run_dir(self.bench.name, self.run_id)
        logfile = f"{rdir}/{log_name('master', None, self.run_id)}"
        # -F, not -f: the log may not exist yet when the PID is already known. The exit code comes back
        # on stderr once tail ends with the master, so no second round trip asks for it.
        command = (f"tail -n +1 -s 0.05 -F --pid={proc.pid} {logfile} 2>/dev/null; "
                   f"cat {rdir}/{proc.key}.exit >&2 2>/dev/null; true")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        writer = hosts.PrefixWriter("master", self.out, _OUTPUT_LOCK) if self.out else None
        try:
            _, _, exit_text = hosts.stream(self.cxn[self.master.host], f"bash -c {shlex.quote(command)}",
                                           timeout=self.timeout,
                                           on_stdout=(lambda chunk: writer.write(decoder.decode(chunk))) if writer
                                           else None)
        except CommandTimedOut:
            proc.status = "timeout"
            outcome = "left running (--keep)" if self.keep else "killed"
            raise RunTimeout(f"[{self.master.host}] master still running after the {self.timeout:g}s timeout; {outcome}",
                             benchmark=self.bench.name, run_id=self.run_id, timeout=self.timeout)
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
        grp = hosts.CappedGroup.of([self.cxn[h] for h in started], concurrency=self.group.concurrency)
        result = hosts.call(grp, lambda c: c.run(kill_script(self.bench, self.run_id), warn=True, timeout=30))
        failed = hosts.failures(result)
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
    def execute(self) -> RunResult:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        status, error = "failed", None
        failures: dict[str, str] = {}
        completed = False
        self._write_record("running", None, failures)
        try:
            log.info("run %s: %s on %d workers x %d processes", self.run_id, self.bench.name, self.k, self.nprocs)
            # Every handshake at once, up front: the phases below then only run commands.
            hosts.check(hosts.call(self.group, lambda c: c.open()), what="connect")
            if self.manager:
                self.start_manager()
                self.timings["manager_ready_s"] = time.monotonic() - self._t0
                log.info("[%s] manager ready", self.master.host)
            workers = self.start_workers()
            self.timings["workers_ready_s"] = time.monotonic() - self._t0
            log.info("%d worker processes ready on %d hosts (%.2fs)", len(workers), self.k,
                     self.timings["workers_ready_s"])
            master_start = time.monotonic()
            master = self.run_master()
            self.timings["master_s"] = time.monotonic() - master_start
            if master.exit != 0:
                failures[self.master.host] = ("master ended without an exit code (killed?)" if master.exit is None
                                              else f"master exited with {master.exit}")
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
                if status == "interrupted":
                    log.warning("interrupted: killing the run's processes and collecting its logs")
                probes = self._finish(failures, final_state=completed)
                if completed:
                    failures.update(self._final_states(probes))
                    status = "ok" if not failures else "failed"
                self.timings["total_s"] = time.monotonic() - self._t0
                self._write_record(status, error, failures)
                self.group.close()
        return RunResult(run_id=self.run_id, local_dir=self.local_dir, status=status,
                         record=self.record(status, error, failures), failures=failures)

    def _finish(self, failures: dict[str, str], *, final_state: bool) -> dict[str, Probe]:
        """One command per host: record the final process states, kill (unless --keep), send the logs back."""
        rdir = remote_run_dir(self.bench.name, self.run_id)
        steps = []
        if final_state:
            steps.append(f"( {_probe_script(self.bench, self.run_id, with_logs=False)}\n) > {rdir}/{FINAL_STATE}")
        if not self.keep:
            steps.append(kill_script(self.bench, self.run_id))
        fetched = download_run(self.group, benchmark=self.bench.name, run_id=self.run_id, local_dir=self.local_dir,
                               before="\n".join(steps) or None)
        for host, err in fetched.items():
            failures.setdefault(host, ("kill and log download failed: " if not self.keep else
                                       "log download failed: ") + err)
        if not self.keep:
            self._mark_killed(set(fetched))
        probes = {}
        for node in self.nodes:
            path = self.local_dir / node.host / FINAL_STATE
            if final_state and node.host not in fetched and path.exists():
                probes[node.host] = parse_probe(path.read_text())
        return probes

    def record(self, status: str, error: str | None, failures: dict[str, str]) -> dict[str, Any]:
        master = next((p for p in self.procs if p.role == "master"), None)
        metric = None
        if self.bench.metric and master:
            metric = read_metric(self.local_dir / self.master.host / log_name("master", None, self.run_id),
                                 self.bench.metric)
        return {
            "benchmark": self.bench.name, "run_id": self.run_id, "status": status, "error": error,
            "k": self.k, "p": self.nprocs, "args": self.args, "manager": self.manager, "keep": self.keep,
            "timeout_s": self.timeout,
            "hosts": {"master": self.master.host, "workers": [w.host for w in self.workers]},
            "cluster": self.info.cluster_name, "provider": self.info.provider, "config": self.config_name,
            "git": _git_commit(Path.cwd()), "cloister_version": __version__,
            "started": self.started, "ended": _now() if status != "running" else None,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "exit_codes": {p.key: p.exit for p in self.procs},
            "roles": [asdict(p) for p in self.procs],
            "failures": failures, "metric": metric,
        }

    def _write_record(self, status: str, error: str | None, failures: dict[str, str]) -> None:
        _write_json(self.local_dir / "run.json", self.record(status, error, failures))

    def record_by_hand(self) -> None:
        """exp.manager/workers/master: add this call's processes to the run's run.json, so the run is
        listed and is the latest one for exp.logs and exp.clean even before any log is downloaded."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        path = self.local_dir / "run.json"
        record = self.record("started by hand", None, {})
        try:
            earlier = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            earlier = None
        if earlier:
            record["roles"] = earlier.get("roles", []) + record["roles"]
            record["exit_codes"] = {**earlier.get("exit_codes", {}), **record["exit_codes"]}
            record["started"] = earlier.get("started", record["started"])
        _write_json(path, record)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_metric(path: Path, pattern: str) -> float | str | None:
    """The first group of the last match of ``pattern`` in a log, as a float when it is one."""
    try:
        matches = re.findall(pattern, path.read_text(errors="replace"), flags=re.MULTILINE)
    except OSError:
        return None
    if not matches:
        return None
    value = matches[-1][0] if isinstance(matches[-1], tuple) else matches[-1]
    try:
        return float(value)
    except ValueError:
        return value


def download_run(grp: hosts.CappedGroup, *, benchmark: str, run_id: str, local_dir: Path,
                 before: str | None = None) -> dict[str, str]:
    """Fetch ``~/cloister/runs/{benchmark}/{run_id}/`` from every host of ``grp`` into ``local_dir/{host}/``.

    One command per host streams the folder as a tar archive; ``before`` (e.g. the kill script)
    runs first in the same command, so finishing a run costs one round trip per host.
    """
    rdir = remote_run_dir(benchmark, run_id)
    script = (f"( {before}\n) 1>&2\n" if before else "") + f"cd {rdir} 2>/dev/null || exit 0\ntar -czf - ."

    def fetch(cxn: Connection) -> int:
        code, data, err = hosts.stream(cxn, f"bash -c {shlex.quote(script)}", timeout=120)
        if code != 0:
            raise CloisterError(f"exit {code}: " + (err.strip().splitlines() or ["(no message)"])[-1])
        if not data:
            return 0
        target = local_dir / cxn.host
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            archive.extractall(target, members=members, filter="data")
        return len(members)

    return hosts.failures(hosts.call(grp, fetch))


def killall_script(bench: Benchmark, *, max_procs: int = 64) -> str:
    """Kill a benchmark's processes on one host: recorded process groups, then its binaries
    running in its directory, then listeners on its ports that are its binaries; print how many."""
    runs = f'"$HOME"/{REMOTE_RUNS}/{shlex.quote(bench.name)}'
    names = sorted({Path(bench.binary).name, Path(bench.worker_binary).name})
    pattern = "|".join(f"*{shlex.quote(n)}*" for n in names)
    ports = [bench.manager_port, bench.master_port, *range(bench.worker_base, bench.worker_base + max_procs)]
    port_re = "|".join(f":{p}" for p in ports)
    return "\n".join([
        "K=; me=$$",
        'cmd() { tr "\\0" " " < /proc/$1/cmdline 2>/dev/null; }',
        f'owned() {{ case "$(cmd $1)" in {pattern}) return 0;; esac; return 1; }}',
        # A recorded PID is trusted only while it is still a wrapper cloister started (PIDs get reused).
        "started() { tr '\\0' '\\n' < /proc/$1/environ 2>/dev/null | grep '^CLOISTER_RUN_DIR=' | "
        f"grep -qF {shlex.quote(f'/{REMOTE_RUNS}/{bench.name}/')}; }}",
        f'for f in {runs}/*/pids; do [ -f "$f" ] || continue; '
        'for p in $(awk \'{print $1}\' "$f"); do kill -0 -- -$p 2>/dev/null && started $p && '
        '{ kill -TERM -- -$p 2>/dev/null; K="$K $p"; }; done; done',
        f"D=$(cd {remote_dir(bench.dir)} 2>/dev/null && pwd -P)",
        'in_dir() { [ -n "$D" ] && [ "$(readlink /proc/$1/cwd 2>/dev/null)" = "$D" ]; }',
        'for p in /proc/[0-9]*; do q=${p#/proc/}; [ "$q" = "$me" ] && continue; '
        'in_dir $q && owned $q && { kill -TERM $q 2>/dev/null && K="$K $q"; }; done',
        'if command -v ss >/dev/null; then '
        f"for q in $(ss -ltnpH 2>/dev/null | grep -E '({port_re}) ' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do "
        'owned $q && { kill -TERM $q 2>/dev/null && K="$K $q"; }; done; fi',
        "for i in $(seq 40); do a=; "
        'for p in /proc/[0-9]*; do q=${p#/proc/}; [ "$q" = "$me" ] && continue; '
        'in_dir $q && owned $q && { a=1; kill -KILL $q 2>/dev/null; }; done; '
        '[ -z "$a" ] && break; sleep 0.05; done',
        'echo $K | tr " " "\\n" | sort -u | grep -c . || true',
    ])


def killall(grp: hosts.CappedGroup, bench: Benchmark) -> dict[str, int | BaseException]:
    """Kill the benchmark's processes on every host of ``grp``: host -> processes signalled (or the error)."""
    result = hosts.call(grp, lambda c: c.run(killall_script(bench), warn=False, timeout=60))
    out: dict[str, int | BaseException] = {}
    for cxn, value in result.items():
        if isinstance(value, BaseException):
            out[cxn.host] = value
        else:
            out[cxn.host] = int((value.stdout.strip().splitlines() or ["0"])[-1])
    return out


def clean_remote(grp: hosts.CappedGroup, *, benchmark: str | None,
                 run_id: str | None) -> tuple[dict[str, str], list[str]]:
    """Remove a run's (or a benchmark's, or every) remote logs: (per-host errors, hosts that had them)."""
    target = f'"$HOME"/{REMOTE_RUNS}'
    if benchmark:
        target += f"/{shlex.quote(benchmark)}"
        if run_id:
            target += f"/{shlex.quote(run_id)}"
    result = hosts.call(grp, lambda c: c.run(f"if [ -e {target} ]; then rm -rf -- {target} && echo removed; fi",
                                             warn=False, timeout=60))
    had = [cxn.host for cxn, value in result.items()
           if not isinstance(value, BaseException) and value.stdout.strip() == "removed"]
    return hosts.failures(result), had


def local_runs(runs_dir: str | os.PathLike, benchmark: str | None = None) -> list[dict[str, Any]]:
    """run.json of every past run under ``runs_dir``, oldest first."""
    root = Path(runs_dir)
    pattern = f"{benchmark}/*/run.json" if benchmark else "*/*/run.json"
    records = []
    for path in root.glob(pattern):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: r.get("run_id", ""))


def validate_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{4}", run_id):
        raise ExperimentError(f"run id {run_id!r}: expected YYYYMMDD-HHMMSS-xxxx (see inv exp.list)")
    return run_id
