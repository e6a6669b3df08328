"""Provider-independent cluster operations: launch, destroy, status, run, copy-dns.

Everything provider-specific goes through the provider the registry returns for the config
(``cloister.providers.get``); nothing here asks which provider it is.
"""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from . import access, keys
from .. import layout, providers
from ..transport import hosts, remote, shared
from ..config import TTL_RE, ClusterConfig, parse_ttl
from ..errors import CloisterError, HostsFailed, Interrupted
from ..interrupts import shielded
from ..providers.base import ClusterRow, Confirm, NodeStatus, Plan, Progress, Provider
from ..transport.remote import Captured
from .servers import ClusterInfo, Node, clear_servers, read_servers, text_files, write_servers
from ..settings import Settings

TIMEOUT_EXIT = 124  # what coreutils timeout exits with when it had to stop the command
REMOTE_TIMEOUT_GRACE = 5.0


@dataclass(frozen=True)
class LaunchResult:
    info: ClusterInfo
    created: bool
    replaced: str | None = None  # the other cluster servers/ described before this launch


def provider(cfg: ClusterConfig, *, settings: Settings) -> Provider:
    return providers.get(cfg, settings=settings)


def launch(cfg: ClusterConfig, *, settings: Settings, nworkers: int | None = None, wait: bool = True,
           confirm: Confirm | None = None, progress: Progress | None = None) -> LaunchResult:
    """Bring the cluster up (or find it), wait for SSH, write servers/ and copy it to every node.

    After a failure that follows the creation of machines, the provider rolls back what it created
    (``confirm`` is asked first where the provider asks; None: without asking).
    """
    count = cfg.nworkers if nworkers is None else nworkers
    prov = provider(cfg, settings=settings)
    launched = prov.launch(nworkers=count, confirm=confirm, progress=progress)
    info = launched.info
    # From here on a Ctrl-C or an error must end what this call created, whatever it interrupts.
    try:
        info = _recorded(cfg, settings, launched.info)
        previous = _recorded_name(settings)
        write_servers(settings.servers_dir, info)
        if wait:
            _wait_and_copy(prov, info)
    except BaseException as exc:
        # A cluster this call created and could not finish (an error, Ctrl-C) must not be left behind.
        if launched.created:
            try:
                outcome = prov.rollback(exc, info=info, confirm=confirm, progress=progress)
            finally:
                with shielded():
                    clear_own_servers(cfg, settings)
                    keys.forget(settings.state_dir, info)
            if isinstance(exc, KeyboardInterrupt) and outcome:
                raise Interrupted(outcome) from None
        raise
    return LaunchResult(info=info, created=launched.created,
                        replaced=previous if previous not in (None, info.cluster_name) else None)


def launched_under_another_name(cfg: ClusterConfig, *, settings: Settings) -> str | None:
    """The cluster servers/ records if this very config file launched it under another --name."""
    try:
        info = read_servers(settings.servers_dir)
    except CloisterError:
        return None
    same_file = info.extra.get("config") == str(Path(cfg.source).resolve())
    # An edited provider or region in that file makes it another cluster.
    same_place = (info.provider, info.region) == (cfg.provider, cfg.region)
    return info.cluster_name if same_file and info.extra.get("named_by_flag") and same_place else None


def _recorded_name(settings: Settings) -> str | None:
    """The cluster servers/ describes now, if any."""
    try:
        return read_servers(settings.servers_dir).cluster_name
    except CloisterError:
        return None


def _recorded(cfg: ClusterConfig, settings: Settings, info: ClusterInfo) -> ClusterInfo:
    """``info`` as servers/ records it: with the cluster key, mpirun's default slots, and the config it
    came from (a cluster named by --name is not the one its config names; later tasks given the same
    config find it through this, see tasks/_common.load)."""
    key, _ = keys.cluster_key(settings.state_dir, info)
    return replace(info, extra={**info.extra, "config": str(Path(cfg.source).resolve()),
                                "named_by_flag": "cluster_name" in cfg.from_flags,
                                "cluster_key": str(key), "mpi_slots": cfg.mpi_slots})


