"""The one place that builds Fabric Connections and Groups from servers/.

Host keys are checked against the known_hosts the provider recorded: a host
listed there with another key is refused; a host not listed yet (a fresh EC2
node) is trusted on first contact and recorded.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import queue
import resource
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paramiko
from fabric import Config, Connection
from fabric.exceptions import GroupException
from fabric.group import GroupResult, ThreadingGroup
from invoke.exceptions import CommandTimedOut, ThreadException, UnexpectedExit

from ..errors import CloisterError, HostsFailed
from ..poll import Backoff
from . import shared
from .remote import SharedConnection, Stopped
from ..cluster.servers import ClusterInfo, Node
from ..settings import DEFAULT_CONCURRENCY, DEFAULT_CONNECT_TIMEOUT

# paramiko logs a connection reset by a host going away ("Socket exception: ...") from its transport
# thread; with no handler of its own that would reach the terminal through logging's last resort.
# Every such failure reaches cloister as an exception, which names its host.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

# How often a wait for SSH asks the provider whether silent nodes' boots have failed.
BOOT_LOOK_EVERY = 10.0

STOP_GRACE = 1.0  # seconds the workers get to wind down after Ctrl-C before the exit goes on without them
# Seconds between SSH keepalives on every connection: a link that died under an idle session (a run's
# master followed for hours) is found by the next one that goes unanswered, not left open forever.
KEEPALIVE = 15


def raise_nofile_limit() -> int:
    """Raise the open-files soft limit to the hard limit (128-host clusters); return the new soft limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        infinity = resource.RLIM_INFINITY
        if soft == infinity or (hard != infinity and soft >= hard):
            return soft
        target = hard if hard != infinity else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _RecordingPolicy(paramiko.MissingHostKeyPolicy):
    """Trust a host seen for the first time and append its key to known_hosts."""

    def __init__(self, path: Path):
        self.path = path

    def missing_host_key(self, client, hostname, key):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = f"{hostname} {key.get_name()} {key.get_base64()}"
        with open(self.path, "a+") as out:
            fcntl.flock(out, fcntl.LOCK_EX)
            out.seek(0)
            # A warm connection's ssh may have recorded the host since this client read the file.
            recorded = {tuple(line.split()[1:3]) for line in out.read().splitlines()
                        if line.split()[:1] == [hostname]}
            if any(kind == key.get_name() and data != key.get_base64() for kind, data in recorded):
                raise paramiko.SSHException(f"host key for {hostname} does not match the one in known_hosts")
            if (key.get_name(), key.get_base64()) not in recorded:
                out.write(entry + "\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def _known_hostnames(path: Path) -> set[str]:
    names: set[str] = set()
    try:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                names.update(line.split()[0].split(","))
    except OSError:
        pass
    return names


class _Connection(Connection):
    """A Fabric Connection whose SSH transport sends keepalives."""

    def open(self) -> Any:
        result = super().open()
        transport = self.client.get_transport()
        if transport is not None:
            transport.set_keepalive(KEEPALIVE)
        return result


def connection(info: ClusterInfo, node: Node | str, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
               forward_agent: bool = False, sharing: shared.Sharing | None = None) -> Connection:
    """A Connection to one node (or host address) of ``info``, with the cluster's key and host keys.

    ``forward_agent`` forwards the local SSH agent (SSH_AUTH_SOCK) into the sessions it opens.
    With ``sharing`` (and no agent to forward), commands go over the host's warm OpenSSH master.
    """
    check_key(info)
    host = node.host if isinstance(node, Node) else node
    config = Config(overrides={"load_ssh_configs": False, "run": {"hide": True, "warn": True, "in_stream": False}})
    warm = sharing is not None and not forward_agent
    cxn = (SharedConnection if warm else _Connection)(
        host, user=info.user, port=22, config=config, connect_timeout=connect_timeout,
        forward_agent=forward_agent,
        connect_kwargs={"key_filename": [os.path.expanduser(info.ssh_key)], "look_for_keys": False,
                        "allow_agent": False, "banner_timeout": connect_timeout,
                        "auth_timeout": connect_timeout},
    )
    if info.known_hosts:
        path = Path(os.path.expanduser(info.known_hosts))
        if path.exists():
            cxn.client.load_host_keys(str(path))
        if host in _known_hostnames(path):
            cxn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        else:
            cxn.client.set_missing_host_key_policy(_RecordingPolicy(path))
    if warm:
        known = bool(info.known_hosts) and host in _known_hostnames(Path(os.path.expanduser(info.known_hosts)))
        cxn.share(sharing, shared.options(
            key=os.path.expanduser(info.ssh_key) if info.ssh_key else None, connect_timeout=connect_timeout,
            known_hosts=os.path.expanduser(info.known_hosts) if info.known_hosts else None, known=known))
    return cxn


def sharing(info: ClusterInfo, *, state_dir: str, idle: float) -> shared.Sharing | None:
    """Where ``info``'s warm connections live (None: ``idle`` 0 turns them off)."""
    return shared.sharing(state_dir, cluster=info.cluster_name, provider=info.provider, region=info.region,
                          idle=idle)


def check_key(info: ClusterInfo) -> None:
    """Refuse, naming the file, a cluster key that is missing, not a file or readable by others.

    Paramiko would use a key that OpenSSH (cluster.login, rsync) refuses as unprotected, and a missing
    key would fail on every host with a bare "No such file or directory": check once, the same way
    for every task, before any connection.
    """
    if not info.ssh_key:
        return
    path = Path(os.path.expanduser(info.ssh_key))
    try:
        st = path.stat()
    except OSError as err:
        raise CloisterError(f"cluster key file {path} (ssh_key in cluster.json): {err.strerror}")
    if not stat.S_ISREG(st.st_mode):
        raise CloisterError(f"cluster key file {path} (ssh_key in cluster.json) is not a regular file")
    if st.st_mode & 0o077:
        raise CloisterError(f"cluster key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                            f"expected 0600 or narrower (chmod 600 {path})")


def ssh_argv(info: ClusterInfo, host: str, command: list[str] | None = None, *,
             sharing: shared.Sharing | None = None) -> list[str]:
    """The system ssh command line for ``host`` with the cluster's user, key and known_hosts (over the
    host's warm master when ``sharing`` has a live one)."""
    check_key(info)
    argv = ["ssh", "-i", os.path.expanduser(info.ssh_key), "-o", "IdentitiesOnly=yes"]
    socket_path = sharing.socket(info.user, host) if sharing else None
    if socket_path and shared.alive(socket_path):
        argv += ["-o", "ControlMaster=no", "-o", f"ControlPath={socket_path}"]
    if info.known_hosts:
        # accept-new: a host seen for the first time is recorded; a changed key is still refused.
        argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(info.known_hosts)}",
                 "-o", "StrictHostKeyChecking=accept-new"]
    return argv + [f"{info.user}@{host}", *(command or [])]


