"""Code and data movement: redeploy from the dev instance, put and get (issue 6).

``redeploy`` runs rsync ON the dev instance (the local provider's dev host; ``ami_instance_ip`` on
EC2) and pushes the configured paths to every node, at most ``concurrency`` transfers at a time.
The dev instance authenticates to the nodes with the caller's forwarded SSH agent when that agent
holds the cluster key, otherwise with the cluster key that cloister places at ``~/.ssh/cloister_key``.
Host keys are checked against ``~/.ssh/cloister_known_hosts``, which cloister writes from the
cluster's recorded known_hosts (every node under each of its names and addresses); OpenSSH
connection sharing (ControlMaster/ControlPersist) on the dev instance makes repeated redeploys cheap.

``tree=True`` is a broadcast tree: the dev instance seeds ``TREE_SEEDS`` nodes, then every node that
has the code pushes to one more node at a time, so the number of holders doubles each round and the
dev instance sends at most ``TREE_SEEDS`` copies. A node-to-node hop that fails is retried directly
from the dev instance, so an error always names the node that is really at fault.

``put`` / ``get`` run rsync on this machine to / from every node in parallel.

Nothing here prints: results come back as ``Transfer`` values, live through ``on_result``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import queue
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from fabric import Connection

from . import hosts, transfer
from .layout import KEY as REMOTE_KEY
from .layout import NODE_STATE, SSH_KNOWN_HOSTS
from .errors import CloisterError
from .servers import ClusterInfo, Node
from .settings import Settings

# Anchored at the home directory (rsync runs with --relative there): cloister's own files per node.
KEEP_ON_NODES = tuple(f"/{path}" for path in NODE_STATE)

DEFAULT_CONCURRENCY = Settings.redeploy_concurrency
TREE_SEEDS = 2
SESSIONS_PER_CONNECTION = 8          # OpenSSH's default MaxSessions is 10
CONTROL_PATH = "~/.ssh/cloister-cm-%C"
CONTROL_PERSIST = "10m"

OnResult = Callable[["Transfer"], None]


@dataclass(frozen=True)
class Transfer:
    """One node's outcome: what moved, how long it took, or why it failed."""

    host: str
    name: str
    source: str                       # the host that sent it (the dev instance, a node, or "local")
    ok: bool
    duration: float
    stats: transfer.Stats = field(default_factory=transfer.Stats)
    error: str | None = None
    attempts: int = 1


@dataclass(frozen=True)
class RedeployReport:
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
        return {t.host: t.error or "failed" for t in self.transfers if not t.ok}

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


def _remote_path(raw: str, *, what: str) -> str:
    path = raw.strip()
    if not path or any(ch in path for ch in "\n\r\0"):
        raise CloisterError(f"{what} {raw!r}: expected a path on the nodes")
    if path == "~":
        return "."
    if path.startswith("~/"):
        path = path[2:] or "."
    if path.startswith("~"):
        raise CloisterError(f"{what} {raw!r}: '~user' paths are not supported; use an absolute path")
    return path


def dev_node(info: ClusterInfo, ami_instance_ip: str | None = None) -> Node:
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


