"""Read and write the servers/ folder (SPEC section 6), atomically.

The plain-text files keep the old scripts' names so scripts on the cluster keep
working; cluster.json is the full record that cloister itself reads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ServersError
from ..files import atomic_write

ROLES = ("master", "worker", "dev")
TEXT_FILES = ("manager.txt", "master.txt", "servers.txt", "servers_private.txt", "servers_public.txt",
              "mpi_hosts.txt")


@dataclass(frozen=True)
class Node:
    """One machine of a cluster; ``host`` is the address cloister connects to."""

    role: str
    id: str
    host: str
    private: str = ""
    public: str = ""
    name: str = ""
    slots: int | None = None  # processors the provider knows the machine has (mpirun's slots)


@dataclass(frozen=True)
class ClusterInfo:
    """What servers/cluster.json records about a cluster."""

    provider: str
    cluster_name: str
    user: str
    ssh_key: str
    nodes: list[Node]
    known_hosts: str | None = None
    region: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def master(self) -> Node | None:
        return next((n for n in self.nodes if n.role == "master"), None)

    @property
    def workers(self) -> list[Node]:
        return [n for n in self.nodes if n.role == "worker"]

    @property
    def dev(self) -> Node | None:
        return next((n for n in self.nodes if n.role == "dev"), None)

    @property
    def cluster_nodes(self) -> list[Node]:
        """Master and workers: the machines an experiment or `cluster.run` uses."""
        return [n for n in self.nodes if n.role in ("master", "worker")]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodes"] = [asdict(n) for n in self.nodes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ClusterInfo":
        nodes = [Node(**n) for n in data["nodes"]]
        fields = {k: data[k] for k in ("provider", "cluster_name", "user", "ssh_key")}
        return cls(nodes=nodes, known_hosts=data.get("known_hosts"), region=data.get("region"),
                   extra=data.get("extra") or {}, **fields)


WORKER_NAME = re.compile(r"-worker-(\d+)$")


def worker_number(node: Node) -> int | None:
    """N of a worker named ``{cluster}-worker-N`` (None for a machine named otherwise, a static host)."""
    found = WORKER_NAME.search(node.name)
    return int(found.group(1)) if found else None


def text_files(info: ClusterInfo) -> dict[str, str]:
    """The contents of the old plain-text files, one host per line."""
    master = info.master
    workers = info.workers

    def lines(values: list[str]) -> str:
        return "".join(v + "\n" for v in values)

    return {
        "manager.txt": lines([master.public or master.host] if master else []),
        "master.txt": lines([master.public or master.host] if master else []),
        "servers.txt": lines([w.public or w.host for w in workers]),
        "servers_private.txt": lines([w.private or w.host for w in workers]),
        "servers_public.txt": lines([w.public or w.host for w in workers]),
        "mpi_hosts.txt": mpi_hosts(info),
    }


def mpi_hosts(info: ClusterInfo) -> str:
    """An OpenMPI hostfile of the workers (private addresses, as the nodes reach each other): ``slots``
    is the worker's processor count where the provider knows it, else the config's ``mpi_slots``."""
    default = int(info.extra.get("mpi_slots") or 1)
    return "".join(f"{w.private or w.host} slots={w.slots or default} max-slots={w.slots or default}\n"
                   for w in info.workers)


def write_servers(directory: str | os.PathLike, info: ClusterInfo) -> Path:
    """Write every file of servers/; cluster.json goes last so readers never see a mix."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in text_files(info).items():
        atomic_write(folder / name, text)
    atomic_write(folder / "cluster.json", json.dumps(info.to_json(), indent=2) + "\n")
    return folder


def clear_servers(directory: str | os.PathLike) -> None:
    folder = Path(directory)
    for name in (*TEXT_FILES, "cluster.json"):
        (folder / name).unlink(missing_ok=True)


def read_servers(directory: str | os.PathLike, *, cluster_name: str | None = None) -> ClusterInfo:
    """Read servers/cluster.json; refuse one that belongs to another cluster than ``cluster_name``.

    The workers are those servers.txt lists, in its order (see ``_listed_workers``).
    """
    path = Path(directory) / "cluster.json"
    try:
        data = json.loads(path.read_text())
        info = ClusterInfo.from_json(data)
    except FileNotFoundError:
        raise ServersError(f"{path}: no cluster recorded; run inv cluster.launch first", path=str(path))
    except IsADirectoryError:
        raise ServersError(f"{path}: is a directory, expected a file; remove it and run inv cluster.launch",
                           path=str(path))
    except NotADirectoryError:
        raise ServersError(f"servers directory {directory}: is not a directory (cloister.servers_dir, "
                           f"INVOKE_CLOISTER_SERVERS_DIR)", path=str(path))
    # UnicodeDecodeError: a binary or truncated file; a ValueError, not a JSONDecodeError.
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ServersError(f"{path}: unreadable ({err.__class__.__name__}: {err}); "
                           f"run inv cluster.launch to rewrite it", path=str(path))
    if cluster_name is not None and info.cluster_name != cluster_name:
        raise ServersError(f"{path} describes cluster '{info.cluster_name}', but the config names "
                           f"'{cluster_name}'; use that cluster's config or run inv cluster.launch",
                           path=str(path))
    return _listed_workers(Path(directory) / "servers.txt", info)


def _listed_workers(path: Path, info: ClusterInfo) -> ClusterInfo:
    """``info`` with the workers that servers.txt lists, in its order.

    servers.txt is the file the old scripts and the help name, so people edit it: a worker taken out
    or moved there is taken out or moved for ``-k`` and every task. A host that cluster.json does not
    know as a worker cannot be honoured (no id, key or role): refused, never silently ignored.
    """
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return info
    except (OSError, UnicodeDecodeError) as err:
        raise ServersError(f"{path}: unreadable ({getattr(err, 'strerror', None) or err})", path=str(path))
    listed = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    # One machine may carry several workers (a static cluster listing a host twice): a line takes the
    # first worker with that name or address that no earlier line took.
    pools: dict[str, list[Node]] = {}
    for worker in info.workers:
        for key in dict.fromkeys(k for k in (worker.host, worker.public, worker.private, worker.name, worker.id) if k):
            pools.setdefault(key, []).append(worker)
    unknown = [h for h in listed if h not in pools]
    if unknown:
        raise ServersError(f"{path} lists {', '.join(unknown)}, but cluster.json disagrees: not a worker of "
                           f"cluster '{info.cluster_name}'; fix {path.name} or run inv cluster.launch to rewrite "
                           f"servers/", path=str(path))
    workers: list[Node] = []
    for host in listed:
        free = [w for w in pools[host] if w not in workers]
        if not free:
            raise ServersError(f"{path} lists {host} more times than cluster.json has workers there "
                               f"({len(pools[host])}); one line per worker", path=str(path))
        workers.append(free[0])
    if workers == info.workers:
        return info
    others = [n for n in info.nodes if n.role != "worker"]
    return replace(info, nodes=[n for n in others if n.role == "master"] + workers
                   + [n for n in others if n.role != "master"])
