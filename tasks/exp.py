"""exp.*: run benchmarks on the cluster and keep every log of a run together."""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from invoke import Collection, Exit

from cloister.cluster import budget, lifecycle as clusterlib
from cloister.transport import hosts as hostlib
from cloister import layout, runs as runlib
from cloister.runs import detached, present, sweep as sweeplib
from cloister.runs.healing import SweepCluster
from cloister.config import ClusterConfig
from cloister.errors import CloisterError, HostsFailed
from cloister.runs.experiments import Benchmark, Registry, load_registry, parse_args, sample_interval
from cloister.cluster.servers import ClusterInfo
from cloister.settings import Settings

from ._common import load, number, settings, task
from ._output import table
from ._runs import conclusion, runs_table, summary, sweep_with_progress

BENCH_HELP = "benchmark name from experiments.yaml"
CONFIG_HELP = "cluster config JSON (default: cloister.config in invoke.yaml)"
K_HELP = "number of worker hosts: the first K of servers.txt (default: every worker)"
P_HELP = "worker processes per host"
ARGS_HELP = "extra arguments for the master, e.g. --args='-n 5' (shell operators are refused)"
RESOURCES_HELP = ("seconds between CPU/memory/network/disk samples on each host, or off "
                  "(default: the benchmark's resources, 1)")
RUN_HELP = "run id (looked up in runs/*/) or a run folder"
DETACH_GRACE = 2.0  # seconds after a Ctrl-C in exp.attach in which a second one ends the run


def _logging() -> None:
    logger = logging.getLogger("cloister")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class _Context(NamedTuple):
    cfg: ClusterConfig
    conf: Settings
    registry: Registry
    bench: Benchmark | None
    info: ClusterInfo

    @property
    def benches(self) -> list[Benchmark]:
        """The benchmark named by --benchmark, or every benchmark."""
        return [self.bench] if self.bench else list(self.registry.benchmarks.values())

    def every_host(self) -> hostlib.CappedGroup:
        return hostlib.group(self.info, self.info.cluster_nodes, concurrency=self.conf.concurrency,
                             connect_timeout=self.conf.connect_timeout,
                             sharing=clusterlib.sharing(self.info, settings=self.conf))


def _context(c, config, benchmark) -> _Context:
    cfg = load(c, config)
    conf = settings(c)
    registry = load_registry(conf.experiments)
    bench = registry.get(benchmark) if benchmark else None
    return _Context(cfg, conf, registry, bench, clusterlib.ensure_running(cfg, settings=conf))


def _require(benchmark):
    if not benchmark:
        raise Exit("--benchmark NAME is required (see inv exp.list)", code=1)
    return benchmark


def _spec(c, **kwargs) -> runlib.RunSpec:
    return _spec_and_config(c, **kwargs)[0]


def _spec_and_config(c, *, config, benchmark, k, p, args=None, timeout=None, manager=True, keep=False,
                     run_id=None, resources=None) -> tuple[runlib.RunSpec, ClusterConfig]:
    k, timeout = number("-k", k, positive=True), number("--timeout", timeout, float, positive=True)
    interval = None if resources is None else _interval(resources)
    ctx = _context(c, config, _require(benchmark))
    return runlib.RunSpec(info=ctx.info, bench=ctx.bench, k=len(ctx.info.workers) if k is None else k, nprocs=int(p),
                          args=parse_args(args), settings=ctx.conf, timeout=timeout, manager=manager, keep=keep,
                          run_id=run_id or runlib.new_run_id(), config_name=ctx.cfg.source,
                          resources=interval), ctx.cfg


def _interval(text: str) -> float:
    try:
        return sample_interval(text)
    except ValueError as err:
        raise Exit(f"--resources {text!r}: {err}", code=1)


def _remote_dir(benchmark: str, run_id: str) -> str:
    return layout.home_path(f"{layout.RUNS_DIR}/{benchmark}/{run_id}") + "/"


@task(help={"benchmark": BENCH_HELP, "k": K_HELP, "p": P_HELP, "config": CONFIG_HELP,
            "timeout": "seconds the master may run (default: the benchmark's timeout)",
            "manager": "start the manager on the master first (default: yes; --no-manager to skip)",
            "keep": "leave the processes running after the run (stop them with inv exp.killall)",
            "args": ARGS_HELP, "resources": RESOURCES_HELP,
            "concurrent": "run even while another run is in flight on the cluster (its ports must differ)",
            "detach": "return once the master has started; the run goes on with no session following it: "
                      "inv exp.attach --run ID follows and finishes it, inv exp.killall --run ID ends it"})
