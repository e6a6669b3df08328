"""cluster.*: launch, inspect, use and tear down a cluster."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from invoke import Collection, Exit

from cloister.cluster import lifecycle as lib
from cloister.cluster import resize as resizelib
from cloister.transport import hosts as hostlib
from cloister.cluster import budget
from cloister import deploy, layout
from cloister.transport import putget
from cloister.config import label_overrides
from cloister.errors import CloisterError, HostsFailed, Interrupted
from cloister import runs as runlib
from cloister.runs import lock as runlock
from cloister.transport.transfer import Transfer, failures

from ._common import interrupted, load, number, settings, task
from ._output import confirm, files, progress_bar, records, size, warning

CONFIG_HELP = "cluster config JSON (default: cloister.config in invoke.yaml)"


@task(help={"config": CONFIG_HELP, "nworkers": "number of workers (overrides the config's nworkers)",
            "wait": "wait for SSH on every node and copy servers/ to them (--no-wait: return once the "
                    "instances run, with servers/ written)",
            "name": "cluster name (overrides the config's cluster_name)",
            "label": "the old scripts' -l: names the cluster and its AMI prefix (cluster_name and ami_tag)",
            "dry_run": "ec2: print the plan (AMI, types, zone, counts, rules, TTL, $/hour), check what would make "
                       "the launch fail (permissions with EC2's DryRun, key pair, architectures, vCPU quotas), "
                       "create nothing",
            "ttl": "ec2: the instances terminate themselves after this, e.g. 6h or 90m; 0 disables "
                   "(overrides the config's ttl)",
            "yes": "ec2: if the launch fails or is interrupted, terminate what it created without asking",
            "keep_on_failure": "ec2: if the launch fails, keep what it created (to look at it); without it a "
                               "failed launch with no terminal (cron, CI, nohup) terminates what it created"})
def launch(c, config=None, nworkers=None, wait=True, name=None, dry_run=False, ttl=None, yes=False, label=None,
           keep_on_failure=False):
    """Launch the cluster (or find the running one), wait for SSH and write servers/."""
    cfg = load(c, config, nworkers=number("--nworkers", nworkers), ttl=ttl,
               **label_overrides(label=label, name=name))
    conf = settings(c)
    if dry_run:
        plan = lib.plan(cfg, settings=conf)
        for line in plan.lines():
            print(line)
        if plan.failures:
            raise Exit(f"dry run: {len(plan.failures)} check(s) say the launch would fail (FAILS above)", code=1)
        return
    for text in lib.provider(cfg, settings=conf).launch_warnings():
        warning(text)
    if yes and keep_on_failure:
        raise Exit("--yes terminates what a failed launch created, --keep-on-failure keeps it: give one", code=1)
    start = time.monotonic()
    try:
        with progress_bar() as bar:
            result = lib.launch(cfg, settings=conf, wait=wait, confirm=_on_failure(bar, yes=yes, keep=keep_on_failure),
                                progress=bar.update)
    except KeyboardInterrupt as stopped:
        # What the clean-up really did when there was one, else what the provider can say.
        note = f"; {stopped.outcome}" if isinstance(stopped, Interrupted) else \
            lib.provider(cfg, settings=conf).interrupted_note()
        raise interrupted(f"interrupted: launch of '{cfg.cluster_name}' stopped{note}")
    info = result.info
    if result.replaced:
        print(f"note: {conf.servers_dir}/ described cluster '{result.replaced}', which this launch does not "
              f"stop; tasks now address '{cfg.cluster_name}' (give each cluster its own INVOKE_CLOISTER_SERVERS_DIR "
              f"to use both)", file=sys.stderr)
    verb = "launched" if result.created else "found running"
    print(f"{verb} {cfg.provider} cluster '{cfg.cluster_name}': 1 master, {len(info.workers)} workers"
          + (", 1 dev host" if info.dev else "") + f" in {time.monotonic() - start:.1f}s")
    print(f"master {info.master.host if info.master else '-'}; servers/ written to {conf.servers_dir}/")


def _on_failure(bar, *, yes: bool, keep: bool):
    """Who decides what a failed launch leaves: nobody asks with --yes or without a terminal (cron, CI,
    nohup), where instances nobody looks at would bill until their TTL; at a terminal the user does,
    and Enter terminates."""
    if keep:
        return lambda question: False
    if yes or not sys.stdin or not sys.stdin.isatty():
        return None
    return lambda question: bar.confirm(question, default=True)


@task(help={"config": CONFIG_HELP, "yes": "do not ask for confirmation (a run in flight is ended and its logs "
                                           "collected first)"})
def destroy(c, config=None, yes=False):
    """Destroy the cluster named in the config and forget its servers/."""
    cfg = load(c, config)
    conf = settings(c)
    try:
        info = lib.current(cfg, settings=conf)
    except CloisterError:  # no servers/ of this cluster: nothing recorded to ask
        info = None
    confirmed = bool(info) and _end_runs_first(info, conf=conf, cluster=cfg.cluster_name, yes=yes)
    # A provider that asks itself does so once it knows what it would end.
    asks = lib.provider(cfg, settings=conf).confirms_destroy
    if not asks and not yes and not confirmed and not confirm(f"Destroy {cfg.provider} cluster '{cfg.cluster_name}'?"):
        raise Exit("not confirmed; pass --yes to destroy without asking", code=1)
    with progress_bar() as bar:
        messages = lib.destroy(cfg, settings=conf, confirm=None if yes else bar.confirm, progress=bar.update)
    for message in messages:
        print(message)


def _end_runs_first(info, *, conf, cluster: str, yes: bool) -> bool:
    """A run in flight is ended and its logs collected before its nodes go (asked first, unless ``yes``):
    whether the destroy was confirmed on the way."""
    states = runlib.runs_in_flight(info, settings=conf)
    if not states:
        busy = runlock.in_flight_on(info, connect_timeout=min(conf.connect_timeout, 5.0))
        if busy:  # a run left running by --keep: its logs were collected when it ended
            warning(f"{busy} is still running on '{cluster}' (--keep); destroying ends it")
        return False
    names = ", ".join(f"{s.benchmark} run {s.run_id}" for s in states)
    if not yes and not confirm(f"{names} in flight on '{cluster}': end it, collect its logs, then destroy?"):
        raise Exit("not confirmed; pass --yes to end the run, collect its logs and destroy without asking", code=1)
    warning(f"{names} in flight on '{cluster}': ending it and collecting its logs before destroying")
    for name, outcome in runlib.end_before_destroy(states, info=info, settings=conf).items():
        print(f"{name}: {outcome}; run.json in {conf.runs_dir}/", file=sys.stderr)
    return True


@task(help={"config": CONFIG_HELP})
def status(c, config=None):
    """Show every node of the cluster with its role, state and uptime, and every recorded node that is gone."""
    cfg = load(c, config)
    conf = settings(c)
    prov = lib.provider(cfg, settings=conf)
    rows = lib.status(cfg, settings=conf)
    gone = [r for r in rows if r.state == "gone"]
    said = "; ".join(f"{r.name or r.role} ({r.id}) {r.why}" for r in gone)
    if len(gone) == len(rows):
        raise Exit(f"no {cfg.provider} cluster '{cfg.cluster_name}' is running; run inv cluster.launch"
                   + (f" (servers/ records {len(gone)} nodes, gone: {said})" if gone else ""), code=1)
    records(f"{cfg.provider} cluster '{cfg.cluster_name}'", [dataclasses.asdict(r) for r in rows],
            ("role", "id", "host", "type", "state", "uptime_s", "ttl_left_s", "cost", "why"),
            caption=prov.status_caption([r for r in rows if r not in gone]))
    over = budget.warning(cfg, rows)
    if over:
        warning(over)
    if gone:
        raise Exit(f"{len(gone)}/{len(rows)} nodes gone: {said}", code=1)
    down = [r for r in rows if r.state not in ("running", "reachable")]
    if down:
        raise Exit(f"{len(down)}/{len(rows)} nodes not running: " + ", ".join(r.id for r in down), code=1)


@task(help={"config": CONFIG_HELP, "worker": "log in to worker N (1-based) instead of the master",
            "dev": "log in to the dev host/instance"})
def login(c, config=None, worker=None, dev=False):
    """Log in to the master (or a worker, or the dev host) with the system ssh."""
    cfg = load(c, config)
    info = lib.ensure_running(cfg, settings=settings(c))
    if dev:
        node = info.dev
    elif worker is not None:
        index = number("--worker", worker)
        if not 1 <= index <= len(info.workers):
            raise Exit(f"--worker {index}: the cluster has workers 1..{len(info.workers)}", code=1)
        node = info.workers[index - 1]
    else:
        node = info.master
    if node is None:
        raise Exit(f"cluster '{cfg.cluster_name}' has no {'dev host' if dev else 'master'}", code=1)
    argv = hostlib.ssh_argv(info, node.host, sharing=lib.sharing(info, settings=settings(c)))
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@task(help={"config": CONFIG_HELP})
def copy_dns(c, config=None):
    """Copy servers/ and the known hosts to every node and the cluster key to the master."""
    cfg = load(c, config)
    conf = settings(c)
    count = lib.copy_dns(lib.ensure_running(cfg, settings=conf), settings=conf)
    print(f"copied servers/ to ~/{layout.SERVERS_DIR} on {count} nodes; key on the master")


@task(help={"command": "shell command to run on every selected host",
            "config": CONFIG_HELP,
            "role": "all (master and workers), master, workers or dev",
            "hosts": "comma-separated hosts (addresses or names) instead of a role",
            "stream": "print output live, each line prefixed [host], instead of folded at the end",
            "timeout": "seconds before the command is abandoned on a host"},
      positional=["command"])
def run(c, config=None, role="all", hosts=None, stream=False, timeout=None, command=None):
    """Run a shell command on every host in parallel and fold identical outputs.

    A host's output beyond 1 MiB, or binary (control characters other than colours, not UTF-8), is
    saved to {state_dir}/output/{time}/{host}.out (.err), named in the output instead of printed. Ctrl-C stops the command on every host and prints what came so far.
    """
    # `command` comes last so that -c means --config here as in every other task.
    if not command:
        raise Exit('give the command to run, e.g. inv cluster.run "hostname; uptime"', code=1)
    timeout = number("--timeout", timeout, float, positive=True)
    cfg = load(c, config)
    conf = settings(c)
    info = lib.ensure_running(cfg, settings=conf)
    nodes = hostlib.select_nodes(info, role=role, hosts=hosts.split(",") if hosts else None)
    try:
        outputs = lib.run(info, command, nodes=nodes, settings=conf, stream=sys.stdout if stream else None,
                          timeout=timeout)
    except lib.RunInterrupted as stopped:
        if not stream:
            _print_folded(stopped.outputs)
        raise Exit(f"interrupted: the command was stopped on {len(nodes)} hosts", code=130)
    if not stream:
        _print_folded(outputs)
    failed = lib.run_failures(outputs)
    if failed:
        raise Exit(str(failed), code=1)


def _print_folded(outputs: list[lib.HostOutput]) -> None:
    """One block per group of hosts with the same output (like ``clush -b``); a large output is not
    printed but named by the file it is in."""
    for names, out in lib.fold(outputs):
        print("-" * 15 + f"\n{','.join(names)} ({len(names)})" + (f" exit {out.exited}" if out.exited else "")
              + "\n" + "-" * 15)
        if out.error:
            print(f"error: {out.error}")
        for what, captured in (("stdout", out.out), ("stderr", out.err)):
            if captured.path:
                where = captured.path if len(names) == 1 else os.path.join(
                    os.path.dirname(captured.path), "{host}" + os.path.splitext(captured.path)[1])
                why = "binary, not printed" if captured.binary else "too large to print"
                print(f"[{what}: {size(captured.size)}, {why}; saved to {where}"
                      + (f" for each of these {len(names)} hosts (identical)]" if len(names) > 1 else "]"))
            elif captured.text:
                print(captured.text, end="" if captured.text.endswith("\n") else "\n")


def _moved(t: Transfer) -> str:
    text = f"{files(t.stats.files)}, {size(t.stats.size)}"
    if t.stats.deleted:
        text += f", {t.stats.deleted} deleted"
    return text + f" in {t.duration:.2f}s"


DRY_RUN_ITEMS = 20


@task(help={"config": CONFIG_HELP,
            "paths": "comma-separated paths relative to the dev instance's home (default: redeploy_paths)",
            "delete": "also delete files on the nodes that are gone from the dev instance",
            "dry_run": "show what would change on each node (rsync --dry-run --itemize-changes); change nothing",
            "tree": "broadcast tree: nodes that have the code pass it on, doubling each round"})
def redeploy(c, config=None, paths=None, delete=False, dry_run=False, tree=False):
    """Push the code from the dev instance to every node with rsync, in parallel."""
    cfg = load(c, config)
    conf = settings(c)
    info = lib.ensure_running(cfg, settings=conf)
    wanted = deploy.check_paths(paths.split(",") if paths is not None else cfg.redeploy_paths,
                                flag="--paths" if paths is not None else f"{cfg.source}: key 'redeploy_paths'")

    def skipped(path: str) -> None:
        print(f"warning: skipped {path}: not in the dev instance's home", file=sys.stderr)

    changes: dict[tuple[str, ...], list[str]] = {}

    def done(t: Transfer) -> None:
        if not t.ok:
            return
        if dry_run:
            s = t.stats
            print(f"[{t.host}] would send {files(s.files)} ({size(s.size)})"
                  + (f", delete {s.deleted}" if s.deleted else "") + f"; {s.changed} changed items", flush=True)
            if s.items:
                changes.setdefault(s.items, []).append(t.host)
        else:
            print(f"[{t.host}] {_moved(t)}" + (f" from {t.source}" if tree else ""), flush=True)

    report = deploy.redeploy(info, paths=wanted, delete=delete, dry_run=dry_run, tree=tree,
                             concurrency=conf.redeploy_concurrency, connect_timeout=conf.connect_timeout,
                             ami_instance_ip=cfg.ami_instance_ip,
                             dev_known_hosts=lib.dev_known_hosts(cfg, settings=conf),
                             sharing=lib.sharing(info, settings=conf), on_result=done, on_skip=skipped)
    for items, names in changes.items():
        # Nodes with the same itemized changes are listed once (like cluster.run folds outputs).
        print(f"changes on {','.join(names)} ({len(names)} nodes):")
        for item in items[:DRY_RUN_ITEMS]:
            print(f"  {item}")
        if len(items) > DRY_RUN_ITEMS:
            print(f"  ... and {len(items) - DRY_RUN_ITEMS} more")
    ok = sum(1 for t in report.transfers if t.ok)
    total = len(report.transfers)
    what = "dry run of" if dry_run else "redeployed"
    print(f"{what} {' '.join(report.paths)} from {report.dev} to {ok}/{total} nodes in {report.duration:.2f}s "
          f"({report.mode}, {conf.redeploy_concurrency} at a time, {report.auth} auth; "
          f"dev sent {size(report.dev_sent)})")
    if report.failed:
        raise HostsFailed(report.failed, total=total, what="dry run" if dry_run else "redeploy")


@task(help={"local": "local file or directory (a trailing '/' copies a directory's contents)",
            "remote": "destination on every node, relative to the home directory unless absolute",
            "config": CONFIG_HELP,
            "role": "all (master and workers), master, workers or dev"},
      positional=["local", "remote"])
def put(c, local, remote, config=None, role="all"):
    """Copy a local file or directory to every node in parallel."""
    _transfer(c, config, role, what="put",
              run=lambda info, nodes, conf, done: putget.put(
                  info, local, remote, nodes=nodes, concurrency=conf.concurrency,
                  connect_timeout=conf.connect_timeout, on_result=done, sharing=lib.sharing(info, settings=conf)),
              line=lambda t: f"[{t.host}] {_moved(t)}",
              summary=lambda ok, total, secs: f"copied {local} to {remote} on {ok}/{total} nodes in {secs:.2f}s")


def _transfer(c, config, role, *, what, run, line, summary):
    """Shared body of put and get: per-node lines as they finish, a summary, then the failures."""
    cfg = load(c, config)
    conf = settings(c)
    info = lib.ensure_running(cfg, settings=conf)
    nodes = hostlib.select_nodes(info, role=role)

    def done(t: Transfer) -> None:
        if t.ok:
            print(line(t), flush=True)

    start = time.monotonic()
    results = run(info, nodes, conf, done)
    failed = failures(results)
    print(summary(len(results) - len(failed), len(results), time.monotonic() - start))
    if failed:
        raise HostsFailed(failed, total=len(results), what=what)


@task(help={"remote": "file, directory or glob on the nodes, relative to the home directory unless absolute",
            "localdir": "local directory; each node's copy goes to LOCALDIR/{host}/",
            "config": CONFIG_HELP,
            "role": "all (master and workers), master, workers or dev"},
      positional=["remote", "localdir"])
def get(c, remote, localdir, config=None, role="all"):
    """Download a file or directory from every node into LOCALDIR/{host}/."""
    _transfer(c, config, role, what="get",
              run=lambda info, nodes, conf, done: putget.get(
                  info, remote, localdir, nodes=nodes, concurrency=conf.concurrency,
                  connect_timeout=conf.connect_timeout, on_result=done, sharing=lib.sharing(info, settings=conf)),
              line=lambda t: f"[{t.host}] {_moved(t)} -> {os.path.join(localdir, t.host)}/",
              summary=lambda ok, total, secs: f"fetched {remote} from {ok}/{total} nodes into {localdir}/ in {secs:.2f}s")


@task(help={"config": CONFIG_HELP})
def stop(c, config=None):
    """Stop the ec2 cluster's instances, keeping their EBS disks (start brings them back)."""
    cfg = load(c, config)
    with progress_bar() as bar:
        messages = lib.stop(cfg, settings=settings(c), progress=bar.update)
    for message in messages:
        print(message)


