"""Warm connections: one OpenSSH master per host (ControlMaster), kept open between invocations.

A new SSH connection costs a key exchange, an authentication and a fork of sshd: about 140 ms per host
on a small machine, whichever client makes it. A command over an open master costs a few
milliseconds (an ``ssh`` process that hands its pipes to the master over a Unix socket), less than a
new channel on an open Paramiko transport. So commands run as ``ssh -S SOCKET`` processes, and each
host's master outlives the invocation that opened it for ``idle`` seconds after its last use
(ControlPersist); ``cluster.destroy`` and ``cluster.stop`` close them at once.

Sockets live in ``{state_dir}/ssh/{cluster}/`` (directories mode 0700, one socket per host, named by a
digest so the path fits a Unix socket's 108 bytes). A socket whose master is gone is found by
connecting to it; it is removed and a fresh master opened in its place, without an error.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CloisterError

#: Cipher preference: AES-GCM is the cheapest on CPUs with AES-NI (every EC2 type); chacha20 next.
CIPHERS = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-ctr"
#: Key exchange: curve25519 first (what Paramiko, and so the rest of cloister, uses). OpenSSH's default
#: post-quantum exchange costs ~55 ms of client CPU per connection, which adds up over 128 hosts on
#: a small machine.
KEX = "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,diffie-hellman-group14-sha256"

SOCKET_DIR = "ssh"
# A Unix socket path holds 108 bytes; OpenSSH binds a temporary name 17 bytes longer first.
MAX_SOCKET_PATH = 88


@dataclass(frozen=True)
class Sharing:
    """Where one cluster's master sockets live and how long an unused master stays open."""

    directory: str
    idle: float

    def socket(self, user: str, host: str, port: int = 22) -> str:
        name = hashlib.sha256(f"{user}@{host}:{port}".encode()).hexdigest()[:16]
        return os.path.join(self.directory, name)


def sharing(state_dir: str, *, cluster: str, provider: str, region: str | None, idle: float) -> Sharing | None:
    """The socket folder of one cluster under ``state_dir`` (None when ``idle`` is 0: no sharing).

    A state directory too deep for a socket path (or with whitespace, which rsync's ``-e`` would split)
    gets its sockets under the temporary directory instead, in a folder of this user's, mode 0700.
    """
    if idle <= 0:
        return None
    digest = hashlib.sha256(f"{provider}/{region}/{cluster}".encode()).hexdigest()[:12]
    base = os.path.join(os.path.abspath(os.path.expanduser(state_dir)), SOCKET_DIR)
    if len(os.path.join(base, digest, "x" * 16)) > MAX_SOCKET_PATH or any(ch.isspace() for ch in base):
        base = os.path.join(tempfile.gettempdir(), f"cloister-{os.getuid()}")
    return Sharing(directory=os.path.join(base, digest), idle=idle)


def _private_dirs(path: str) -> None:
    """Create ``path`` and its socket parent with mode 0700 (a socket there authenticates as us)."""
    for folder in (os.path.dirname(path), path):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise CloisterError(f"{folder}: expected a directory of this user for SSH control sockets")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(folder, 0o700)


def alive(path: str) -> bool:
    """Whether a master answers on ``path`` (a stale socket refuses the connection)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def options(*, key: str | None, known_hosts: str | None, known: bool, connect_timeout: float) -> list[str]:
    """ssh options every cloister connection uses: the cluster key only, its known_hosts checked
    strictly (a host not listed yet is recorded on first contact, as Paramiko's policy does)."""
    argv = ["-F", "none", "-T", "-x", "-e", "none", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-o", f"ConnectTimeout={max(1, int(connect_timeout))}", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4", "-o", f"Ciphers={CIPHERS}", "-o", f"KexAlgorithms={KEX}"]
    if key:
        argv += ["-i", key, "-o", "IdentitiesOnly=yes"]
    if known_hosts:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}",
                 "-o", f"StrictHostKeyChecking={'yes' if known else 'accept-new'}"]
    return argv


def open_master(path: str, *, destination: str, ssh_options: list[str], idle: float, timeout: float) -> None:
    """Make sure a master serves ``path``: reuse a live one, else replace a stale socket by a new master.

    One process at a time per socket (a lock file beside it): two invocations must not both connect.
    Raises the error the connection failed with (``failure``).
    """
    _private_dirs(os.path.dirname(path))
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if alive(path):
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        argv = ["ssh", *ssh_options, "-M", "-N", "-f", "-o", f"ControlPath={path}",
                "-o", f"ControlPersist={max(1, int(idle))}", "--", destination]
        # stderr to a file, not a pipe: the master goes on in the background and may keep it open.
        with tempfile.TemporaryFile() as err:
            try:
                code = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                      start_new_session=True, timeout=timeout + 5).returncode
            except subprocess.TimeoutExpired:
                raise TimeoutError(errno.ETIMEDOUT, "connection timed out") from None
            err.seek(0)
            text = err.read().decode(errors="replace")
        if code != 0 or not alive(path):
            raise failure(text) or CloisterError(f"ssh exit {code}: {_last(text) or 'no master'}")


def client(path: str, *, destination: str, ssh_options: list[str], command: str) -> list[str]:
    """The argv of one command over the master at ``path``. Should the master have gone since it was
    checked, ssh connects on its own with the same options (and host-key checks)."""
    return ["ssh", *ssh_options, "-o", "ControlMaster=no", "-o", f"ControlPath={path}", "--", destination, command]


def close(directory: str) -> int:
    """Close every master of one cluster's socket folder and remove it; return how many were open."""
    folder = Path(directory)
    if not folder.is_dir():
        return 0
    closed = 0
    for entry in folder.iterdir():
        if entry.is_socket():
            if alive(str(entry)):
                subprocess.run(["ssh", "-F", "none", "-o", f"ControlPath={entry}", "-O", "exit", "cloister"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=30)
                closed += 1
        entry.unlink(missing_ok=True)
    folder.rmdir()
    return closed


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def failure(stderr: str) -> Exception | None:
    """The exception an ssh client's error text stands for (None: not one of ssh's own errors).

    Shaped as Paramiko's paths raise them, so a host's one-line error and whether a reconnect may cure
    it (``remote.connection_lost``) read the same whichever client met the failure.
    """
    text = stderr.strip()
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        return CloisterError("host key mismatch or unknown host key (strict host key checking); refusing to connect")
    last = _last(text)
    if not last:
        return None
    lowered = last.lower()
    if "connection refused" in lowered:
        return ConnectionRefusedError(errno.ECONNREFUSED, "connection refused (is sshd running?)")
    if "timed out" in lowered:
        return TimeoutError(errno.ETIMEDOUT, "connection timed out")
    if "no route to host" in lowered:
        return OSError(errno.EHOSTUNREACH, "No route to host")
    if last.startswith("Permission denied"):
        return CloisterError(f"authentication failed ({last})")
    if any(sign in last for sign in ("ssh: ", "Connection closed", "Connection reset", "closed by remote host",
                                     "client_loop:", "mux_client", "kex_exchange_identification",
                                     "Broken pipe", "Control socket")):
        return ConnectionResetError(errno.ECONNRESET, last)
    return None