def run(c, benchmark=None, k=None, p=1, config=None, timeout=None, manager=True, keep=False, args=None,
        resources=None, concurrent=False, detach=False):
    """Run a benchmark end to end: workers, master, logs, clean-up, run.json (Ctrl-C ends the run)."""
    _logging()
    spec, cfg = _spec_and_config(c, config=config, benchmark=benchmark, k=k, p=p, args=args, timeout=timeout,
                                 manager=manager, keep=keep, resources=resources)
    gone = functools.partial(clusterlib.gone_hosts, cfg, settings=spec.settings, info=spec.info)
    record = runlib.Run(replace(spec, concurrent=concurrent), out=sys.stdout, gone=gone).execute(detach=detach)
    if record is None:
        print(f"{spec.bench.name} run {spec.run_id} in flight; follow and finish it with: "
              f"inv exp.attach --run {spec.run_id}")
        return
    conclusion(record, spec)


def _start_role(c, role, *, config, benchmark, k, p, args, run_id):
    _logging()
    spec = _spec(c, config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run_id, keep=True)
    procs = runlib.start_by_hand(runlib.Run(spec, out=sys.stdout), role)
    for proc in procs:
        print(f"[{proc.host}] {proc.key} pid {proc.pid} {proc.status}"
              + ("" if proc.exit is None else f" exit {proc.exit}"))
    print(f"run id {spec.run_id}; logs in {_remote_dir(spec.bench.name, spec.run_id)} "
          f"(pass --run {spec.run_id} to the other roles; stop with inv exp.killall)")
    if role == "master" and procs[0].exit != 0:
        raise Exit(f"[{procs[0].host}] master exited with {procs[0].exit}", code=1)


ROLE_HELP = {"benchmark": BENCH_HELP, "k": K_HELP, "p": P_HELP, "config": CONFIG_HELP, "args": ARGS_HELP,
             "run": "run id to join (so every role's logs share it); default: a new one"}


@task(help={**ROLE_HELP, "local": "run the manager here in the foreground through c.run (you are on the master)"})
def manager(c, benchmark=None, k=None, p=1, config=None, args=None, run=None, local=False):
    """Start the benchmark's manager on the master (or here, with --local)."""
    if not local:
        _start_role(c, "manager", config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run)
        return
    spec = _spec(c, config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run)
    c.run(runlib.manager_here(spec), pty=False)


@task(help=ROLE_HELP)
def workers(c, benchmark=None, k=None, p=1, config=None, args=None, run=None):
    """Start the benchmark's worker processes on the first K servers and wait until they listen."""
    _start_role(c, "workers", config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run)


@task(help=ROLE_HELP)
def master(c, benchmark=None, k=None, p=1, config=None, args=None, run=None):
    """Run the benchmark's master (driver) on the master and stream its output."""
    _start_role(c, "master", config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run)


@task(help={"run": "run id of a run in flight (default: the latest, see inv exp.ps)", "config": CONFIG_HELP,
            "force": "take the run over from a session that follows it but no longer answers (a frozen or "
                     "cut-off inv); that session is ended"})
def attach(c, run=None, config=None, force=False):
    """Follow a run in flight and finish it as exp.run would; Ctrl-C stops following, the run goes on."""
    _logging()
    ctx = _context(c, config, None)
    with closing(hostlib.connection(ctx.info, ctx.info.master, connect_timeout=ctx.conf.connect_timeout,
                                    sharing=clusterlib.sharing(ctx.info, settings=ctx.conf))) as cxn:
        state = detached.pick(cxn, run_id=run)
    spec = detached.spec_of(state, info=ctx.info, registry=ctx.registry, settings=ctx.conf)
    print(f"attaching to {state.benchmark} run {state.run_id} (k={state.k} p={state.p}, started {state.started}); "
          f"Ctrl-C stops following (the run goes on), twice ends it")
    following = runlib.Run(spec, out=sys.stdout)
    try:
        record = following.attach(state, force=force)
    except KeyboardInterrupt:
        _stopped_following(following, state)
    conclusion(record, spec)


def _stopped_following(following: runlib.Run, state: detached.RunState) -> None:
    """After Ctrl-C in exp.attach: the run goes on, unless a second Ctrl-C comes within DETACH_GRACE seconds."""
    run_id = state.run_id
    print(f"stopped following {state.benchmark} run {run_id}; it goes on (Ctrl-C again within {DETACH_GRACE:g}s "
          f"ends it). Later: inv exp.attach --run {run_id} follows it again, inv exp.killall --run {run_id} ends it",
          file=sys.stderr)
    try:
        time.sleep(DETACH_GRACE)
    except KeyboardInterrupt:
        record = following.end(state, status="interrupted", error="interrupted (Ctrl-C twice in exp.attach)")
        summary(record)
        raise Exit(f"run {run_id} ended: {record.status}; logs: {following.local_dir}/", code=130)
    raise Exit(f"detached from run {run_id}", code=130)