class CappedGroup(ThreadingGroup):
    """A ThreadingGroup that runs at most ``concurrency`` hosts at a time, and stops on Ctrl-C.

    Connections stay open between calls only while the group fits within ``concurrency``; a larger
    group (a 128-host cluster) closes each connection when its host is done, so no more than
    ``concurrency`` connections (and their transport threads) are ever open. A closed Connection
    reconnects by itself on its next use. ``stop`` is set when the caller is interrupted: work that
    polls it (``remote.execute``) ends at once, hosts not started yet are skipped.
    """

    def __init__(self, *args: Any, concurrency: int = DEFAULT_CONCURRENCY, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.concurrency = max(1, concurrency)
        self.stop = threading.Event()

    @classmethod
    def of(cls, connections: Iterable[Connection], *, concurrency: int) -> "CappedGroup":
        group = cls(concurrency=concurrency)
        group.extend(connections)
        return group

    def _do(self, method: str, *args: Any, **kwargs: Any) -> GroupResult:
        return self.call(lambda cxn: getattr(cxn, method)(*args, **kwargs))

    def call(self, fn: Callable[[Connection], Any]) -> GroupResult:
        """Run ``fn(cxn)`` for every connection; raise GroupException if any raised."""
        results = GroupResult()
        lock = threading.Lock()
        failed = False
        keep_open = len(self) <= self.concurrency

        def one(cxn: Connection) -> None:
            nonlocal failed
            try:
                value = Stopped() if self.stop.is_set() else fn(cxn)
            except Exception as exc:  # noqa: BLE001 - reported per host
                value = exc
            finally:
                if not keep_open:
                    cxn.close()
            with lock:
                results[cxn] = value
                failed = failed or isinstance(value, BaseException)

        each(list(self), one, concurrency=self.concurrency, stop=self.stop)
        if failed:
            raise GroupException(results)
        return results


def each(items: list[Any], fn: Callable[[Any], None], *, concurrency: int, stop: threading.Event) -> None:
    """Call ``fn(item)`` for every item on at most ``concurrency`` threads; ``fn`` must not raise.

    Ctrl-C reaches only this (the main) thread: it sets ``stop``, gives the workers STOP_GRACE
    seconds to notice it and wind down (close their channels, kill their processes), and re-raises.
    The workers are daemon threads, so one that cannot notice (a handshake in progress) does not
    hold up the exit.
    """
    if not items:
        return
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        pending.put(item)
    count = running = min(max(1, concurrency), len(items))
    lock = threading.Lock()
    finished = threading.Event()

    def worker() -> None:
        nonlocal running
        try:
            while True:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    return
                fn(item)
        finally:
            with lock:
                running -= 1
                if not running:
                    finished.set()

    for _ in range(count):
        threading.Thread(target=worker, daemon=True).start()
    # Not Thread.join: on Python 3.11 a join interrupted by Ctrl-C marks the thread as ended, and every
    # later join returns at once.
    try:
        finished.wait()
    except BaseException:
        stop.set()
        finished.wait(STOP_GRACE)
        raise


def put_files(cxn: Connection, files: dict[str, tuple[bytes, int]]) -> None:
    """Write ``files`` (path relative to home -> (content, mode)) over one SFTP session, each atomically
    (temporary file, then rename), so a reader on the node never sees half a file."""
    sftp = cxn.sftp()
    try:
        for path, (data, mode) in files.items():
            tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
            sftp.putfo(io.BytesIO(data), tmp)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, path)
    finally:
        sftp.close()


