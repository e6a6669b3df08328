"""Address blocks for local clusters, claimed machine-wide.

A netns cluster claims an aligned run of /24 blocks of 198.18.0.0/15 (reserved for network benchmarks;
block i is 198.18.0.0 + i*256) as one network on its own bridge; a loopback cluster claims 127.0.S.0/24
blocks. A claim is a file in ``/tmp/cloister-local-claims`` (``net-I`` or ``S``) holding the claiming
cluster's state folder, taken under a lock, so clusters of different checkouts (or a test's) never share
an address. A claim whose folder is gone is stale: its bridge, if one is left, is removed on the next claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from ...errors import ProviderError
from . import links

HOSTS_PER_SUBNET = 250
NETNS_RANGE = ipaddress.ip_network("198.18.0.0/15")
NETNS_BLOCKS = NETNS_RANGE.num_addresses // 256
CLAIMS_DIR = Path("/tmp/cloister-local-claims")


@dataclass(frozen=True)
class Block:
    """The addresses of one cluster: ``count`` /24 blocks from ``first`` (an index in its mode's range)."""
    mode: str
    first: int
    count: int

    def prefix(self, i: int) -> str:
        """The first three octets of the cluster's i-th /24."""
        if self.mode == "loopback":
            return f"127.0.{self.first + i}"
        base = NETNS_RANGE.network_address + (self.first + i) * 256
        return str(base).rsplit(".", 1)[0]

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.prefix(0)}.0/{24 - (self.count.bit_length() - 1)}", strict=False)

    @property
    def gateway(self) -> str:
        """This machine's address on the cluster's bridge."""
        return f"{self.prefix(self.count - 1)}.254"

    @property
    def bridge(self) -> str:
        return f"clb-{self.first}"

    def claim_names(self) -> list[str]:
        return [_claim_name(self.mode, i) for i in range(self.first, self.first + self.count)]

    def to_json(self) -> dict:
        return {"mode": self.mode, "first": self.first, "count": self.count}

    def index(self, address: str) -> int:
        """The place of ``address`` in the block: the launch gives the index-th host that address."""
        prefix, last = address.rsplit(".", 1)
        return next(i for i in range(self.count) if self.prefix(i) == prefix) * HOSTS_PER_SUBNET + int(last) - 1

    def veth(self, address: str) -> str:
        """The root end of the veth of the host at ``address``."""
        return f"clv{self.first}-{self.index(address)}"


def _claim_name(mode: str, index: int) -> str:
    return str(index) if mode == "loopback" else f"net-{index}"


@contextlib.contextmanager
def claims_lock():
    CLAIMS_DIR.mkdir(parents=True, exist_ok=True)
    with open(CLAIMS_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _holder(claim: Path) -> Path | None:
    try:
        return Path(claim.read_text().strip())
    except OSError:
        return None


def _loopback_in_use(subnet: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((f"127.0.{subnet}.1", 22)) == 0


def _candidates(mode: str, hosts: int) -> tuple[int, list[Block]]:
    count = -(-hosts // HOSTS_PER_SUBNET)
    if mode == "loopback":
        return count, [Block(mode, first, count) for first in range(1, 255 - count)]
    # A netns cluster is one network: a power-of-two run of /24s, aligned.
    count = 1 << (count - 1).bit_length()
    return count, [Block(mode, first, count) for first in range(0, NETNS_BLOCKS - count + 1, count)]


def _sweep_stale() -> None:
    """Drop claims whose cluster folder is gone, and the bridges they left (a crashed launch's)."""
    for claim in CLAIMS_DIR.iterdir():
        holder = _holder(claim) if claim.name.isdigit() or claim.name.startswith("net-") else None
        if holder is not None and not holder.exists():
            claim.unlink(missing_ok=True)
            if claim.name.startswith("net-"):
                links.remove_bridge("clb-" + claim.name[4:])


def claim_block(mode: str, hosts: int, owner: Path) -> Block:
    """Reserve addresses for ``hosts`` hosts machine-wide for the cluster whose state folder is ``owner``."""
    count, candidates = _candidates(mode, hosts)
    with claims_lock():
        _sweep_stale()
        used = links.used_networks() if mode == "netns" else []

        def taken(index: int) -> bool:
            holder = _holder(CLAIMS_DIR / _claim_name(mode, index))
            if holder is not None and holder != owner:
                return True
            return mode == "loopback" and _loopback_in_use(index)

        for block in candidates:
            if any([taken(i) for i in range(block.first, block.first + block.count)]):
                continue
            if any(block.network.overlaps(net) for net in used):
                continue
            for name in block.claim_names():
                (CLAIMS_DIR / name).write_text(str(owner))
            return block
    where = "127.0.S.0/24" if mode == "loopback" else f"{NETNS_RANGE} block of {count} /24"
    raise ProviderError(f"no free {where} left for another local cluster", provider="local")


def claimed_local_clusters() -> set[Path]:
    """State folders of every local cluster on this machine that holds addresses."""
    if not CLAIMS_DIR.is_dir():
        return set()
    owners = set()
    for claim in CLAIMS_DIR.iterdir():
        if claim.name.isdigit() or claim.name.startswith("net-"):
            holder = _holder(claim)
            if holder is not None:
                owners.add(holder)
    return owners


def release_claims(owner: Path) -> list[str]:
    """Drop every claim naming ``owner``; return the names of the bridges those claims may have left."""
    bridges = []
    with claims_lock():
        for claim in sorted(CLAIMS_DIR.iterdir()) if CLAIMS_DIR.is_dir() else []:
            if (claim.name.isdigit() or claim.name.startswith("net-")) and _holder(claim) == owner:
                if claim.name.startswith("net-"):
                    bridges.append("clb-" + claim.name[4:])
                claim.unlink(missing_ok=True)
    return bridges
