"""A security group that does not let this machine in: ``refuse_public_ssh(twin, cluster=NAME)`` makes
the instances cloister launches for cluster NAME (its ClientToken starts with the name) answer SSH only
on their private address. The public address DescribeInstances reports is one where nothing listens,
so a connection to it is refused (EC2 would drop it, and SSH would time out instead), as when ssh_cidr
is wrong or a VPN shows AWS another address. The machine boots normally; its console says so.
"""

from __future__ import annotations

from collections.abc import Callable


def refuse_public_ssh(twin, *, cluster: str) -> Callable[[], None]:
    """Apply to every instance of ``cluster`` created from now on; returns the undo."""
    created = twin.created

    def fenced(instance) -> None:
        created(instance)  # boots the machine with sshd on its private and public addresses
        if (instance.client_token or "").startswith(f"{cluster}-"):
            with twin._lock:
                for nic in instance.nics.values():
                    if nic.public_ip:
                        nic.public_ip = twin.pool.take()  # never handed to the machine: nothing listens

    twin.created = fenced
    return lambda: setattr(twin, "created", created)
