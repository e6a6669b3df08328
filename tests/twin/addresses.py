"""The twin's loopback address pool: 127.0.S.h with S in 200-249, one /24 claimed at a time.

cloister's local provider in loopback mode claims 127.0.S.0/24 blocks from S=1 upwards through files
in its claims directory; the twin takes claims there too (same files, same lock), so neither hands out an address
the other uses. Addresses are never reused within a twin, as a terminated instance's known host key
would otherwise clash with its successor's.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path

from cloister.providers.local.subnets import CLAIMS_DIR, claims_lock

FIRST_SUBNET, LAST_SUBNET = 200, 249
HOSTS = range(1, 255)
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class PoolExhausted(RuntimeError):
    pass


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in LOOPBACK
    except ValueError:
        return False


def _answers_ssh(subnet: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((f"127.0.{subnet}.1", 22)) == 0


class AddressPool:
    """Hands out loopback addresses; ``owner`` (an existing directory) is written in each claim."""

    def __init__(self, owner: Path):
        self.owner = owner
        self.subnets: list[int] = []
        self._next: list[str] = []
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            if not self._next:
                subnet = self._claim()
                self._next = [f"127.0.{subnet}.{host}" for host in reversed(HOSTS)]
            return self._next.pop()

    def _claim(self) -> int:
        with claims_lock():
            for subnet in range(FIRST_SUBNET, LAST_SUBNET + 1):
                claim = CLAIMS_DIR / str(subnet)
                if claim.exists() and Path(claim.read_text().strip()).exists():
                    continue
                if _answers_ssh(subnet):
                    continue
                claim.write_text(str(self.owner))
                self.subnets.append(subnet)
                return subnet
        raise PoolExhausted(f"no free 127.0.S.0/24 block with S in {FIRST_SUBNET}-{LAST_SUBNET}")

    def release(self) -> None:
        """Drop this pool's claims (only those still naming its owner)."""
        with claims_lock():
            for subnet in self.subnets:
                claim = CLAIMS_DIR / str(subnet)
                if claim.exists() and Path(claim.read_text().strip()) == self.owner:
                    claim.unlink()
        self.subnets = []
        self._next = []
