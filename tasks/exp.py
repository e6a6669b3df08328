"""exp.*: run benchmarks on the cluster and keep every log of a run together."""

from __future__ import annotations

import logging
import re
import shlex
import sys
import time
from pathlib import Path

from invoke import Collection, Exit

from cloister import cluster as clusterlib
from cloister import hosts as hostlib
from cloister import runs as runlib
from cloister.errors import HostsFailed
from cloister.experiments import load_registry, parse_args, remote_dir, render, RunShape

from ._common import load, number, settings, task

BENCH_HELP = "benchmark name from experiments.yaml"
CONFIG_HELP = "cluster config JSON (default: cloister.config in invoke.yaml)"
K_HELP = "number of worker hosts: the first K of servers.txt (default: every worker)"
P_HELP = "worker processes per host"
ARGS_HELP = "extra arguments for the master, e.g. --args='-n 5' (shell operators are refused)"


def _logging() -> None:
    logger = logging.getLogger("cloister")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _context(c, config, benchmark):
    cfg = load(c, config)
    conf = settings(c)
    registry = load_registry(c.cloister.experiments)
    bench = registry.get(benchmark) if benchmark else None
    info = clusterlib.ensure_running(cfg, settings=conf)
    return cfg, conf, bench, info


def _require(benchmark):
    if not benchmark:
        raise Exit("--benchmark NAME is required (see inv exp.list)", code=1)
    return benchmark


def _new_run(c, *, config, benchmark, k, p, args=None, timeout=None, manager=True, keep=False, run_id=None):
    k, timeout = number("-k", k, positive=True), number("--timeout", timeout, float, positive=True)
    cfg, conf, bench, info = _context(c, config, _require(benchmark))
    return runlib.Run(info=info, bench=bench, k=len(info.workers) if k is None else k, nprocs=int(p),
                      args=parse_args(args), runs_dir=c.cloister.runs_dir, concurrency=conf.concurrency,
                      connect_timeout=conf.connect_timeout, manager=manager, timeout=timeout, keep=keep,
                      run_id=runlib.validate_run_id(run_id) if run_id else None, config_name=cfg.source,
                      out=sys.stdout)