@task(help={"config": CONFIG_HELP,
            "wait": "wait for SSH on every node and copy servers/ to them (--no-wait: return once the "
                    "instances run, with servers/ rewritten)"})
def start(c, config=None, wait=True):
    """Start a stopped ec2 cluster and rewrite servers/ with its new addresses."""
    cfg = load(c, config)
    conf = settings(c)
    with progress_bar() as bar:
        info = lib.start(cfg, settings=conf, wait=wait, progress=bar.update)
    print(f"started ec2 cluster '{cfg.cluster_name}': {len(info.nodes)} nodes; master "
          f"{info.master.host if info.master else '-'}; servers/ rewritten in {conf.servers_dir}/")


@task(name="list", help={"config": CONFIG_HELP + "; its provider and region are listed",
                         "region": "ec2: list this region instead of the config's",
                         "reap": "first terminate stopped instances whose TTL has passed (their disks still bill)"})
def list_(c, config=None, region=None, reap=False):
    """List every cloister cluster (in the config's region for ec2), so none is forgotten."""
    cfg = load(c, config, region=region)
    if reap:
        for line in lib.reap(cfg, settings=settings(c)):
            print(line)
    prov = lib.provider(cfg, settings=settings(c))
    rows = prov.list_clusters()
    where = prov.scope()
    if not rows:
        print(f"no cloister clusters {where}")
        return
    records(f"cloister clusters {where}", [dataclasses.asdict(r) for r in rows],
                ("cluster", "masters", "workers", "states", "types", "age_s", "ttl_left_s"))


