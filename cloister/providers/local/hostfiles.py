"""The files of a local host: its sshd and ssh client configs, and the script that becomes its PID 1."""

from __future__ import annotations

import shlex
from pathlib import Path

from ...files import atomic_write
from .links import host_script
from ...netspec import NetworkSpec

SSHD_CONFIG = """\
# Written by cloister's local provider.
ListenAddress {listen}:22
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile /run/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
AllowUsers {user}
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
X11Forwarding no
AllowAgentForwarding yes
# Fan-out opens many connections to one host at once (field notes, SPEC 9).
MaxStartups 200:30:400
MaxSessions 200
Subsystem sftp internal-sftp
"""

SSH_CONFIG = """\
# Client defaults for ssh between the hosts of this local cluster.
Host *
    GlobalKnownHostsFile /etc/ssh/ssh_known_hosts
    StrictHostKeyChecking yes
"""

INIT_SCRIPT = """\
#!/bin/sh
# Runs as PID 1 of a new PID/mount/UTS (and network) namespace; becomes sshd.
set -e
H={hostdir}
hostname {hostname}
mount --bind "$H/etc_ssh" /etc/ssh
mount --bind "$H/etc_hosts" /etc/hosts
mount --bind "$H/etc_hostname" /etc/hostname
mount --bind "$H/home" {home}
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -m755 /run/sshd
install -m664 -g utmp /dev/null /run/utmp
mount -t tmpfs tmpfs /dev/shm
# /tmp last: the host directories may themselves live under /tmp.
mount --bind "$H/tmp" /tmp
{network}exec {sshd} -D -e -f /etc/ssh/sshd_config
"""


# In its own network namespace, a host waits for cloister to put its link there: a line on stdin
# (EOF, when cloister is gone before it, ends the host), then sets its own side up.
NETWORK_WAIT = """\
read -r go
exec </dev/null
"""


def init_script(*, hostdir: str, hostname: str, home: str, sshd: str, address: str, prefixlen: int,
                spec: NetworkSpec) -> str:
    network = "" if spec.mode == "loopback" else \
        NETWORK_WAIT + host_script(address=address, prefixlen=prefixlen, spec=spec)
    return INIT_SCRIPT.format(hostdir=shlex.quote(hostdir), hostname=shlex.quote(hostname), home=shlex.quote(home),
                              sshd=shlex.quote(sshd), network=network)


def sshd_config(*, address: str, user: str, spec: NetworkSpec) -> str:
    """Listening on every address of its own namespace, as on a real host; on loopback, on its own address."""
    return SSHD_CONFIG.format(listen=address if spec.mode == "loopback" else "0.0.0.0", user=user)


def host_order(name: str, role: str) -> tuple[int, int]:
    """Master, workers by number, dev: the order of the state file and of servers/."""
    number = name.rsplit("-", 1)[-1]
    return ({"master": 0, "worker": 1}.get(role, 2), int(number) if number.isdigit() else 0)


def host_public_key(hostdir: Path) -> str:
    return (hostdir / "etc_ssh" / "ssh_host_ed25519_key.pub").read_text().strip()


def share_hosts(hostdir: Path, *, etc_hosts: str, known_names: str) -> None:
    """A running host learns the cluster's hosts: /etc/hosts is a file bind-mounted into its namespace,
    so it is rewritten in place (a new file would not be seen); /etc/ssh is a directory mount."""
    with open(hostdir / "etc_hosts", "r+") as out:
        out.write(etc_hosts)
        out.truncate()
    atomic_write(hostdir / "etc_ssh" / "ssh_known_hosts", known_names)