def _wait_and_copy(prov: Provider, info: ClusterInfo) -> None:
    settings = prov.settings
    timeout = min(settings.ssh_timeout, prov.ssh_wait_cap or settings.ssh_timeout)
    try:
        hosts.wait_ssh(info, info.nodes, timeout=timeout, concurrency=settings.concurrency,
                       probe_timeout=min(settings.connect_timeout, 5.0),
                       failed_boots=lambda waiting: prov.boot_failures(info, waiting))
    except HostsFailed as failed:
        hint = prov.ssh_hint(info, failed)
        if not hint:
            raise
        raise HostsFailed(failed.failures, total=failed.total, what=failed.what, hint=hint) from None
    prov.verify_nodes(info)
    copy_dns(info, settings=settings)


def current(cfg: ClusterConfig, *, settings: Settings) -> ClusterInfo:
    """The cluster recorded in servers/, refusing one that belongs to another config."""
    return read_servers(settings.servers_dir, cluster_name=cfg.cluster_name)


def destroy(cfg: ClusterConfig, *, settings: Settings, confirm: Confirm | None = None,
            progress: Progress | None = None) -> list[str]:
    """Tear the cluster down; return what was done, one line each."""
    prov = provider(cfg, settings=settings)
    messages = prov.destroy(confirm=confirm, progress=progress)
    close_connections(cfg, settings=settings)
    clear_own_servers(cfg, settings)
    keys.forget_cluster(settings.state_dir, provider=prov.name, region=cfg.region, cluster=cfg.cluster_name)
    return messages


def sharing(info: ClusterInfo, *, settings: Settings) -> shared.Sharing | None:
    """Where the cluster's warm SSH connections live, or None when ``ssh_idle`` turns them off."""
    return hosts.sharing(info, state_dir=settings.state_dir, idle=settings.ssh_idle)


def close_connections(cfg: ClusterConfig, *, settings: Settings) -> int:
    """Close the cluster's warm SSH connections (also those of an earlier ssh_idle setting); return how
    many were open."""
    try:
        info = read_servers(settings.servers_dir, cluster_name=cfg.cluster_name)
        places = {(info.provider, info.region), (cfg.provider, cfg.region)}
    except CloisterError:
        places = {(cfg.provider, cfg.region)}
    found = (shared.sharing(settings.state_dir, cluster=cfg.cluster_name, provider=name, region=region, idle=1)
             for name, region in places)
    return sum(shared.close(where.directory) for where in found if where is not None)


def clear_own_servers(cfg: ClusterConfig, settings: Settings) -> None:
    """Clear servers/ if it describes this config's cluster; leave another cluster's alone."""
    try:
        info = read_servers(settings.servers_dir, cluster_name=cfg.cluster_name)
    except CloisterError:
        return
    # The same name may be another cluster in another region.
    if info.region == cfg.region:
        clear_servers(settings.servers_dir)


def status(cfg: ClusterConfig, *, settings: Settings) -> list[NodeStatus]:
    """Every node of the cluster as its provider sees it now, and after them every node servers/ records
    that the provider no longer runs (state "gone", ``why`` says what became of it)."""
    prov = provider(cfg, settings=settings)
    rows = prov.status()
    try:
        info = current(cfg, settings=settings)
    except CloisterError:
        return rows
    shown = {r.id for r in rows}
    if all(n.id in shown for n in info.cluster_nodes) or (info.provider, info.region) != (cfg.provider, cfg.region):
        return rows
    why = prov.gone(info)
    return rows + [NodeStatus(role=n.role, id=n.id, name=n.name, host=n.host, state="gone", why=why[n.id])
                   for n in info.cluster_nodes if n.id not in shown and n.id in why]


def gone_hosts(cfg: ClusterConfig, *, settings: Settings, info: ClusterInfo) -> dict[str, str]:
    """The hosts of ``info`` the provider knows to have ended: host -> why (empty if it cannot tell)."""
    try:
        why = provider(cfg, settings=settings).gone(info)
    except CloisterError:
        return {}
    return {n.host: why[n.id] for n in info.nodes if n.id in why}


def node_cluster_json(info: ClusterInfo) -> str:
    """cluster.json as seen from a node: the key and known_hosts at their copied places."""
    moved = replace(info, ssh_key=layout.home_path(layout.KEY), known_hosts=layout.home_path(layout.KNOWN_HOSTS))
    return json.dumps(moved.to_json(), indent=2) + "\n"