def node_known_hosts(info: ClusterInfo) -> str:
    """The cluster's known_hosts with every node listed under all its names and addresses."""
    path = Path(os.path.expanduser(info.known_hosts)) if info.known_hosts else None
    try:
        text = path.read_text() if path else ""
    except OSError:
        text = ""
    aliases: dict[str, set[str]] = {}
    for node in info.nodes:
        names = {n for n in (node.host, node.private, node.public, node.name) if n}
        for name in names:
            aliases.setdefault(name, set()).update(names)
    out: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or line.startswith("#") or fields[0].startswith("|") or fields[0].startswith("@"):
            if line.strip():
                out.append(line)
            continue
        names: set[str] = set()
        for name in fields[0].split(","):
            names.add(name)
            names.update(aliases.get(name, ()))
        out.append(",".join(sorted(names)) + " " + " ".join(fields[1:]))
    return "".join(line + "\n" for line in out)


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

    def __init__(self, info: ClusterInfo, node: Node, *, slots: int, connect_timeout: float, forward_agent: bool):
        count = max(1, -(-slots // SESSIONS_PER_CONNECTION))
        self.connections = [hosts.connection(info, node, connect_timeout=connect_timeout,
                                             forward_agent=forward_agent) for _ in range(count)]
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


def _prepare_dev(cxn: Connection, paths: list[str], files: dict[str, tuple[bytes, int]],
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


# -- the scheduler -------------------------------------------------------------

def _schedule(dev: str, targets: list[Node], *, tree: bool, concurrency: int,
              hop: Callable[[str | Node, Node, int], Transfer], on_result: OnResult | None,
              seeds: int = TREE_SEEDS) -> tuple[dict[str, Transfer], list[Transfer]]:
    """Run hops until every target has the code or has failed from the dev instance.

    Flat: the dev instance is the only source. Tree: the dev instance seeds ``seeds`` nodes, and
    every node that has the code becomes a source for one more node at a time.
    """
    pending: deque[tuple[Node, int]] = deque((t, 1) for t in targets)
    retry: deque[tuple[Node, int]] = deque()     # node hops that failed: redo from the dev instance
    holders: deque[Node] = deque()
    final: dict[str, Transfer] = {}
    hops: list[Transfer] = []
    running: dict[Future, tuple[str | Node, Node, int]] = {}
    dev_busy = 0
    dev_ok = 0
    pool = ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(targets))))
    try:
        while pending or retry or running:
            while len(running) < concurrency and (pending or retry):
                if retry:
                    source: str | Node = dev
                    target, attempt = retry.popleft()
                elif tree and holders:
                    source = holders.popleft()
                    target, attempt = pending.popleft()
                elif not tree or dev_ok + dev_busy < seeds or not running:
                    source = dev
                    target, attempt = pending.popleft()
                else:
                    break
                if source == dev:
                    dev_busy += 1
                running[pool.submit(hop, source, target, attempt)] = (source, target, attempt)
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                source, target, attempt = running.pop(future)
                outcome = future.result()
                hops.append(outcome)
                from_dev = source == dev
                if from_dev:
                    dev_busy -= 1
                else:
                    holders.append(source)
                if outcome.ok:
                    if from_dev:
                        dev_ok += 1
                    if tree:
                        holders.append(target)
                elif not from_dev:
                    retry.append((target, attempt + 1))
                    continue
                final[target.host] = outcome
                if on_result:
                    on_result(outcome)
    except BaseException:
        # Ctrl-C: start nothing more; the caller closes the connections, which ends running rsyncs.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return final, hops


# -- redeploy ------------------------------------------------------------------

