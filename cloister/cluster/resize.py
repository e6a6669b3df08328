"""A running cluster changes size (resize) and heals (repair), through the provider contract.

Both end the same way: the new workers answer SSH and pass the provider's checks, then servers/ is
written once and copy-dns rewrites every node's copy (servers/, ssh config, known hosts,
mpi_hosts.txt). Workers keep their numbers: a grown cluster adds worker-(N+1)..., a shrunk one loses
its highest-numbered workers, and a repaired one gets each gone worker back under its number and at
its place in servers/. Whatever fails or is interrupted before servers/ is written ends the workers
this call started, and servers/ stays as it was.
"""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

from .. import providers
from ..config import ClusterConfig
from ..errors import CloisterError, ProviderError
from ..files import atomic_write
from ..providers.base import Progress, Provider
from ..runs import detached, lock
from ..settings import Settings
from ..transport import hosts
from .lifecycle import copy_dns, current
from .servers import ClusterInfo, Node, worker_number, write_servers


@dataclass(frozen=True)
class GoneNode:
    """A node servers/ records that the provider no longer runs, and what became of it."""

    node: Node
    reason: str


@dataclass(frozen=True)
class Change:
    """What a resize or repair did (or, dry, would do): lines for people and the cluster after it."""

    info: ClusterInfo
    lines: list[str]
    added: list[Node]
    removed: list[Node]
    replaced: list[tuple[GoneNode, Node]]


def _numbered(info: ClusterInfo) -> list[tuple[int, Node]]:
    return [(worker_number(w) or i + 1, w) for i, w in enumerate(info.workers)]


def _prepared(cfg: ClusterConfig, settings: Settings, what: str) -> tuple[Provider, ClusterInfo]:
    prov = providers.get(cfg, settings=settings)
    if not prov.resizable:
        raise prov.cannot(what)
    return prov, current(cfg, settings=settings)


def gone_nodes(cfg: ClusterConfig, *, settings: Settings) -> list[GoneNode]:
    """The nodes servers/ lists that the provider no longer runs, each with why."""
    return _gone(providers.get(cfg, settings=settings), current(cfg, settings=settings))


def _gone(prov: Provider, info: ClusterInfo) -> list[GoneNode]:
    why = prov.gone(info)
    return [GoneNode(node=node, reason=why[node.id]) for node in info.cluster_nodes if node.id in why]


def _refuse_gone_master(cfg: ClusterConfig, gone: list[GoneNode]) -> None:
    for item in gone:
        if item.node.role == "master":
            raise ProviderError(f"the master of '{cfg.cluster_name}' ({item.node.id}) is gone ({item.reason}); it holds the runs' state and cannot be replaced: inv "
                                f"cluster.destroy --yes, then launch again", provider=cfg.provider,
                                cluster=cfg.cluster_name)


def describe_gone(item: GoneNode) -> str:
    node = item.node
    return f"{node.name or node.host} ({node.id}, {node.host}): {item.reason}"


def _cost_line(prov: Provider, info: ClusterInfo, delta: int) -> str:
    each = prov.node_hourly(info, role="worker")
    if each is None:
        return "cost change: unknown (no list price for the workers' type)"
    before = each * len(info.workers)
    return (f"cost change: {'+' if delta >= 0 else '-'}${abs(delta) * each:.2f}/hour for the workers "
            f"(${before:.2f} -> ${before + delta * each:.2f}/hour at list price)")


def resize(cfg: ClusterConfig, *, settings: Settings, nworkers: int, dry_run: bool = False, wait: bool = True,
           progress: Progress | None = None) -> Change:
    """Grow the cluster to ``nworkers`` (new workers as the others) or shrink it (its highest-numbered workers
    end, once no run in flight uses them); with ``dry_run`` only say what would be done and what it costs.
    Without ``wait`` a grown cluster's servers/ is written once the new machines run (no SSH wait, no copy)."""
    if nworkers < 0:
        raise CloisterError(f"--nworkers {nworkers}: expected 0 or more workers")
    prov, info = _prepared(cfg, settings, "resize a cluster")
    numbered = sorted(_numbered(info), key=lambda pair: pair[0])
    count = len(numbered)
    head = f"{cfg.provider} cluster '{cfg.cluster_name}': {count} -> {nworkers} workers"
    if nworkers == count:
        return Change(info=info, lines=[f"{head}: nothing to do"], added=[], removed=[], replaced=[])
    gone = _gone(prov, info)
    _refuse_gone_master(cfg, gone)
    doomed = [node for _, node in numbered[nworkers:]]
    staying_gone = [g for g in gone if g.node not in doomed]
    if staying_gone:
        raise ProviderError(f"{len(staying_gone)} worker(s) of '{cfg.cluster_name}' are gone: "
                            + "; ".join(describe_gone(g) for g in staying_gone[:4])
                            + "; run inv cluster.repair first", provider=cfg.provider, cluster=cfg.cluster_name)
    if nworkers > count:
        first = (numbered[-1][0] if numbered else 0) + 1
        numbers = list(range(first, first + nworkers - count))
        plan = [f"{head}: start " + ", ".join(f"worker-{n}" for n in numbers)
                + " as the others (type, image, network, tags, key, the cluster's expiry)",
                _cost_line(prov, info, nworkers - count)]
        return Change(info=info, lines=plan, added=[], removed=[], replaced=[]) if dry_run else \
            _grow(prov, info, numbers, head=head, wait=wait, progress=progress)
    plan = [f"{head}: end " + ", ".join(n.name or n.host for n in doomed) + " (the highest-numbered)",
            _cost_line(prov, info, nworkers - count)]
    if dry_run:
        return Change(info=info, lines=plan, added=[], removed=doomed, replaced=[])
    _refuse_busy(info, doomed, settings=settings)
    return _shrink(prov, info, doomed, head=head, progress=progress)


