"""Local hosts added to and removed from a running local cluster, and hosts that died.

A worker that replaces a dead one takes its name, with a new address and host key, as a new machine
would have. New hosts take free addresses of the cluster's block (its network: the block cannot grow,
so neither can a cluster past it), those of ended hosts last: the others may still cache the old
host's link for such an address, and would not reach the new one for a while.
"""

from __future__ import annotations

import json
import shutil

from ...cluster.servers import ClusterInfo
from ...errors import ProviderError
from ...files import atomic_write
from .machines import STATE_FILE, LocalCluster, LocalHost, ensure_user
from .subnets import HOSTS_PER_SUBNET, Block

START_TIMEOUT = 30.0


def _hosts(machines: LocalCluster) -> tuple[dict, list[LocalHost]]:
    state = machines.state()
    return state, [LocalHost(name=h["name"], role=h["role"], address=h["address"]) for h in state["hosts"]]


def _retire(machines: LocalCluster, addresses: list[str]) -> None:
    state = machines.state()
    state["retired"] = sorted(set(state.get("retired", [])) | set(addresses))
    atomic_write(machines.dir / STATE_FILE, json.dumps(state, indent=2))


def _free_addresses(machines: LocalCluster, block: Block, used: set[str], count: int) -> list[str]:
    retired = set(machines.state().get("retired", []))
    every = [f"{block.prefix(i)}.{j}" for i in range(block.count) for j in range(1, HOSTS_PER_SUBNET + 1)]
    free = [a for a in every if a not in used and a not in retired] + [a for a in every if a in retired - used]
    free = free[:count]
    if len(free) < count:
        raise ProviderError(f"local cluster '{machines.cluster}' has addresses for {len(used) + len(free)} hosts "
                            f"({block.count} x /24 claimed at launch); launch a larger cluster instead",
                            provider="local", cluster=machines.cluster)
    return free



def add_workers(machines: LocalCluster, *, numbers: list[int], image: str | None,
                timeout: float = START_TIMEOUT) -> ClusterInfo:
    """Start workers ``numbers``; a dead host of the same name is ended and replaced."""
    state, present = _hosts(machines)
    names = [f"{machines.cluster}-worker-{n}" for n in numbers]
    replaced = {h.name: h for h in present if h.name in names}
    for name in replaced:
        machines.kill_host(name)
        shutil.rmtree(machines.host_dir(name), ignore_errors=True)
    present = [h for h in present if h.name not in replaced]
    _retire(machines, [h.address for h in replaced.values()])
    block = Block(**state["block"])
    addresses = _free_addresses(machines, block, {h.address for h in present}, len(names))
    new = [LocalHost(name=name, role="worker", address=address) for name, address in zip(names, addresses)]
    # The image the cluster was launched from (recorded at launch), else the config's.
    machines.prepare(new, ensure_user(state["user"]), state.get("image") or image, block, present=present)
    try:
        machines.start(new, block, timeout=timeout)
    except BaseException:
        remove_workers(machines, names=names)
        raise
    return machines.info()


def remove_workers(machines: LocalCluster, *, names: list[str]) -> int:
    """End the hosts ``names`` (dead ones too) and forget them; return how many were running."""
    state, present = _hosts(machines)
    doomed = [h for h in present if h.name in names]
    running = sum(1 for h in doomed if machines.host_alive(h.name))
    for host in doomed:
        machines.kill_host(host.name)
        shutil.rmtree(machines.host_dir(host.name), ignore_errors=True)
    _retire(machines, [h.address for h in doomed])
    # The hosts that stay learn the new list (known hosts, /etc/hosts); the state forgets the others.
    machines.prepare([], ensure_user(state["user"]), state.get("image"), Block(**state["block"]),
                     present=[h for h in present if h.name not in names])
    return running


def gone(machines: LocalCluster) -> dict[str, str]:
    """Hosts whose namespace's PID 1 (sshd) is no longer running: name -> why."""
    _, present = _hosts(machines)
    found = {}
    for host in present:
        if not machines.host_alive(host.name):
            pid = machines.init_pid(host.name)
            found[host.name] = (f"its sshd (PID {pid}, the host's PID 1) is no longer running: the host died or "
                                f"was killed" if pid else "it never recorded a PID 1")
    return found
