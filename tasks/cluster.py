"""cluster.*: launch, inspect, use and tear down a cluster."""

from __future__ import annotations

import os
import sys
import time

from invoke import Collection, Exit

from cloister import cluster as lib
from cloister import hosts as hostlib
from cloister.servers import ClusterInfo

from ._common import confirm, load, settings, task

CONFIG_HELP = "cluster config JSON (default: cloister.config in invoke.yaml)"


def _ssh_argv(info: ClusterInfo, host: str, command: list[str]) -> list[str]:
    argv = ["ssh", "-i", os.path.expanduser(info.ssh_key), "-o", "IdentitiesOnly=yes"]
    if info.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(info.known_hosts)}",
                 "-o", "StrictHostKeyChecking=accept-new"]
    return argv + [f"{info.user}@{host}", *command]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@task(help={"config": CONFIG_HELP, "nworkers": "number of workers (overrides the config's nworkers)",
            "wait": "wait for SSH on every node and copy servers/ to them (default: yes)"})
def launch(c, config=None, nworkers=None, wait=True):
    """Launch the cluster (or find the running one), wait for SSH and write servers/."""
    cfg = load(c, config, nworkers=None if nworkers is None else int(nworkers))
    start = time.monotonic()
    result = lib.launch(cfg, settings=settings(c), wait=wait)
    info = result.info
    verb = "launched" if result.created else "found running"
    print(f"{verb} {cfg.provider} cluster '{cfg.cluster_name}': 1 master, {len(info.workers)} workers"
          + (", 1 dev host" if info.dev else "") + f" in {time.monotonic() - start:.1f}s")
    print(f"master {info.master.host if info.master else '-'}; servers/ written to {settings(c).servers_dir}/")


@task(help={"config": CONFIG_HELP, "yes": "do not ask for confirmation"})
def destroy(c, config=None, yes=False):
    """Destroy the cluster named in the config and forget its servers/."""
    cfg = load(c, config)
    if not yes and not confirm(f"Destroy {cfg.provider} cluster '{cfg.cluster_name}'?"):
        raise Exit("not confirmed; pass --yes to destroy without asking", code=1)
    for message in lib.destroy(cfg, settings=settings(c)):
        print(message)


@task(help={"config": CONFIG_HELP})
def status(c, config=None):
    """Show every node of the cluster with its role, state and uptime."""
    from rich.console import Console
    from rich.table import Table

    cfg = load(c, config)
    rows = lib.status(cfg, settings=settings(c))
    if not rows:
        print(f"no {cfg.provider} cluster '{cfg.cluster_name}' is running")
        return
    columns = [k for k in ("role", "id", "host", "type", "state", "uptime_s", "ttl_left_s", "cost")
               if any(k in r for r in rows)]
    table = Table(title=f"{cfg.provider} cluster '{cfg.cluster_name}'")
    for column in columns:
        table.add_column({"uptime_s": "uptime", "ttl_left_s": "ttl left"}.get(column, column))
    for row in rows:
        table.add_row(*[_duration(row.get(k)) if k.endswith("_s") else str(row.get(k, "-")) for k in columns])
    Console().print(table)
    down = [r for r in rows if r["state"] not in ("running", "reachable")]
    if down:
        raise Exit(f"{len(down)}/{len(rows)} nodes not running: " + ", ".join(r["id"] for r in down), code=1)


@task(help={"config": CONFIG_HELP, "worker": "log in to worker N (1-based) instead of the master",
            "dev": "log in to the dev host/instance"})
def login(c, config=None, worker=None, dev=False):
    """Log in to the master (or a worker, or the dev host) with the system ssh."""
    cfg = load(c, config)
    info = lib.ensure_running(cfg, settings=settings(c))
    if dev:
        node = info.dev
    elif worker is not None:
        index = int(worker)
        if not 1 <= index <= len(info.workers):
            raise Exit(f"--worker {index}: the cluster has workers 1..{len(info.workers)}", code=1)
        node = info.workers[index - 1]
    else:
        node = info.master
    if node is None:
        raise Exit(f"cluster '{cfg.cluster_name}' has no {'dev host' if dev else 'master'}", code=1)
    argv = _ssh_argv(info, node.host, [])
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@task(help={"config": CONFIG_HELP})
def copy_dns(c, config=None):
    """Copy servers/ and the known hosts to every node and the cluster key to the master."""
    cfg = load(c, config)
    info = lib.ensure_running(cfg, settings=settings(c))
    count = lib.copy_dns(info, settings=settings(c))
    print(f"copied servers/ to ~/{lib.REMOTE_DIR}/servers on {count} nodes; key on the master")


@task(help={"command": "shell command to run on every selected host",
            "config": CONFIG_HELP,
            "role": "all (master and workers), master, workers or dev",
            "hosts": "comma-separated hosts (addresses or names) instead of a role",
            "stream": "print output live, each line prefixed [host], instead of folded at the end",
            "timeout": "seconds before the command is abandoned on a host"},
      positional=["command"])
def run(c, command, config=None, role="all", hosts=None, stream=False, timeout=None):
    """Run a shell command on every host in parallel and fold identical outputs."""
    cfg = load(c, config)
    info = lib.ensure_running(cfg, settings=settings(c))
    nodes = hostlib.select_nodes(info, role=role, hosts=hosts.split(",") if hosts else None)
    outputs = lib.run(info, command, nodes=nodes, settings=settings(c), stream=sys.stdout if stream else None,
                      timeout=float(timeout) if timeout else None)
    if not stream:
        for names, out in lib.fold(outputs):
            label = ",".join(names)
            print("-" * 15 + f"\n{label} ({len(names)})" + (f" exit {out.exited}" if out.exited else "")
                  + "\n" + "-" * 15)
            if out.error:
                print(f"error: {out.error}")
            text = out.stdout + (out.stderr if out.stderr else "")
            if text:
                print(text, end="" if text.endswith("\n") else "\n")
    failed = lib.run_failures(outputs)
    if failed:
        raise Exit(str(failed), code=1)


ns = Collection("cluster", launch, destroy, status, login, copy_dns, run)