@task(help={"config": CONFIG_HELP})
def ps(c, config=None):
    """List the runs in flight on the cluster, as its hosts tell."""
    ctx = _context(c, config, None)
    with closing(ctx.every_host()) as grp:
        rows, errors = detached.ps(grp, master=ctx.info.master.host)
    table(f"runs in flight on {ctx.info.cluster_name}", detached.PS_COLUMNS, rows)
    if errors:
        raise HostsFailed(errors, total=len(ctx.info.cluster_nodes))


@task(help={"benchmark": BENCH_HELP + " (default: every benchmark)", "config": CONFIG_HELP,
            "run": "end only this run in flight (see inv exp.ps): its processes killed, its logs collected and "
                   "run.json written (by the session that follows it, if one does); or a kept run's processes"})
def killall(c, benchmark=None, config=None, run=None):
    """Kill a benchmark's processes (ending its runs in flight) and free its ports on every host."""
    if run:
        _kill_run(c, config=config, run_id=run)
        return
    ctx = _context(c, config, benchmark)
    errors: dict[str, str] = {}
    with closing(ctx.every_host()) as grp:
        master = next(cxn for cxn in grp if cxn.host == ctx.info.master.host)
        names = {b.name for b in ctx.benches}
        for entry in detached.in_flight(master):
            if entry.state.benchmark in names:
                try:
                    _end(ctx, grp, entry.state, by="exp.killall --benchmark")
                except CloisterError as err:  # its processes are still killed below
                    print(f"warning: {entry.state.benchmark} run {entry.state.run_id} not recorded: {err}",
                          file=sys.stderr)
        for b in ctx.benches:
            for host, value in runlib.killall(grp, bench=b).items():
                if isinstance(value, BaseException):
                    errors[host] = hostlib.describe_error(value)
                elif value:
                    print(f"[{host}] {b.name}: killed {value} process(es)")
    total = len(ctx.info.cluster_nodes)
    if errors:
        raise HostsFailed(errors, total=total)
    print(f"{', '.join(b.name for b in ctx.benches)}: nothing left running on {total} hosts")


def _kill_run(c, *, config, run_id: str) -> None:
    ctx = _context(c, config, None)
    with closing(ctx.every_host()) as grp:
        master = next(cxn for cxn in grp if cxn.host == ctx.info.master.host)
        entry = detached.find(master, run_id=run_id)
        if not entry.kept:
            _end(ctx, grp, entry.state, by="exp.killall --run")
            return
        if errors := runlib.end_kept(grp, bench=ctx.registry.get(entry.state.benchmark), run_id=entry.state.run_id):
            raise HostsFailed(errors, total=len(ctx.info.cluster_nodes))
    print(f"{entry.state.benchmark} run {entry.state.run_id}: its kept processes killed on every host")


def _end(ctx: _Context, grp: hostlib.CappedGroup, state: detached.RunState, *, by: str) -> None:
    """End one run in flight, killed by ``by``; say where its record is."""
    record = runlib.end_in_flight(state, info=ctx.info, registry=ctx.registry, settings=ctx.conf, status="killed",
                                  error=f"killed by {by}", by=by, connections={c.host: c for c in grp})
    if record is None:
        print(f"{state.benchmark} run {state.run_id}: killed on every host; the session that follows it records it")
        return
    folder = runlib.local_run_dir(ctx.conf.runs_dir, benchmark=state.benchmark, run_id=state.run_id)
    print(f"{state.benchmark} run {state.run_id}: {record.status}; its processes killed, its logs and run.json in "
          f"{folder}/")


def _pick_run(conf: Settings, benchmark: str, run_id: str | None) -> str:
    if run_id:
        return runlib.validate_run_id(run_id)
    past = runlib.local_runs(conf.runs_dir, benchmark=benchmark)
    if not past:
        raise Exit(f"no past run of {benchmark} in {conf.runs_dir}/; pass --run RUN_ID", code=1)
    return past[-1].run_id


