"""put / get: rsync on this machine to / from every node in parallel.

Nothing here prints: results come back as ``Transfer`` values, live through ``on_result``.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fabric import Connection
from invoke.runners import Result

from . import hosts, shared, transfer
from ..errors import CloisterError
from ..cluster.servers import ClusterInfo, Node
from .transfer import OnResult, Transfer


def put(info: ClusterInfo, local: str, remote: str, *, nodes: Sequence[Node],
        concurrency: int = hosts.DEFAULT_CONCURRENCY,
        connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT, timeout: float | None = None,
        on_result: OnResult | None = None, sharing: shared.Sharing | None = None) -> list[Transfer]:
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
    known = _known_hosts(info)

    def one(cxn: Connection, stop: threading.Event) -> Result:
        return transfer.rsync(cxn, local, target, known_hosts=known,
                              mkdir=parent or None, timeout=timeout, stop=stop)

    return _fan_out(info, nodes, one, concurrency=concurrency, connect_timeout=connect_timeout,
                    on_result=on_result, sharing=sharing)


def get(info: ClusterInfo, remote: str, local_dir: str, *, nodes: Sequence[Node],
        concurrency: int = hosts.DEFAULT_CONCURRENCY,
        connect_timeout: float = hosts.DEFAULT_CONNECT_TIMEOUT, timeout: float | None = None,
        on_result: OnResult | None = None, sharing: shared.Sharing | None = None) -> list[Transfer]:
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
    known = _known_hosts(info)

    def one(cxn: Connection, stop: threading.Event) -> Result:
        folder = base / cxn.host
        fresh = not folder.exists()
        folder.mkdir(exist_ok=True)
        result = transfer.rsync(cxn, source, str(folder) + "/", download=True, known_hosts=known,
                                timeout=timeout, stop=stop)
        if result.exited != 0 and fresh and not any(folder.iterdir()):
            folder.rmdir()  # no empty folder for a node that sent nothing
        return result

    return _fan_out(info, nodes, one, concurrency=concurrency, connect_timeout=connect_timeout,
                    on_result=on_result, sharing=sharing)


def _remote_path(raw: str, *, what: str) -> str:
    """A path on the nodes as rsync takes it: relative paths start at the home directory."""
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


def _known_hosts(info: ClusterInfo) -> str | None:
    return os.path.expanduser(info.known_hosts) if info.known_hosts else None


def _fan_out(info: ClusterInfo, nodes: Sequence[Node], one: Callable[[Connection, threading.Event], Result], *,
             concurrency: int, connect_timeout: float, on_result: OnResult | None,
             sharing: shared.Sharing | None) -> list[Transfer]:
    """Run a local rsync per node, at most ``concurrency`` at a time; one Transfer per node, in order.

    On Ctrl-C the running rsyncs are killed (``one`` gets the stop event) and KeyboardInterrupt goes on.
    """
    hosts.check_key(info)
    results: dict[str, Transfer] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def run(node: Node) -> None:
        begin = time.monotonic()
        try:
            cxn = hosts.connection(info, node, connect_timeout=connect_timeout, sharing=sharing)
            result = one(cxn, stop)
            outcome = transfer.outcome(result, host=node.host, name=node.name, source="local",
                                       duration=time.monotonic() - begin)
        except Exception as exc:  # noqa: BLE001 - reported per node
            outcome = Transfer(host=node.host, name=node.name, source="local", ok=False,
                               duration=time.monotonic() - begin, error=hosts.describe_error(exc))
        with lock:
            results[node.host] = outcome
            if on_result and not stop.is_set():
                on_result(outcome)

    hosts.each(list(nodes), run, concurrency=concurrency, stop=stop)
    return [results[n.host] for n in nodes]