def copy_dns(info: ClusterInfo, *, settings: Settings) -> int:
    """Copy servers/*.txt, cluster.json and known_hosts to ~/cloister/ on every node, the key to the master."""
    files = {f"{layout.SERVERS_DIR}/{name}": (text.encode(), 0o644) for name, text in text_files(info).items()}
    files[f"{layout.SERVERS_DIR}/cluster.json"] = (node_cluster_json(info).encode(), 0o644)
    known = Path(os.path.expanduser(info.known_hosts)) if info.known_hosts else None
    if known and known.exists():
        files[layout.KNOWN_HOSTS] = (known.read_bytes(), 0o644)
    files[layout.SSH_KNOWN_HOSTS] = (access.node_known_hosts(info).encode(), 0o644)
    files[layout.SSH_CONFIG] = (access.ssh_config(info).encode(), 0o600)
    key, public = keys.cluster_key(settings.state_dir, info)
    # Only the master gets the cluster's private key: it is where ssh and mpirun start from.
    on_master = {**files, layout.KEY: (key.read_bytes(), 0o600)}
    master = info.master.host if info.master else None
    prepare = (f"mkdir -p {layout.SERVERS_DIR} .ssh && chmod 700 .ssh && {keys.authorize_script(public, info)} "
               f"&& {access.include_script()}")

    def push(cxn) -> None:
        cxn.run(prepare, warn=False, timeout=30)
        hosts.put_files(cxn, on_master if cxn.host == master else files)

    with hosts.group(info, info.nodes, concurrency=settings.concurrency,
                     connect_timeout=settings.connect_timeout) as grp:
        # Both steps are idempotent: a session that drops (a node's sshd still starting) is simply opened again.
        hosts.check(hosts.call(grp, lambda c: remote.reconnecting(lambda: push(c))), what="copy-dns")
    return len(info.nodes)


@dataclass(frozen=True)
class HostOutput:
    """What one host printed (in memory, or spilled to a file when large) and how the command ended."""

    host: str
    out: Captured
    err: Captured
    exited: int | None
    error: str | None = None

    @property
    def stdout(self) -> str:
        return self.out.text

    @property
    def stderr(self) -> str:
        return self.err.text


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run``: the command is stopped on every host; ``outputs`` is what each printed so far."""

    def __init__(self, outputs: list[HostOutput]):
        super().__init__()
        self.outputs = outputs


def output_dir(settings: Settings) -> Path:
    """Where this run's large outputs go: ``{state_dir}/output/{UTC time}-{pid}/`` (created on first use)."""
    return Path(settings.state_dir) / "output" / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"


def run(info: ClusterInfo, command: str, *, nodes: list[Node], settings: Settings, stream: TextIO | None = None,
        timeout: float | None = None) -> list[HostOutput]:
    """Run ``command`` on ``nodes`` in parallel; with ``stream``, lines go there live as ``[host] line``.

    Each host's output is kept in memory up to ``remote.SPILL_LIMIT`` per stream and beyond that in
    ``output_dir(settings)/{host}.out`` (``.err``). With ``timeout``, the remote side ends the command
    itself (coreutils ``timeout``); the local timeout, a little later, only covers a host that stops
    answering. Ctrl-C stops the command on every host and raises RunInterrupted with the output so far.
    """
    if timeout is not None:
        command = f"timeout -k 2 {timeout:g} bash -c {shlex.quote(command)}"
    folder = output_dir(settings)
    sinks = {n.host: (remote.Capture(folder / f"{n.host}.out"), remote.Capture(folder / f"{n.host}.err"))
             for n in nodes}
    lock = threading.Lock()
    ended: dict[str, Any] = {}      # host -> exit status or the exception that ended it

    def one(cxn) -> None:
        out, err = sinks[cxn.host]
        writers = (out, err) if stream is None else (remote.LineWriter(cxn.host, stream, lock),
                                                     remote.LineWriter(cxn.host, stream, lock))
        try:
            ended[cxn.host] = remote.execute(
                cxn, command, stdout=writers[0].write, stderr=writers[1].write, stop=grp.stop,
                timeout=None if timeout is None else timeout + REMOTE_TIMEOUT_GRACE)
        except Exception as exc:  # noqa: BLE001 - reported per host
            ended[cxn.host] = exc
        finally:
            if stream is not None:
                for writer in writers:
                    writer.flush()

    with hosts.group(info, nodes, concurrency=settings.concurrency, connect_timeout=settings.connect_timeout,
                     sharing=sharing(info, settings=settings)) as grp:
        try:
            grp.call(one)
        except KeyboardInterrupt:
            raise RunInterrupted(_outputs(nodes, sinks, dict(ended), timeout=timeout)) from None
    return _outputs(nodes, sinks, ended, timeout=timeout)