@task(help={"config": CONFIG_HELP, "ttl": "the new TTL, counted from now, e.g. 2h or 90m (required)"})
def extend(c, config=None, ttl=None):
    """Move the cluster's TTL: every node now powers itself off this long from now."""
    if ttl is None:
        raise Exit("pass --ttl DURATION, e.g. --ttl 2h: how long from now the cluster may live", code=1)
    cfg = load(c, config)
    for line in lib.extend(cfg, settings=settings(c), ttl=ttl):
        print(line)


@task(help={"config": CONFIG_HELP, "nworkers": "the number of workers the cluster should have (required)",
            "dry_run": "show what would be started or ended and the change in cost; change nothing",
            "wait": "wait for SSH on new workers and copy servers/ to every node (--no-wait: return once they run, "
                    "with servers/ written)"})
def resize(c, config=None, nworkers=None, dry_run=False, wait=True):
    """Grow or shrink the running cluster to N workers; rewrite servers/ on every node."""
    count = number("--nworkers", nworkers)
    if count is None:
        raise Exit("pass --nworkers N: how many workers the cluster should have", code=1)
    cfg = load(c, config)
    start = time.monotonic()
    with progress_bar() as bar:
        change = resizelib.resize(cfg, settings=settings(c), nworkers=count, dry_run=dry_run, wait=wait,
                                  progress=bar.update)
    for line in change.lines:
        print(line)
    if not dry_run and (change.added or change.removed):
        print("servers/ rewritten" + (f" and copied to {len(change.info.nodes)} nodes" if wait else "")
              + f" in {time.monotonic() - start:.1f}s")


@task(help={"config": CONFIG_HELP,
            "spot_fallback": "ec2: replace a spot worker on demand when EC2 refuses spot capacity",
            "wait": "wait for SSH on the replacements and copy servers/ to every node (--no-wait: return once "
                    "they run, with servers/ written)"})
def repair(c, config=None, spot_fallback=False, wait=True):
    """Replace the workers the provider no longer runs, keeping their numbers and servers/ order."""
    cfg = load(c, config)
    start = time.monotonic()
    with progress_bar() as bar:
        change = resizelib.repair(cfg, settings=settings(c), spot_fallback=spot_fallback, wait=wait,
                                  progress=bar.update)
    for line in change.lines:
        print(line)
    if change.replaced:
        print(f"repaired {len(change.replaced)} worker(s) in {time.monotonic() - start:.1f}s; servers/ rewritten"
              + (f" and copied to {len(change.info.nodes)} nodes" if wait else ""))


ns = Collection("cluster", launch, destroy, status, login, copy_dns, run, redeploy, put, get, stop, start, list_,
                extend, resize, repair)
