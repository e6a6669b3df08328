"""SSH keys cloister makes: host keys for local hosts, and the cluster key.

The cluster key is what the nodes use among themselves (node-to-node ssh, mpirun, rsync from the
dev instance). It is made per cluster on this machine, authorized on every node, placed only where a
node needs to reach the others (the master, the dev instance), and deleted with the cluster: the
user's own key never leaves the user's machine.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..files import atomic_write
from .servers import ClusterInfo

KEY_FILE = "id_ed25519"


def keypair(comment: str = "") -> tuple[bytes, str]:
    """A new ed25519 key: (private key in OpenSSH format, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return private, f"{public} {comment}".strip()


def marker(info: ClusterInfo) -> str:
    """The comment that marks the cluster key's line in authorized_keys."""
    return f"cloister-cluster:{info.cluster_name}"


def folder(state_dir: str, info: ClusterInfo) -> Path:
    return Path(state_dir).resolve() / "keys" / info.provider / (info.region or "-") / info.cluster_name


def cluster_key(state_dir: str, info: ClusterInfo) -> tuple[Path, str]:
    """The cluster's key on this machine, made on first use: (private key file, public key line)."""
    where = folder(state_dir, info)
    private, public = where / KEY_FILE, where / f"{KEY_FILE}.pub"
    if not (private.exists() and public.exists()):
        where.mkdir(parents=True, exist_ok=True)
        where.chmod(0o700)
        secret, line = keypair(marker(info))
        atomic_write(private, secret, mode=0o600)
        atomic_write(public, line + "\n")
    return private, public.read_text().strip()


def forget(state_dir: str, info: ClusterInfo) -> None:
    forget_cluster(state_dir, provider=info.provider, region=info.region, cluster=info.cluster_name)


def forget_cluster(state_dir: str, *, provider: str, region: str | None, cluster: str) -> None:
    shutil.rmtree(Path(state_dir).resolve() / "keys" / provider / (region or "-") / cluster, ignore_errors=True)


def authorize_script(public_line: str, info: ClusterInfo) -> str:
    """Shell: authorize the cluster key for the login user, replacing an older key of the same cluster."""
    mark = shlex.quote(marker(info))
    return (f"touch .ssh/authorized_keys && chmod 600 .ssh/authorized_keys && "
            f"{{ grep -vF -- {mark} .ssh/authorized_keys; echo {shlex.quote(public_line)}; }} "
            f"> .ssh/authorized_keys.cloister && mv .ssh/authorized_keys.cloister .ssh/authorized_keys")


def revoke_script(info: ClusterInfo) -> str:
    """Shell: remove the cluster key from authorized_keys (machines that outlive the cluster)."""
    mark = shlex.quote(marker(info))
    return (f"[ ! -f .ssh/authorized_keys ] || {{ grep -vF -- {mark} .ssh/authorized_keys "
            f"> .ssh/authorized_keys.cloister; mv .ssh/authorized_keys.cloister .ssh/authorized_keys; }}")