def _outputs(nodes: list[Node], sinks: dict[str, tuple[remote.Capture, remote.Capture]],
             ended: dict[str, Any], *, timeout: float | None) -> list[HostOutput]:
    """One HostOutput per node, in order; a node without an outcome was interrupted."""
    outputs = []
    for node in nodes:
        value = ended.get(node.host, remote.Stopped())
        out, err = (sink.result() for sink in sinks[node.host])
        if isinstance(value, BaseException):
            outputs.append(HostOutput(node.host, out, err, None, hosts.describe_error(value)))
        elif timeout is not None and value == TIMEOUT_EXIT:
            outputs.append(HostOutput(node.host, out, err, value, f"timed out after {timeout:g}s"))
        else:
            outputs.append(HostOutput(node.host, out, err, value))
    return outputs


def fold(outputs: list[HostOutput]) -> list[tuple[list[str], HostOutput]]:
    """Group hosts whose output, exit code and error are identical (like ``clush -b``); outputs compare
    by digest, so spilled ones are never read back."""
    groups: dict[tuple, list[str]] = {}
    first: dict[tuple, HostOutput] = {}
    for out in outputs:
        key = (out.out.digest, out.err.digest, out.exited, out.error)
        groups.setdefault(key, []).append(out.host)
        first.setdefault(key, out)
    return [(hosts_, first[key]) for key, hosts_ in groups.items()]


def run_failures(outputs: list[HostOutput]) -> HostsFailed | None:
    failed = {o.host: (o.error or f"exit {o.exited}") for o in outputs if o.error or o.exited != 0}
    return HostsFailed(failed, total=len(outputs)) if failed else None


def dev_known_hosts(cfg: ClusterConfig, *, settings: Settings) -> str | None:
    """Where the dev instance's host key is kept, apart from the cluster's (None: nowhere of its own)."""
    try:
        record, _ = provider(cfg, settings=settings).dev_info()
    except CloisterError:
        return None
    return record.known_hosts


def ensure_running(cfg: ClusterConfig, *, settings: Settings) -> ClusterInfo:
    """servers/ for this config's cluster; a clear error if the provider says it is gone."""
    info = current(cfg, settings=settings)
    provider(cfg, settings=settings).ensure_running(info)
    return info


def plan(cfg: ClusterConfig, *, settings: Settings, nworkers: int | None = None) -> Plan:
    """What a launch would create (checked with the provider's dry run, where it has one); creates nothing."""
    return provider(cfg, settings=settings).plan(nworkers=cfg.nworkers if nworkers is None else nworkers)


def stop(cfg: ClusterConfig, *, settings: Settings, progress: Progress | None = None) -> list[str]:
    """Stop the cluster's machines, keeping their disks (and close the warm connections to them)."""
    messages = provider(cfg, settings=settings).stop(progress=progress)
    close_connections(cfg, settings=settings)
    return messages


def start(cfg: ClusterConfig, *, settings: Settings, wait: bool = True,
          progress: Progress | None = None) -> ClusterInfo:
    """Start a stopped cluster; rewrite servers/ (addresses change) and, with ``wait``, copy-dns again."""
    prov = provider(cfg, settings=settings)
    info = _recorded(cfg, settings, prov.start(progress=progress))
    write_servers(settings.servers_dir, info)
    if wait:
        _wait_and_copy(prov, info)
    return info


def extend(cfg: ClusterConfig, *, settings: Settings, ttl: str) -> list[str]:
    """Move the cluster's TTL to ``ttl`` (e.g. 2h) from now on every node."""
    seconds = parse_ttl(ttl) if TTL_RE.fullmatch(ttl.strip()) else 0
    if seconds <= 0:
        raise CloisterError(f"--ttl {ttl!r}: expected a duration such as 2h or 90m")
    return provider(cfg, settings=settings).extend(seconds=seconds)


def reap(cfg: ClusterConfig, *, settings: Settings) -> list[str]:
    """End what outlived its TTL unnoticed (a stopped cluster past it); one line for each."""
    return provider(cfg, settings=settings).reap()


def list_clusters(cfg: ClusterConfig, *, settings: Settings) -> list[ClusterRow]:
    """Every cluster the config's provider can see."""
    return provider(cfg, settings=settings).list_clusters()