def select_nodes(info: ClusterInfo, *, role: str = "all", k: int | None = None,
                 hosts: Iterable[str] | None = None) -> list[Node]:
    """Pick nodes by role (all | master | workers | dev), first ``k`` workers, or explicit hosts."""
    if role not in ("all", "master", "workers", "dev"):
        raise CloisterError(f"role '{role}': expected one of all, master, workers, dev")
    if role == "master":
        nodes = [info.master] if info.master else []
    elif role == "workers":
        nodes = info.workers
    elif role == "dev":
        nodes = [info.dev] if info.dev else []
    else:
        nodes = info.cluster_nodes
    if k is not None:
        workers = info.workers
        if k < 0 or k > len(workers):
            raise CloisterError(f"-k {k}: the cluster has {len(workers)} workers")
        nodes = [n for n in nodes if n.role != "worker"] + workers[:k] if role == "all" else workers[:k]
    if hosts:
        wanted = list(hosts)
        by_key = {key: n for n in info.nodes for key in (n.host, n.name, n.id, n.public, n.private) if key}
        unknown = [h for h in wanted if h not in by_key]
        if unknown:
            raise CloisterError(f"--hosts: {', '.join(unknown)} not in cluster '{info.cluster_name}'")
        nodes = [by_key[h] for h in wanted]
    if not nodes:
        raise CloisterError(f"no {role} nodes in cluster '{info.cluster_name}'")
    return nodes