@task(help={"benchmark": BENCH_HELP, "run": "run id (default: the latest run in runs/)", "config": CONFIG_HELP})
def logs(c, benchmark=None, run=None, config=None):
    """Download a run's logs from every host into runs/{benchmark}/{run_id}/."""
    ctx = _context(c, config, _require(benchmark))
    name = ctx.bench.name
    run_id = _pick_run(ctx.conf, name, run)
    local_dir = runlib.local_run_dir(ctx.conf.runs_dir, benchmark=name, run_id=run_id)
    with closing(ctx.every_host()) as grp:
        got = runlib.collect(grp, master=ctx.info.master.host, info=ctx.info, registry=ctx.registry,
                             settings=ctx.conf, benchmark=name, run_id=run_id, local_dir=local_dir)
    if got.errors:
        raise HostsFailed(got.errors, total=len(ctx.info.cluster_nodes))
    if got.record is None and not got.had:
        raise Exit(f"no host has logs of {name} run {run_id} ({_remote_dir(name, run_id)})", code=1)
    print(f"logs of {name} run {run_id} in {local_dir}/"
          + (f"; run.json completed: {got.record.status}" if got.record else "")
          + (f"; the run is in flight (inv exp.attach --run {run_id} finishes it)" if got.running else ""))


@task(help={"benchmark": BENCH_HELP, "run": "run id to remove (default: the latest run in runs/)",
            "all": "remove every run of the benchmark (or of every benchmark without --benchmark)",
            "config": CONFIG_HELP})
def clean(c, benchmark=None, run=None, all=False, config=None):
    """Remove a run's logs from every host (local copies in runs/ are kept)."""
    ctx = _context(c, config, benchmark)
    bench = ctx.bench
    if not all and not bench:
        raise Exit("--benchmark NAME is required unless --all", code=1)
    run_id = None if all else _pick_run(ctx.conf, bench.name, run)
    with closing(ctx.every_host()) as grp:
        errors, had = runlib.clean_remote(grp, benchmark=bench.name if bench else None, run_id=run_id)
    what = run_id or ("every run of " + bench.name if bench else "every run")
    print(f"removed {what} from {len(had)} hosts" if had else f"no host had {what}; nothing to remove")
    if errors:
        raise HostsFailed(errors, total=len(ctx.info.cluster_nodes))


@task(help={"benchmark": "show only this benchmark's runs"})
def list_(c, benchmark=None):
    """List the benchmarks in experiments.yaml and the past runs in runs/."""
    conf = settings(c)
    registry = load_registry(conf.experiments)
    table(f"benchmarks ({registry.source})", ("name", "directory", "binary", "ports (manager/master/workers)", "timeout"),
          [[b.name, b.dir, b.binary, f"{b.manager_port}/{b.master_port}/{b.worker_base}+", f"{b.timeout:g}s"]
           for b in registry.benchmarks.values()])
    runs_table(conf.runs_dir, runlib.local_runs(conf.runs_dir, benchmark=benchmark))


@task(help={"benchmark": BENCH_HELP + " (default: every benchmark)", "config": CONFIG_HELP})
def make(c, benchmark=None, config=None):
    """Run the benchmark's build command on every host in parallel."""
    ctx = _context(c, config, benchmark)
    nodes = ctx.info.cluster_nodes
    failed: dict[str, str] = {}
    for b in ctx.benches:
        start = time.monotonic()
        outputs = clusterlib.run(ctx.info, runlib.build_command(b), nodes=nodes, settings=ctx.conf)
        for out in outputs:
            if out.error or out.exited != 0:
                tail = (out.stderr or out.stdout).strip().splitlines()
                failed[out.host] = f"{b.name}: " + (out.error or f"exit {out.exited}") + (f": {tail[-1]}" if tail else "")
            else:
                print(f"[{out.host}] {b.name}: built")
        print(f"{b.name}: built on {len(outputs) - len(failed)}/{len(outputs)} hosts in {time.monotonic() - start:.1f}s")
    if failed:
        raise HostsFailed(failed, total=len(nodes))


@task(help={"benchmark": BENCH_HELP, "k": "comma-separated worker host counts, e.g. 1,2,4,8 (default: 1)",
            "p": "comma-separated processes per host, e.g. 1,4 (default: 1)",
            "args_grid": "FLAG=v1,v2: one more grid axis passed to the master as FLAG v (repeatable; "
                         "a bare name means --name)",
            "repeat": "runs of every combination (a larger value later adds runs to the same sweep)",
            "name": "sweep name (default: benchmark + a hash of the grid); the same name resumes",
            "fail_fast": "stop at the first failed combination", "config": CONFIG_HELP,
            "retry_failed": "run the combinations that failed before again (resuming skips them otherwise)",
            "timeout": "seconds each master may run (default: the benchmark's timeout)",
            "manager": "start the manager on the master first in every run (default: yes when the benchmark "
                       "has one; --no-manager to skip)",
            "repair": "when a run fails because a worker is gone, repair the cluster and run it again "
                      "(without: the sweep stops and says how to repair and resume)",
            "repair_limit": "at most this many repairs in one sweep (with --repair)",
            "spot_fallback": "ec2, with --repair: replace a reclaimed spot worker on demand if spot is refused"},
      iterable=["args_grid"])