def _refuse_busy(info: ClusterInfo, doomed: list[Node], *, settings: Settings) -> None:
    """Refuse to end workers a run in flight uses (its state on the master), or any while a run starts."""
    hosts_ = {n.host for n in doomed}
    with closing(hosts.connection(info, info.master, connect_timeout=settings.connect_timeout)) as cxn:
        states = detached.in_flight(cxn)
        held = lock.in_flight(cxn)
    for run in states:
        used = sorted(hosts_ & set(run.state.hosts.workers))
        if used:
            raise CloisterError(f"run {run.state.run_id} of {run.state.benchmark} is in flight on {', '.join(used)}; "
                                f"wait for it to end (inv exp.ps) or end it (inv exp.killall --run "
                                f"{run.state.run_id}), then resize")
    if held and not states:
        raise CloisterError(f"{held} is starting on the cluster; resize once it runs or has ended")


def _grow(prov: Provider, info: ClusterInfo, numbers: list[int], *, head: str, wait: bool,
          progress: Progress | None) -> Change:
    added = prov.add_workers(info, numbers=numbers, progress=progress)
    after = _with_nodes(info, info.workers + added)
    _settle(prov, after, added, wait=wait)
    return Change(info=after, lines=[f"{head}: started " + ", ".join(f"{n.name} ({n.host})" for n in added)],
                  added=added, removed=[], replaced=[])


def _shrink(prov: Provider, info: ClusterInfo, doomed: list[Node], *, head: str,
            progress: Progress | None) -> Change:
    after = _with_nodes(info, [w for w in info.workers if w not in doomed])
    # The machines end first: a shrink interrupted before servers/ is written is finished by the same
    # command (the ended workers are still the highest-numbered), and no running machine is left out of it.
    lines = prov.remove_workers(info, nodes=doomed, progress=progress)
    forget_hosts(info, doomed)
    write_servers(prov.settings.servers_dir, after)
    copy_dns(after, settings=prov.settings)
    return Change(info=after, lines=[f"{head}: ended " + ", ".join(n.name or n.host for n in doomed), *lines],
                  added=[], removed=doomed, replaced=[])


def repair(cfg: ClusterConfig, *, settings: Settings, spot_fallback: bool = False, wait: bool = True,
           progress: Progress | None = None) -> Change:
    """Replace every worker servers/ lists that the provider no longer runs, under its number and at its place."""
    prov, info = _prepared(cfg, settings, "repair a cluster")
    gone = _gone(prov, info)
    _refuse_gone_master(cfg, gone)
    if not gone:
        return Change(info=info, lines=[f"{cfg.provider} cluster '{cfg.cluster_name}': every node of servers/ runs; "
                                        f"nothing to repair"], added=[], removed=[], replaced=[])
    numbers = {g.node.id: n for n, node in _numbered(info) for g in gone if g.node == node}
    # A replacement may come back at a gone node's address with a new host key.
    forget_hosts(info, [g.node for g in gone])
    added = prov.add_workers(info, numbers=[numbers[g.node.id] for g in gone], spot_fallback=spot_fallback,
                             progress=progress)
    replaced = list(zip(gone, added))
    swap = {g.node.id: new for g, new in replaced}
    after = _with_nodes(info, [swap.get(w.id, w) for w in info.workers])
    _settle(prov, after, added, wait=wait)
    lines = [f"{describe_gone(g)}; replaced by {new.id} ({new.host})" for g, new in replaced]
    return Change(info=after, lines=lines, added=added, removed=[g.node for g in gone], replaced=replaced)


def _with_nodes(info: ClusterInfo, workers: list[Node]) -> ClusterInfo:
    others = [n for n in info.nodes if n.role != "worker"]
    return replace(info, nodes=[n for n in others if n.role == "master"] + workers
                   + [n for n in others if n.role != "master"])


def _settle(prov: Provider, after: ClusterInfo, added: list[Node], *, wait: bool) -> None:
    """Wait for SSH on the new workers and check them; then write servers/ and copy it everywhere. Any
    failure or Ctrl-C before servers/ is written ends the new workers again."""
    settings = prov.settings
    if not wait:
        write_servers(settings.servers_dir, after)
        return
    try:
        timeout = min(settings.ssh_timeout, prov.ssh_wait_cap or settings.ssh_timeout)
        hosts.wait_ssh(after, added, timeout=timeout, concurrency=settings.concurrency,
                       probe_timeout=min(settings.connect_timeout, 5.0),
                       failed_boots=lambda waiting: prov.boot_failures(after, waiting))
        prov.verify_nodes(replace(after, nodes=added))
    except BaseException:
        _undo(prov, after, added)
        raise
    write_servers(settings.servers_dir, after)
    copy_dns(after, settings=settings)


def _undo(prov: Provider, after: ClusterInfo, added: list[Node]) -> None:
    try:
        prov.remove_workers(after, nodes=added)
    finally:
        forget_hosts(after, added)


def forget_hosts(info: ClusterInfo, nodes: list[Node]) -> None:
    """Drop ``nodes``' lines from the cluster's known_hosts (their addresses may come back as other machines)."""
    if not info.known_hosts:
        return
    path = Path(os.path.expanduser(info.known_hosts))
    names = {v for n in nodes for v in (n.host, n.private, n.public, n.name) if v}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    kept = [line for line in lines if not set(line.split()[0].split(",") if line.strip() else ()) & names]
    if len(kept) != len(lines):
        atomic_write(path, "".join(line + "\n" for line in kept))