def redeploy(info: ClusterInfo, *, paths: Sequence[str], nodes: Sequence[Node] | None = None,
             delete: bool = False, dry_run: bool = False, tree: bool = False,
             concurrency: int = DEFAULT_CONCURRENCY, connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT,
             timeout: float | None = None, ami_instance_ip: str | None = None, agent: bool | None = None,
             control_persist: str | None = CONTROL_PERSIST, on_result: OnResult | None = None,
             on_skip: Callable[[str], None] | None = None) -> RedeployReport:
    """rsync ``paths`` from the dev instance to ``nodes`` (default: master and workers).

    Returns a report with one Transfer per node; failed nodes are in it, not raised. Raises
    CloisterError only when nothing can start (no dev instance, dev unreachable, no path exists).
    ``agent=None`` forwards the local agent when it holds the cluster key, else uses the key file.
    """
    started = time.monotonic()
    wanted = check_paths(paths)
    concurrency = max(1, int(concurrency))
    dev = dev_node(info, ami_instance_ip)
    targets = [n for n in (nodes if nodes is not None else info.cluster_nodes)
               if n.host != dev.host and n.role != "dev"]
    if not targets:
        raise CloisterError(f"cluster '{info.cluster_name}' has no nodes to redeploy to")
    use_agent = agent_holds_key(info.ssh_key) if agent is None else agent
    if not use_agent and not info.ssh_key:
        raise CloisterError("no cluster key (ssh_key) to give the dev instance, and no SSH agent holding one")
    files: dict[str, tuple[bytes, int]] = {SSH_KNOWN_HOSTS: (node_known_hosts(info).encode(), 0o644)}
    if not use_agent:
        try:
            files[REMOTE_KEY] = (Path(os.path.expanduser(info.ssh_key)).read_bytes(), 0o600)
        except OSError as err:
            raise CloisterError(f"cannot read the cluster key {info.ssh_key}: {err.strerror}")
    node_ssh = transfer.Ssh(user=info.user, key=None if use_agent else "~/" + REMOTE_KEY,
                            known_hosts="~/" + SSH_KNOWN_HOSTS, connect_timeout=int(connect_timeout))
    dev_ssh = node_ssh
    if control_persist:
        dev_ssh = dataclasses.replace(node_ssh, control_path=CONTROL_PATH, control_persist=control_persist)
    tree = tree and not dry_run and len(targets) > 1
    leases = _Leases(info, dev, slots=concurrency, connect_timeout=connect_timeout, forward_agent=use_agent)
    prepared: set[str] = set()
    prepared_lock = threading.Lock()
    try:
        try:
            present, missing = _prepare_dev(leases.first, wanted, files, timeout=60)
        except CloisterError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to reach the dev instance is one line
            raise CloisterError(f"[{dev.host}] dev instance unreachable: {hosts.describe_error(exc)}")
        for path in missing:
            if on_skip:
                on_skip(path)
        if not present:
            raise CloisterError(f"none of {', '.join(wanted)} exists in the dev instance's home ({dev.host}); "
                                f"nothing to redeploy")

        def hop(source: str | Node, target: Node, attempt: int) -> Transfer:
            begin = time.monotonic()
            from_dev = source == dev.host
            label = dev.host if from_dev else source.host
            try:
                if from_dev:
                    cxn = leases.lease()
                    try:
                        result = transfer.rsync_from(cxn, present, target_address(target), ssh=dev_ssh,
                                                     delete=delete, dry_run=dry_run, timeout=timeout,
                                                     exclude=KEEP_ON_NODES)
                    finally:
                        leases.give_back(cxn)
                else:
                    cxn = hosts.connection(info, source, connect_timeout=connect_timeout, forward_agent=use_agent)
                    try:
                        with prepared_lock:
                            fresh = source.host not in prepared
                            prepared.add(source.host)
                        if fresh:
                            hosts.put_files(cxn, files)
                        result = transfer.rsync_from(cxn, present, target_address(target), ssh=node_ssh,
                                                     delete=delete, timeout=timeout, exclude=KEEP_ON_NODES)
                    finally:
                        cxn.close()
            except Exception as exc:  # noqa: BLE001 - reported per node
                return Transfer(host=target.host, name=target.name, source=label, ok=False,
                                duration=time.monotonic() - begin, attempts=attempt,
                                error=(f"via {label}: " if not from_dev else "") + hosts.describe_error(exc))
            stats = transfer.parse(result.stdout)
            if result.exited != 0:
                return Transfer(host=target.host, name=target.name, source=label, ok=False, stats=stats,
                                duration=time.monotonic() - begin, attempts=attempt,
                                error=(f"via {label}: " if not from_dev else "") + transfer.error_line(result))
            return Transfer(host=target.host, name=target.name, source=label, ok=True, stats=stats,
                            duration=time.monotonic() - begin, attempts=attempt)

        final, hops = _schedule(dev.host, targets, tree=tree, concurrency=concurrency, hop=hop,
                                on_result=on_result)
    finally:
        leases.close()
    return RedeployReport(dev=dev.host, mode="dry-run" if dry_run else ("tree" if tree else "flat"),
                          auth="agent" if use_agent else "key", paths=present, skipped=missing,
                          transfers=[final[t.host] for t in targets], hops=hops,
                          duration=time.monotonic() - started)


def close_masters(info: ClusterInfo, *, ami_instance_ip: str | None = None,
                  connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT) -> int:
    """Close the dev instance's shared SSH connections to the nodes; return how many were open."""
    dev = dev_node(info, ami_instance_ip)
    cxn = hosts.connection(info, dev, connect_timeout=connect_timeout)
    script = ("n=0; for s in ~/.ssh/cloister-cm-*; do [ -S \"$s\" ] || continue; "
              "ssh -o ControlPath=\"$s\" -O exit cloister >/dev/null 2>&1; n=$((n+1)); done; echo $n")
    try:
        result = cxn.run(script, hide=True, warn=True, in_stream=False, timeout=60)
    finally:
        cxn.close()
    return int(result.stdout.strip() or 0) if result.exited == 0 else 0