def sweep(c, benchmark=None, k="1", p="1", args_grid=None, repeat=1, name=None, fail_fast=False, config=None,
          timeout=None, retry_failed=False, manager=True, repair=False, repair_limit=3, spot_fallback=False):
    """Run every k x p x args combination, resumably; write results.csv and plot.png."""
    timeout = number("--timeout", timeout, float, positive=True)
    ctx = _context(c, config, _require(benchmark))
    bench = ctx.bench
    ks = sweeplib.parse_int_list(k, flag="-k")
    ps = sweeplib.parse_int_list(p, flag="-p")
    grid = sweeplib.parse_args_grid(list(args_grid or []))
    repeat = int(repeat)
    if repeat < 1:
        raise Exit("--repeat: expected a positive integer", code=1)
    if max(ks) > len(ctx.info.workers):
        raise Exit(f"-k {max(ks)}: the cluster has {len(ctx.info.workers)} workers", code=1)
    grid_spec = {"benchmark": bench.name, "k": ks, "p": ps, "grid": grid}
    sweep_name = name or sweeplib.default_name(bench.name, grid_spec)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sweep_name):
        raise Exit(f"--name {sweep_name!r}: expected letters, digits, '_', '.' or '-'", code=1)
    state = sweeplib.SweepState(Path(ctx.conf.runs_dir) / "sweeps" / sweep_name, grid_spec, metric=bench.metric_name)
    if retry_failed and (dropped := state.drop_failed()):
        print(f"retrying {dropped} failed combination(s)")
    all_combos = sweeplib.combos(ks=ks, ps=ps, grid=grid, repeat=repeat)

    cluster = SweepCluster(ctx.cfg, settings=ctx.conf, info=ctx.info, spot_fallback=spot_fallback, say=print)
    healing = sweeplib.Healing(lost=cluster.lost, repair=cluster.repair if repair else None,
                               limit=number("--repair-limit", repair_limit), resume=sweeplib.resume_command(
                                   spec=grid_spec, name=sweep_name, repeat=repeat, config=config, timeout=timeout,
                                   manager=manager))

    def cleanup_interrupted(run_id):
        pool = cluster.connections()
        for entry in detached.in_flight(pool[ctx.info.master.host], run_id=run_id):
            runlib.end_in_flight(entry.state, info=ctx.info, registry=ctx.registry, settings=ctx.conf,
                                 status="interrupted", error="its exp.sweep ended during the run; ended when the "
                                 "sweep resumed", by="exp.sweep", connections=pool)

    def refuse(seconds):
        rows = clusterlib.status(ctx.cfg, settings=ctx.conf)
        return budget.would_cross(ctx.cfg, rows, seconds=seconds)

    with closing(cluster):
        sweep_with_progress(sweep_name, state=state, all_combos=all_combos, cleanup_interrupted=cleanup_interrupted,
                            run_one=functools.partial(cluster.run, bench=bench, timeout=timeout, manager=manager),
                            fail_fast=fail_fast,
                            refuse=refuse if ctx.cfg.budget else None, healing=healing)
    image = sweeplib.plot(state, benchmark=bench.name, metric_name=bench.metric_name if bench.metric else None)
    lines, failed = sweeplib.summary(state, image=image)
    print("\n".join(lines))
    if failed:
        raise Exit(failed, code=1)


@task(help={"run": RUN_HELP})
def show(c, run):
    """Show a run: parameters, hosts, phases, exit codes, metric, resources."""
    folder, record = present.load_run(run, runs_dir=settings(c).runs_dir)
    for title, columns, rows in present.show(record, folder=folder):
        table(title, columns, rows)


@task(help={"run_a": RUN_HELP, "run_b": RUN_HELP + ", compared with RUN_A"})
def compare(c, run_a, run_b):
    """Compare two runs side by side, marking what differs."""
    runs_dir = settings(c).runs_dir
    (_, a), (_, b) = present.load_run(run_a, runs_dir=runs_dir), present.load_run(run_b, runs_dir=runs_dir)
    sections, differing = present.compare(a, b)
    for title, columns, rows in sections:
        table(title, columns, rows)
    print(f"differ in: {', '.join(differing)}" if differing else "same parameters, commit, machines and status")


ns = Collection("exp", run, attach, ps, manager, workers, master, killall, logs, clean, make, sweep, show, compare)
ns.add_task(list_, name="list")
