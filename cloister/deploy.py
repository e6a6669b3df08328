"""redeploy: push code from the dev instance to every node.

``redeploy`` runs rsync ON the dev instance (the local provider's dev host; ``ami_instance_ip`` on
EC2) and pushes the configured paths to every node, at most ``concurrency`` transfers at a time.
The dev instance authenticates to the nodes with the caller's forwarded SSH agent when that agent
holds the cluster key, otherwise with the cluster key that cloister places at ``~/.ssh/cloister_key``.
Host keys are checked against ``~/.ssh/cloister_known_hosts``, which cloister writes from the
cluster's recorded known_hosts (every node under each of its names and addresses); OpenSSH
connection sharing (ControlMaster/ControlPersist) on the dev instance makes repeated redeploys cheap.

``tree=True`` is a broadcast tree (``broadcast.schedule``): nodes that have the code pass it on.

Nothing here prints: results come back as ``Transfer`` values, live through ``on_result``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from fabric import Connection
from invoke.runners import Result

from .cluster import access
from .transport import broadcast, hosts, shared, transfer
from .errors import CloisterError
from .layout import KEY as REMOTE_KEY
from .layout import NODE_STATE, SSH_KNOWN_HOSTS
from .cluster.servers import ClusterInfo, Node
from .settings import Settings
from .transport.transfer import OnResult, Transfer

# Anchored at the home directory (rsync runs with --relative there): cloister's own files per node.
KEEP_ON_NODES = tuple(f"/{path}" for path in NODE_STATE)

DEFAULT_CONCURRENCY = Settings.redeploy_concurrency
SESSIONS_PER_CONNECTION = 8          # OpenSSH's default MaxSessions is 10
CONTROL_PATH = "~/.ssh/cloister-cm-%C"
CONTROL_PERSIST = "10m"

# Files to place in a sender's home, by path: (content, mode).
Files = dict[str, tuple[bytes, int]]


@dataclass(frozen=True)
class RedeployReport:
    """What a redeploy did: every node's outcome, and how the dev instance sent it."""

    dev: str
    mode: str                         # flat | tree | dry-run
    auth: str                         # agent | key
    paths: list[str]
    skipped: list[str]
    transfers: list[Transfer]         # one per node, in cluster order
    hops: list[Transfer]              # every rsync that ran, retries included
    duration: float

    @property
    def failed(self) -> dict[str, str]:
        return transfer.failures(self.transfers)

    @property
    def dev_sent(self) -> int:
        """Bytes the dev instance put on the wire (rsync's 'Total bytes sent' of its transfers)."""
        return sum(t.stats.sent for t in self.hops if t.source == self.dev)


# -- inputs ----------------------------------------------------------------

def check_paths(paths: Iterable[str], *, flag: str = "--paths") -> list[str]:
    """Validate redeploy paths: relative to the home directory, no '..', not the home itself."""
    out: list[str] = []
    for raw in paths:
        path = raw.strip()
        if not path:
            raise CloisterError(f"{flag}: empty path; give comma-separated paths relative to the home directory")
        if any(ch in path for ch in "\n\r\0"):
            raise CloisterError(f"{flag} {raw!r}: control characters are not allowed in a path")
        if path.startswith("~/"):
            path = path[2:]
        if path.startswith("/") or path.startswith("~"):
            raise CloisterError(f"{flag} {raw!r}: expected a path relative to the home directory, like clamor/")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise CloisterError(f"{flag} {raw!r}: '..' is not allowed; paths stay inside the home directory")
        if not parts:
            raise CloisterError(f"{flag} {raw!r}: that is the whole home directory; name what to push")
        norm = "/".join(parts) + ("/" if path.endswith("/") else "")
        if norm not in out:
            out.append(norm)
    if not out:
        raise CloisterError(f"{flag}: no paths given")
    return out


def dev_node(info: ClusterInfo, *, ami_instance_ip: str | None = None) -> Node:
    """The dev instance: the cluster's dev node, else the config's ami_instance_ip."""
    if info.dev:
        return info.dev
    if ami_instance_ip:
        return Node(role="dev", id=ami_instance_ip, host=ami_instance_ip, public=ami_instance_ip, name="dev")
    raise CloisterError(f"cluster '{info.cluster_name}' has no dev instance; set ami_instance_ip in the config "
                        f"(local provider: dev_host: true)")


def target_address(node: Node) -> str:
    """The address the dev instance (and other nodes) reach ``node`` at: private first."""
    return node.private or node.host