def group(info: ClusterInfo, nodes: Iterable[Node], *, concurrency: int = DEFAULT_CONCURRENCY,
          connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, sharing: shared.Sharing | None = None) -> CappedGroup:
    """A CappedGroup over ``nodes`` of ``info`` (over warm connections with ``sharing``)."""
    return CappedGroup.of((connection(info, n, connect_timeout=connect_timeout, sharing=sharing) for n in nodes),
                          concurrency=concurrency)


def describe_error(exc: BaseException) -> str:
    """One line for an exception raised while talking to a host."""
    if isinstance(exc, ThreadException) and exc.exceptions:
        return describe_error(exc.exceptions[0].value)
    if isinstance(exc, UnexpectedExit):
        result = exc.result
        tail = (result.stderr or result.stdout or "").strip().splitlines()
        return f"exit {result.exited}" + (f": {tail[-1]}" if tail else "")
    if isinstance(exc, CommandTimedOut):
        return f"timed out after {exc.timeout}s"
    if isinstance(exc, paramiko.BadHostKeyException):
        return f"host key mismatch for {exc.hostname} (expected {exc.expected_key.get_name()}); refusing to connect"
    if isinstance(exc, paramiko.SSHException) and "not found in known_hosts" in str(exc):
        return "host key not in known_hosts; refusing to connect"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"authentication failed ({exc})"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "connection timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is sshd running?)"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused (is sshd running?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    if isinstance(exc, CloisterError) and text:
        return text[0]  # already a message for the user
    return f"{exc.__class__.__name__}: {text[0]}" if text else exc.__class__.__name__


def failures(result: GroupResult) -> dict[str, str]:
    """host -> one-line error for every failed entry (exceptions and non-zero exits)."""
    out: dict[str, str] = {}
    for cxn, value in result.items():
        if isinstance(value, BaseException):
            out[cxn.host] = describe_error(value)
        elif getattr(value, "exited", 0) not in (0, None):
            tail = (value.stderr or value.stdout or "").strip().splitlines()
            out[cxn.host] = f"exit {value.exited}" + (f": {tail[-1]}" if tail else "")
    return out


def call(grp: CappedGroup, fn: Callable[[Connection], Any]) -> GroupResult:
    """Like CappedGroup.call but returns the GroupResult with exceptions in it instead of raising."""
    try:
        return grp.call(fn)
    except GroupException as exc:
        return exc.result


def check(result: GroupResult, *, what: str = "") -> GroupResult:
    """Raise HostsFailed naming every failed host; return ``result`` when all succeeded."""
    failed = failures(result)
    if failed:
        raise HostsFailed(failed, total=len(result), what=what)
    return result


def wait_ssh(info: ClusterInfo, nodes: Iterable[Node], *, timeout: float = 300.0,
             concurrency: int = DEFAULT_CONCURRENCY, probe_timeout: float = 5.0,
             failed_boots: Callable[[list[Node]], dict[str, str]] | None = None) -> None:
    """Wait until every node answers a command over SSH; name the ones that never do.

    ``failed_boots`` is asked now and then about the nodes still silent; a node it names (a boot that
    visibly hangs) fails the wait at once instead of running out the timeout.
    """
    pending = list(nodes)
    total = len(pending)
    backoff = Backoff(timeout, initial=0.05, maximum=5.0)
    next_look = time.monotonic() + BOOT_LOOK_EVERY
    while pending:
        with group(info, pending, concurrency=concurrency, connect_timeout=probe_timeout) as grp:
            result = call(grp, lambda cxn: cxn.run("true", timeout=probe_timeout))
        last = failures(result)
        pending = [n for n in pending if n.host in last]
        if not pending:
            return
        if failed_boots is not None and time.monotonic() >= next_look:
            next_look = time.monotonic() + BOOT_LOOK_EVERY
            hung = failed_boots(pending)
            if hung:
                # What SSH itself answered last tells a closed port from a refused key.
                raise HostsFailed({host: f"{why}; SSH said: {last[host]}" if host in last else why
                                   for host, why in hung.items()}, total=total, what="no SSH")
        if not backoff.wait():
            raise HostsFailed({n.host: last[n.host] for n in pending}, total=total,
                              what=f"no SSH after {timeout:.0f}s")
