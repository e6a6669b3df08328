"""Loopback blocks for local clusters: each cluster claims whole 127.0.S.0/24 blocks, machine-wide.

A claim is a file ``/tmp/cloister-local-claims/S`` holding the claiming cluster's state folder, taken
under a lock, so clusters of different checkouts (or a test's) never share an address.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
from pathlib import Path

from ...errors import ProviderError

HOSTS_PER_SUBNET = 250


CLAIMS_DIR = Path("/tmp/cloister-local-claims")


@contextlib.contextmanager
def claims_lock():
    CLAIMS_DIR.mkdir(parents=True, exist_ok=True)
    with open(CLAIMS_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _subnet_in_use(subnet: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((f"127.0.{subnet}.1", 22)) == 0


def claim_subnets(count: int, owner: Path) -> list[int]:
    """Reserve ``count`` consecutive 127.0.S.0/24 blocks machine-wide for one cluster."""
    with claims_lock():
        def taken(subnet: int) -> bool:
            claim = CLAIMS_DIR / str(subnet)
            if claim.exists():
                holder = Path(claim.read_text().strip())
                if holder.exists() and holder != owner:
                    return True
            return _subnet_in_use(subnet)

        for first in range(1, 255 - count):
            block = list(range(first, first + count))
            if not any(taken(s) for s in block):
                for subnet in block:
                    (CLAIMS_DIR / str(subnet)).write_text(str(owner))
                return block
    raise ProviderError("no free 127.0.S.0/24 block left for another local cluster", provider="local")


def claimed_local_clusters() -> set[Path]:
    """State folders of every local cluster on this machine that holds addresses."""
    if not CLAIMS_DIR.is_dir():
        return set()
    owners = set()
    for claim in CLAIMS_DIR.iterdir():
        if claim.name.isdigit():
            try:
                owners.add(Path(claim.read_text().strip()))
            except OSError:
                continue
    return owners


def release_subnets(subnets: list[int], owner: Path) -> None:
    with claims_lock():
        for subnet in subnets:
            claim = CLAIMS_DIR / str(subnet)
            if claim.exists() and Path(claim.read_text().strip()) == owner:
                claim.unlink()