def agent_holds_key(key_path: str | None) -> bool:
    """True when SSH_AUTH_SOCK names an agent that holds ``key_path``'s key."""
    if not key_path or not os.environ.get("SSH_AUTH_SOCK"):
        return False
    try:
        wanted = paramiko.PKey.from_path(os.path.expanduser(key_path)).asbytes()
    except (OSError, paramiko.SSHException, ValueError):
        return False
    agent = paramiko.Agent()
    try:
        return any(k.asbytes() == wanted for k in agent.get_keys())
    except (OSError, paramiko.SSHException):
        return False
    finally:
        agent.close()


# -- the dev instance's connections ------------------------------------------

class _Leases:
    """Connections to one host, each lent to at most SESSIONS_PER_CONNECTION transfers at a time."""

    def __init__(self, info: ClusterInfo, node: Node, *, slots: int, connect_timeout: float, forward_agent: bool,
                 sharing: shared.Sharing | None):
        count = max(1, -(-slots // SESSIONS_PER_CONNECTION))
        # One warm master carries at most sshd's MaxSessions: more slots than that get connections of their own.
        warm = sharing if count == 1 else None
        self.connections = [hosts.connection(info, node, connect_timeout=connect_timeout, forward_agent=forward_agent,
                                             sharing=warm) for _ in range(count)]
        self.free: queue.Queue[Connection] = queue.Queue()
        for i in range(slots):
            self.free.put(self.connections[i % count])

    @property
    def first(self) -> Connection:
        return self.connections[0]

    def lease(self) -> Connection:
        return self.free.get()

    def give_back(self, cxn: Connection) -> None:
        self.free.put(cxn)

    def close(self) -> None:
        for cxn in self.connections:
            cxn.close()


def _prepare_dev(cxn: Connection, paths: list[str], files: Files, *,
                 timeout: float) -> tuple[list[str], list[str]]:
    """Check rsync and the paths on the dev instance, install key/known_hosts; return (present, missing)."""
    checks = " ".join(shlex.quote(p) for p in paths)
    installed = " ".join(shlex.quote(p) for p in files)
    script = ("mkdir -p -m 700 .ssh && command -v rsync >/dev/null || { echo 'rsync not installed'; exit 3; }; "
              f"for p in {checks}; do if [ -e \"$p\" ]; then echo \"+$p\"; else echo \"-$p\"; fi; done; "
              f"sha256sum {installed} 2>/dev/null | sed 's/^/=/'; stat -c '~%a %n' {installed} 2>/dev/null; true")
    result = cxn.run(script, hide=True, warn=True, in_stream=False, timeout=timeout)
    if result.exited == 3:
        raise CloisterError(f"[{cxn.host}] rsync is not installed on the dev instance (apt-get install rsync)")
    if result.exited != 0:
        tail = (result.stderr or result.stdout or "").strip().splitlines()
        raise CloisterError(f"[{cxn.host}] dev instance: exit {result.exited}" + (f": {tail[-1]}" if tail else ""))
    present = [line[1:] for line in result.stdout.splitlines() if line.startswith("+")]
    missing = [line[1:] for line in result.stdout.splitlines() if line.startswith("-")]
    have = dict(reversed(line[1:].split(None, 1)) for line in result.stdout.splitlines()
                if line.startswith("=") and len(line[1:].split(None, 1)) == 2)
    modes = dict(reversed(line[1:].split(None, 1)) for line in result.stdout.splitlines()
                 if line.startswith("~") and len(line[1:].split(None, 1)) == 2)
    stale = {path: (data, mode) for path, (data, mode) in files.items()
             if have.get(path) != hashlib.sha256(data).hexdigest() or modes.get(path) != f"{mode:o}"}
    if stale:  # a repeated redeploy skips the SFTP session
        hosts.put_files(cxn, stale)
    return present, missing


# -- redeploy ------------------------------------------------------------------

def redeploy(info: ClusterInfo, *, paths: Sequence[str], nodes: Sequence[Node] | None = None,
             delete: bool = False, dry_run: bool = False, tree: bool = False,
             concurrency: int = DEFAULT_CONCURRENCY, connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT,
             timeout: float | None = None, ami_instance_ip: str | None = None, agent: bool | None = None,
             control_persist: str | None = CONTROL_PERSIST, on_result: OnResult | None = None,
             on_skip: Callable[[str], None] | None = None, dev_known_hosts: str | None = None,
             sharing: shared.Sharing | None = None) -> RedeployReport:
    """rsync ``paths`` from the dev instance to ``nodes`` (default: master and workers).

    Returns a report with one Transfer per node; failed nodes are in it, not raised. Raises
    CloisterError only when nothing can start (no dev instance, dev unreachable, no path exists).
    ``agent=None`` forwards the local agent when it holds the cluster key, else uses the key file.
    ``dev_known_hosts`` keeps the host key of a dev instance that is not a node of the cluster apart
    from the cluster's (it outlives clusters, whose known_hosts every launch forgets). With ``sharing``,
    the commands to the dev instance and to relaying nodes go over warm connections (not when the
    agent is forwarded: a shared master forwards its own agent, not this invocation's).
    """
    started = time.monotonic()
    wanted = check_paths(paths)
    concurrency = max(1, int(concurrency))
    dev = dev_node(info, ami_instance_ip=ami_instance_ip)
    targets = [n for n in (nodes if nodes is not None else info.cluster_nodes)
               if n.host != dev.host and n.role != "dev"]
    if not targets:
        raise CloisterError(f"cluster '{info.cluster_name}' has no nodes to redeploy to")
    use_agent = agent_holds_key(info.ssh_key) if agent is None else agent
    files = _sender_files(info, agent=use_agent)
    node_ssh, dev_ssh = _sender_ssh(info, agent=use_agent, connect_timeout=connect_timeout,
                                    control_persist=control_persist)
    tree = tree and not dry_run and len(targets) > 1
    dev_record = _dev_record(info, dev_known_hosts)
    leases = _Leases(dev_record, dev, slots=concurrency, connect_timeout=connect_timeout, forward_agent=use_agent,
                     sharing=sharing)
    try:
        present, missing = _paths_on_dev(leases.first, dev.host, wanted, files, on_skip=on_skip)
        hop = _Hop(info=info, dev=dev.host, leases=leases, files=files, paths=present, dev_ssh=dev_ssh,
                   node_ssh=node_ssh, delete=delete, dry_run=dry_run, timeout=timeout,
                   connect_timeout=connect_timeout, forward_agent=use_agent, sharing=sharing)
        try:
            final, hops = broadcast.schedule(dev.host, targets, tree=tree, concurrency=concurrency, hop=hop,
                                             on_result=on_result)
        except BaseException:
            hop.stop.set()  # Ctrl-C: running hops close their sessions, which ends their rsyncs
            raise
    finally:
        leases.close()
    return RedeployReport(dev=dev.host, mode="dry-run" if dry_run else ("tree" if tree else "flat"),
                          auth="agent" if use_agent else "key", paths=present, skipped=missing,
                          transfers=[final[t.host] for t in targets], hops=hops,
                          duration=time.monotonic() - started)


def _sender_files(info: ClusterInfo, *, agent: bool) -> Files:
    """What a sender needs in its home to reach the nodes: their host keys, and the cluster key
    unless the caller's agent is forwarded."""
    key = info.extra.get("cluster_key") or info.ssh_key
    if not agent and not key:
        raise CloisterError("no cluster key to give the dev instance, and no SSH agent holding one")
    files: Files = {SSH_KNOWN_HOSTS: (access.node_known_hosts(info).encode(), 0o644)}
    if not agent:
        try:
            files[REMOTE_KEY] = (Path(os.path.expanduser(key)).read_bytes(), 0o600)
        except OSError as err:
            raise CloisterError(f"cannot read the cluster key {key}: {err.strerror}")
    return files


def _sender_ssh(info: ClusterInfo, *, agent: bool, connect_timeout: float,
                control_persist: str | None) -> tuple[transfer.Ssh, transfer.Ssh]:
    """The ssh that rsync runs on a sender: (on a node, on the dev instance).

    Only the dev instance shares its connections: it sends on every redeploy, a node only in a tree.
    """
    node_ssh = transfer.Ssh(user=info.user, key=None if agent else "~/" + REMOTE_KEY,
                            known_hosts="~/" + SSH_KNOWN_HOSTS, connect_timeout=int(connect_timeout))
    if not control_persist:
        return node_ssh, node_ssh
    return node_ssh, dataclasses.replace(node_ssh, control_path=CONTROL_PATH, control_persist=control_persist)


def _paths_on_dev(cxn: Connection, dev: str, wanted: list[str], files: Files, *,
                  on_skip: Callable[[str], None] | None) -> tuple[list[str], list[str]]:
    """Prepare the dev instance; return the wanted paths it has and those it lacks (told to ``on_skip``).

    Raises CloisterError when the dev instance cannot be reached or has none of them.
    """
    try:
        present, missing = _prepare_dev(cxn, wanted, files, timeout=60)
    except CloisterError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to reach the dev instance is one line
        raise CloisterError(f"[{dev}] dev instance unreachable: {hosts.describe_error(exc)}")
    for path in missing:
        if on_skip:
            on_skip(path)
    if not present:
        raise CloisterError(f"none of {', '.join(wanted)} exists in the dev instance's home ({dev}); "
                            f"nothing to redeploy")
    return present, missing


@dataclass
class _Hop:
    """One rsync that puts the code on a node: from the dev instance over a leased connection, or
    (in a tree) from a node that already has it. Failures come back as a Transfer, never raised."""

    info: ClusterInfo
    dev: str
    leases: _Leases
    files: Files                      # placed on a node before it first sends
    paths: list[str]
    dev_ssh: transfer.Ssh
    node_ssh: transfer.Ssh
    delete: bool
    dry_run: bool
    timeout: float | None
    connect_timeout: float
    forward_agent: bool
    sharing: shared.Sharing | None
    prepared: set[str] = field(default_factory=set)          # nodes whose files are in place
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def __call__(self, source: broadcast.Source, target: Node, attempt: int) -> Transfer:
        begin = time.monotonic()
        from_dev = source == self.dev
        label = self.dev if from_dev else source.host
        context = "" if from_dev else f"via {label}: "
        try:
            result = self._from_dev(target) if from_dev else self._from_node(source, target)
        except Exception as exc:  # noqa: BLE001 - reported per node
            return Transfer(host=target.host, name=target.name, source=label, ok=False,
                            duration=time.monotonic() - begin, attempts=attempt,
                            error=context + hosts.describe_error(exc))
        return transfer.outcome(result, host=target.host, name=target.name, source=label,
                                duration=time.monotonic() - begin, attempts=attempt, context=context)

    def _from_dev(self, target: Node) -> Result:
        cxn = self.leases.lease()
        try:
            return transfer.rsync_from(cxn, self.paths, target_address(target), ssh=self.dev_ssh,
                                       delete=self.delete, dry_run=self.dry_run, timeout=self.timeout,
                                       exclude=KEEP_ON_NODES, stop=self.stop)
        finally:
            self.leases.give_back(cxn)

    def _from_node(self, source: Node, target: Node) -> Result:
        cxn = hosts.connection(self.info, source, connect_timeout=self.connect_timeout,
                               forward_agent=self.forward_agent, sharing=self.sharing)
        try:
            if self._first_send(source):
                hosts.put_files(cxn, self.files)
            return transfer.rsync_from(cxn, self.paths, target_address(target), ssh=self.node_ssh,
                                       delete=self.delete, timeout=self.timeout, exclude=KEEP_ON_NODES,
                                       stop=self.stop)
        finally:
            cxn.close()

    def _first_send(self, source: Node) -> bool:
        """True once per node: its files go over SFTP only before the first hop it sends."""
        with self.lock:
            fresh = source.host not in self.prepared
            self.prepared.add(source.host)
        return fresh


def _dev_record(info: ClusterInfo, dev_known_hosts: str | None) -> ClusterInfo:
    """The record to reach the dev instance with: the cluster's, with the dev's own known_hosts when
    the dev instance is not one of the cluster's nodes."""
    if info.dev is not None or not dev_known_hosts:
        return info
    Path(dev_known_hosts).parent.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(info, known_hosts=dev_known_hosts)


def close_masters(info: ClusterInfo, *, ami_instance_ip: str | None = None,
                  connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT, dev_known_hosts: str | None = None) -> int:
    """Close the dev instance's shared SSH connections to the nodes; return how many were open."""
    dev = dev_node(info, ami_instance_ip=ami_instance_ip)
    cxn = hosts.connection(_dev_record(info, dev_known_hosts), dev, connect_timeout=connect_timeout)
    script = ("n=0; for s in ~/.ssh/cloister-cm-*; do [ -S \"$s\" ] || continue; "
              "ssh -o ControlPath=\"$s\" -O exit cloister >/dev/null 2>&1; n=$((n+1)); done; echo $n")
    try:
        result = cxn.run(script, hide=True, warn=True, in_stream=False, timeout=60)
    finally:
        cxn.close()
    return int(result.stdout.strip() or 0) if result.exited == 0 else 0