def _summary(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{record['benchmark']} run {record['run_id']}: {record['status']}")
    for column in ("role", "host", "processes", "status", "exit codes"):
        table.add_column(column)
    rows: dict[tuple[str, str], list[dict]] = {}
    for proc in record["roles"]:
        rows.setdefault((proc["role"], proc["host"]), []).append(proc)
    for (role, host), procs in rows.items():
        statuses = sorted({p["status"] for p in procs})
        exits = sorted({str(p["exit"]) for p in procs if p["exit"] is not None})
        table.add_row(role, host, str(len(procs)), ",".join(statuses), ",".join(exits) or "-")
    Console(stderr=False).print(table)


@task(help={"benchmark": BENCH_HELP, "k": K_HELP, "p": P_HELP, "config": CONFIG_HELP,
            "timeout": "seconds the master may run (default: the benchmark's timeout)",
            "manager": "start the manager on the master first (default: yes; --no-manager to skip)",
            "keep": "leave the processes running after the run (stop them with inv exp.killall)",
            "args": ARGS_HELP})
def run(c, benchmark=None, k=None, p=1, config=None, timeout=None, manager=True, keep=False, args=None):
    """Run a benchmark end to end: workers, master, logs, clean-up, run.json."""
    _logging()
    run_ = _new_run(c, config=config, benchmark=benchmark, k=k, p=p, args=args, timeout=timeout,
                    manager=manager, keep=keep)
    result = run_.execute()
    _summary(result.record)
    print(f"logs: {result.local_dir}/ (run.json, one folder per host)")
    if result.record.get("metric") is not None:
        print(f"{run_.bench.metric_name}: {result.record['metric']}")
    if not result.ok:
        lines = [f"[{host}] {err}" for host, err in result.failures.items()]
        if result.record.get("error") and not lines:
            lines.append(result.record["error"])
        total = 1 + run_.k
        # A start-up crash or a timeout is in the error line, not in failures: no "0/N hosts failed".
        lines.append(f"run {result.run_id} {result.status}"
                     + (f": {len(result.failures)}/{total} hosts failed" if result.failures else ""))
        raise Exit("\n".join(lines), code=1)


def _start_role(c, role, *, config, benchmark, k, p, args, run_id):
    _logging()
    run_ = _new_run(c, config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run_id, keep=True)
    try:
        if role == "manager":
            procs = [run_.start_manager()]
        elif role == "workers":
            procs = run_.start_workers()
        else:
            procs = [run_.run_master()]
    except BaseException:
        run_.kill()
        raise
    finally:
        run_.download()
        run_.group.close()
        run_.record_by_hand()
    for proc in procs:
        print(f"[{proc.host}] {proc.key} pid {proc.pid} {proc.status}"
              + ("" if proc.exit is None else f" exit {proc.exit}"))
    print(f"run id {run_.run_id}; logs in ~/{runlib.REMOTE_RUNS}/{run_.bench.name}/{run_.run_id}/ "
          f"(pass --run {run_.run_id} to the other roles; stop with inv exp.killall)")
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
    cfg, conf, bench, info = _context(c, config, _require(benchmark))
    k = len(info.workers) if k is None else number("-k", k)
    workers = info.workers[:k]
    address = info.master.private or info.master.host
    shape = RunShape(run_id=run or runlib.new_run_id(), k=k, nprocs=int(p), manager=address,
                     workers=[(w.private or w.host, bench.worker_port(j)) for w in workers for j in range(int(p))],
                     args=parse_args(args))
    command = render(bench, "manager", shape, host=address, port=bench.manager_port)
    prelude = f"cd {remote_dir(bench.dir)}"
    if bench.vars_file:
        prelude += f" && if [ -f {shlex.quote(bench.vars_file)} ]; then . ./{shlex.quote(bench.vars_file)}; fi"
    exports = "".join(f" && export {key}={shlex.quote(value)}" for key, value in bench.env.items())
    c.run(f"{prelude}{exports} && {command}", pty=False)


@task(help=ROLE_HELP)
def workers(c, benchmark=None, k=None, p=1, config=None, args=None, run=None):
    """Start the benchmark's worker processes on the first K servers and wait until they listen."""
    _start_role(c, "workers", config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run)


@task(help=ROLE_HELP)
def master(c, benchmark=None, k=None, p=1, config=None, args=None, run=None):
    """Run the benchmark's master (driver) on the master and stream its output."""
    _start_role(c, "master", config=config, benchmark=benchmark, k=k, p=p, args=args, run_id=run)


@task(help={"benchmark": BENCH_HELP + " (default: every benchmark)", "config": CONFIG_HELP})
def killall(c, benchmark=None, config=None):
    """Kill a benchmark's processes and free its ports on every host."""
    cfg, conf, bench, info = _context(c, config, benchmark)
    registry = load_registry(c.cloister.experiments)
    benches = [bench] if bench else list(registry.benchmarks.values())
    grp = hostlib.group(info, info.cluster_nodes, concurrency=conf.concurrency, connect_timeout=conf.connect_timeout)
    errors: dict[str, str] = {}
    try:
        for b in benches:
            for host, value in runlib.killall(grp, b).items():
                if isinstance(value, BaseException):
                    errors[host] = hostlib.describe_error(value)
                elif value:
                    print(f"[{host}] {b.name}: killed {value} process(es)")
    finally:
        grp.close()
    if errors:
        raise HostsFailed(errors, total=len(info.cluster_nodes))
    print(f"{', '.join(b.name for b in benches)}: nothing left running on {len(info.cluster_nodes)} hosts")


def _pick_run(c, benchmark, run_id):
    if run_id:
        return runlib.validate_run_id(run_id)
    past = runlib.local_runs(c.cloister.runs_dir, benchmark)
    if not past:
        raise Exit(f"no past run of {benchmark} in {c.cloister.runs_dir}/; pass --run RUN_ID", code=1)
    return past[-1]["run_id"]


@task(help={"benchmark": BENCH_HELP, "run": "run id (default: the latest run in runs/)", "config": CONFIG_HELP})
def logs(c, benchmark=None, run=None, config=None):
    """Download a run's logs from every host into runs/{benchmark}/{run_id}/."""
    cfg, conf, bench, info = _context(c, config, _require(benchmark))
    run_id = _pick_run(c, bench.name, run)
    local_dir = Path(c.cloister.runs_dir) / bench.name / run_id
    grp = hostlib.group(info, info.cluster_nodes, concurrency=conf.concurrency, connect_timeout=conf.connect_timeout)
    try:
        errors = runlib.download_run(grp, benchmark=bench.name, run_id=run_id, local_dir=local_dir)
    finally:
        grp.close()
    if errors:
        raise HostsFailed(errors, total=len(info.cluster_nodes))
    if not local_dir.is_dir():
        raise Exit(f"no host has logs of {bench.name} run {run_id} (~/{runlib.REMOTE_RUNS}/{bench.name}/{run_id}/)",
                   code=1)
    print(f"logs of {bench.name} run {run_id} in {local_dir}/")


@task(help={"benchmark": BENCH_HELP, "run": "run id to remove (default: the latest run in runs/)",
            "all": "remove every run of the benchmark (or of every benchmark without --benchmark)",
            "config": CONFIG_HELP})
def clean(c, benchmark=None, run=None, all=False, config=None):
    """Remove a run's logs from every host (local copies in runs/ are kept)."""
    cfg, conf, bench, info = _context(c, config, benchmark)
    if not all and not bench:
        raise Exit("--benchmark NAME is required unless --all", code=1)
    run_id = None if all else _pick_run(c, bench.name, run)
    grp = hostlib.group(info, info.cluster_nodes, concurrency=conf.concurrency, connect_timeout=conf.connect_timeout)
    try:
        errors, had = runlib.clean_remote(grp, benchmark=bench.name if bench else None, run_id=run_id)
    finally:
        grp.close()
    what = run_id or ("every run of " + bench.name if bench else "every run")
    print(f"removed {what} from {len(had)} hosts" if had else f"no host had {what}; nothing to remove")
    if errors:
        raise HostsFailed(errors, total=len(info.cluster_nodes))


@task(help={"benchmark": "show only this benchmark's runs"})
def list_(c, benchmark=None):
    """List the benchmarks in experiments.yaml and the past runs in runs/."""
    from rich.console import Console
    from rich.table import Table

    registry = load_registry(c.cloister.experiments)
    console = Console()
    table = Table(title=f"benchmarks ({registry.source})")
    for column in ("name", "directory", "binary", "ports (manager/master/workers)", "timeout"):
        table.add_column(column, overflow="fold")
    for b in registry.benchmarks.values():
        table.add_row(b.name, b.dir, b.binary, f"{b.manager_port}/{b.master_port}/{b.worker_base}+",
                      f"{b.timeout:g}s")
    console.print(table)
    past = runlib.local_runs(c.cloister.runs_dir, benchmark)
    runs_table = Table(title=f"past runs ({c.cloister.runs_dir}/)")
    for column in ("benchmark", "run id", "k", "p", "status", "duration", "metric"):
        # A run id is copied into --run: never cut it.
        runs_table.add_column(column, no_wrap=column == "run id", min_width=20 if column == "run id" else None,
                              overflow="fold")
    for r in past:
        total = (r.get("timings") or {}).get("total_s")
        runs_table.add_row(r.get("benchmark", "?"), r.get("run_id", "?"), str(r.get("k")), str(r.get("p")),
                           r.get("status", "?"), "-" if total is None else f"{total:.1f}s",
                           "-" if r.get("metric") is None else str(r["metric"]))
    console.print(runs_table)


@task(help={"benchmark": BENCH_HELP + " (default: every benchmark)", "config": CONFIG_HELP})
def make(c, benchmark=None, config=None):
    """Run the benchmark's build command on every host in parallel."""
    cfg, conf, bench, info = _context(c, config, benchmark)
    registry = load_registry(c.cloister.experiments)
    failed: dict[str, str] = {}
    for b in [bench] if bench else list(registry.benchmarks.values()):
        prelude = f"cd {remote_dir(b.dir)}"
        if b.vars_file:
            prelude += f" && if [ -f {shlex.quote(b.vars_file)} ]; then . ./{shlex.quote(b.vars_file)}; fi"
        start = time.monotonic()
        outputs = clusterlib.run(info, f"{prelude} && {b.build}", nodes=info.cluster_nodes, settings=conf)
        for out in outputs:
            if out.error or out.exited != 0:
                tail = (out.stderr or out.stdout).strip().splitlines()
                failed[out.host] = f"{b.name}: " + (out.error or f"exit {out.exited}") + (f": {tail[-1]}" if tail else "")
            else:
                print(f"[{out.host}] {b.name}: built")
        print(f"{b.name}: built on {len(outputs) - len(failed)}/{len(outputs)} hosts in {time.monotonic() - start:.1f}s")
    if failed:
        raise HostsFailed(failed, total=len(info.cluster_nodes))


@task(help={"benchmark": BENCH_HELP, "k": "comma-separated worker host counts, e.g. 1,2,4,8 (default: 1)",
            "p": "comma-separated processes per host, e.g. 1,4 (default: 1)",
            "args_grid": "FLAG=v1,v2: one more grid axis passed to the master as FLAG v (repeatable; "
                         "a bare name means --name)",
            "repeat": "runs of every combination (a larger value later adds runs to the same sweep)",
            "name": "sweep name (default: benchmark + a hash of the grid); the same name resumes",
            "fail_fast": "stop at the first failed combination", "config": CONFIG_HELP,
            "retry_failed": "run the combinations that failed before again (resuming skips them otherwise)",
            "timeout": "seconds each master may run (default: the benchmark's timeout)"},
      iterable=["args_grid"])
def sweep(c, benchmark=None, k="1", p="1", args_grid=None, repeat=1, name=None, fail_fast=False, config=None,
          timeout=None, retry_failed=False):
    """Run every k x p x args combination, resumably; write results.csv and plot.png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from cloister import sweep as sweeplib

    timeout = number("--timeout", timeout, float, positive=True)
    cfg, conf, bench, info = _context(c, config, _require(benchmark))
    ks = sweeplib.parse_int_list(k, flag="-k")
    ps = sweeplib.parse_int_list(p, flag="-p")
    grid = sweeplib.parse_args_grid(list(args_grid or []))
    repeat = int(repeat)
    if repeat < 1:
        raise Exit("--repeat: expected a positive integer", code=1)
    if max(ks) > len(info.workers):
        raise Exit(f"-k {max(ks)}: the cluster has {len(info.workers)} workers", code=1)
    spec = {"benchmark": bench.name, "k": ks, "p": ps, "grid": grid}
    sweep_name = name or sweeplib.default_name(bench.name, spec)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sweep_name):
        raise Exit(f"--name {sweep_name!r}: expected letters, digits, '_', '.' or '-'", code=1)
    state = sweeplib.SweepState(Path(c.cloister.runs_dir) / "sweeps" / sweep_name, spec)
    if retry_failed and (dropped := state.drop_failed()):
        print(f"retrying {dropped} failed combination(s)")
    all_combos = sweeplib.combos(ks=ks, ps=ps, grid=grid, repeat=repeat)

    def run_one(combo, run_id):
        run_ = runlib.Run(info=info, bench=bench, k=combo.k, nprocs=combo.p, args=list(combo.args),
                          runs_dir=c.cloister.runs_dir, concurrency=conf.concurrency,
                          connect_timeout=conf.connect_timeout, timeout=timeout,
                          run_id=run_id, config_name=cfg.source)
        return run_.execute().record

    def cleanup_interrupted(run_id):
        grp = hostlib.group(info, info.cluster_nodes, concurrency=conf.concurrency,
                            connect_timeout=conf.connect_timeout)
        try:
            hostlib.call(grp, lambda cxn: cxn.run(runlib.kill_script(bench, run_id), warn=True, timeout=60))
        finally:
            grp.close()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task(f"sweep {sweep_name}", total=len(all_combos))

        def on_progress(done, total, combo):
            progress.update(bar, completed=done,
                            description=f"sweep {sweep_name}: " + (combo.key if combo else "done"))

        try:
            rows = sweeplib.run_sweep(state=state, all_combos=all_combos, run_one=run_one,
                                      cleanup_interrupted=cleanup_interrupted, fail_fast=fail_fast,
                                      on_progress=on_progress)
        except KeyboardInterrupt:
            raise Exit(f"interrupted: {len(state.rows)}/{len(all_combos)} runs of sweep {sweep_name} recorded; "
                       f"the same command resumes it", code=130)
    image = sweeplib.plot(state, benchmark=bench.name, metric_name=bench.metric_name if bench.metric else None)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} runs in {state.csv_path}" + (f"; plot {image}" if image else ""))
    if failed:
        raise Exit(f"{len(failed)}/{len(rows)} runs failed: "
                   + ", ".join(f"k={r['k']} p={r['p']} {r['status']} ({r['run_id']})" for r in failed[:5]), code=1)


ns = Collection("exp", run, manager, workers, master, killall, logs, clean, make, sweep)
ns.add_task(list_, name="list")