# -- put / get -------------------------------------------------------------------

def _fan_out(info: ClusterInfo, nodes: Sequence[Node], one: Callable[[Connection], object], *,
             concurrency: int, connect_timeout: float, on_result: OnResult | None) -> list[Transfer]:
    """Run a local rsync per node, at most ``concurrency`` at a time; one Transfer per node, in order."""
    results: dict[str, Transfer] = {}
    lock = threading.Lock()

    def run(node: Node) -> None:
        begin = time.monotonic()
        try:
            cxn = hosts.connection(info, node, connect_timeout=connect_timeout)
            result = one(cxn)
            stats = transfer.parse(result.stdout)
            ok = result.exited == 0
            outcome = Transfer(host=node.host, name=node.name, source="local", ok=ok, stats=stats,
                               duration=time.monotonic() - begin,
                               error=None if ok else transfer.error_line(result))
        except Exception as exc:  # noqa: BLE001 - reported per node
            outcome = Transfer(host=node.host, name=node.name, source="local", ok=False,
                               duration=time.monotonic() - begin, error=hosts.describe_error(exc))
        with lock:
            results[node.host] = outcome
            if on_result:
                on_result(outcome)

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(nodes)))) as pool:
        list(pool.map(run, nodes))
    return [results[n.host] for n in nodes]


def put(info: ClusterInfo, local: str, remote: str, *, nodes: Sequence[Node],
        concurrency: int = hosts.DEFAULT_CONCURRENCY,
        connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT, timeout: float | None = None,
        on_result: OnResult | None = None) -> list[Transfer]:
    """Copy a local file or directory to ``remote`` on every node (rsync semantics; parents created).

    ``remote`` is relative to the home directory unless absolute; ending it with '/' puts ``local``
    inside that directory. A directory ``local`` ending in '/' copies its contents.
    """
    source = os.path.expanduser(local)
    if not local.strip():
        raise CloisterError("LOCAL: expected a file or directory to copy")
    if not os.path.exists(source):
        raise CloisterError(f"LOCAL {local!r}: no such file or directory")
    if not os.access(source, os.R_OK):
        raise CloisterError(f"LOCAL {local!r}: not readable")
    target = _remote_path(remote, what="REMOTE")
    parent = target if target.endswith("/") else posixpath.dirname(target)
    known = os.path.expanduser(info.known_hosts) if info.known_hosts else None

    def one(cxn: Connection):
        return transfer.rsync(cxn, local, target, known_hosts=known,
                              mkdir=parent or None, timeout=timeout)

    return _fan_out(info, nodes, one, concurrency=concurrency, connect_timeout=connect_timeout,
                    on_result=on_result)


def get(info: ClusterInfo, remote: str, local_dir: str, *, nodes: Sequence[Node],
        concurrency: int = hosts.DEFAULT_CONCURRENCY,
        connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT, timeout: float | None = None,
        on_result: OnResult | None = None) -> list[Transfer]:
    """Copy ``remote`` (a file, directory or glob) from every node into ``local_dir/{host}/``."""
    source = _remote_path(remote, what="REMOTE")
    base = Path(os.path.expanduser(local_dir))
    if not local_dir.strip():
        raise CloisterError("LOCALDIR: expected a directory to download into")
    if base.exists() and not base.is_dir():
        raise CloisterError(f"LOCALDIR {local_dir!r}: exists and is not a directory")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CloisterError(f"LOCALDIR {local_dir!r}: cannot create it: {err.strerror}")
    known = os.path.expanduser(info.known_hosts) if info.known_hosts else None

    def one(cxn: Connection):
        folder = base / cxn.host
        fresh = not folder.exists()
        folder.mkdir(exist_ok=True)
        result = transfer.rsync(cxn, source, str(folder) + "/", download=True, known_hosts=known,
                                timeout=timeout)
        if result.exited != 0 and fresh and not any(folder.iterdir()):
            folder.rmdir()  # no empty folder for a node that sent nothing
        return result

    return _fan_out(info, nodes, one, concurrency=concurrency, connect_timeout=connect_timeout,
                    on_result=on_result)


def failures(transfers: Iterable[Transfer]) -> dict[str, str]:
    return {t.host: t.error or "failed" for t in transfers if not t.ok}
