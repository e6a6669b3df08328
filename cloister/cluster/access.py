"""How the nodes reach each other with standard tools: after copy-dns, ``ssh WORKER`` and
``mpirun --hostfile ~/cloister/servers/mpi_hosts.txt`` on the master work with no extra flags.

cloister writes an ssh client config of its own (the cluster key, the recorded host keys, the user)
and makes the user's ``~/.ssh/config`` include it, inside a marked block it can find again.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .. import layout
from .servers import ClusterInfo

INCLUDE_BEGIN = "# >>> cloister: the cluster's hosts (written by copy-dns) >>>"
INCLUDE_END = "# <<< cloister <<<"


def node_known_hosts(info: ClusterInfo) -> str:
    """The cluster's known_hosts with every node listed under all its names and addresses."""
    path = Path(os.path.expanduser(info.known_hosts)) if info.known_hosts else None
    try:
        text = path.read_text() if path else ""
    except OSError:
        text = ""
    aliases: dict[str, set[str]] = {}
    for node in info.nodes:
        names = {n for n in (node.host, node.private, node.public, node.name) if n}
        for name in names:
            aliases.setdefault(name, set()).update(names)
    out: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or line.startswith("#") or fields[0].startswith("|") or fields[0].startswith("@"):
            if line.strip():
                out.append(line)
            continue
        names: set[str] = set()
        for name in fields[0].split(","):
            names.add(name)
            names.update(aliases.get(name, ()))
        out.append(",".join(sorted(names)) + " " + " ".join(fields[1:]))
    return "".join(line + "\n" for line in out)


def ssh_config(info: ClusterInfo) -> str:
    """Client settings for every node, under each of its names and addresses. Not IdentitiesOnly: a
    forwarded agent (redeploy without a key on the dev instance) must still be offered."""
    names = sorted({n for node in info.nodes for n in (node.host, node.private, node.public, node.name) if n})
    # A node's name resolves nowhere (EC2's DNS knows only ip-... names): say which address it is.
    aliases = "".join(f"Host {node.name}\n    HostName {node.private or node.host}\n"
                      for node in info.nodes if node.name and node.name not in (node.host, node.private))
    return (f"# Written by cloister for cluster '{info.cluster_name}'; copy-dns rewrites it.\n"
            f"{aliases}"
            f"Host {' '.join(names)}\n"
            f"    User {info.user}\n"
            f"    IdentityFile ~/{layout.KEY}\n"
            f"    UserKnownHostsFile ~/{layout.SSH_KNOWN_HOSTS}\n"
            f"    StrictHostKeyChecking yes\n"
            f"    BatchMode yes\n")


def include_script() -> str:
    """Shell: put the marked Include block at the top of ~/.ssh/config (once; the user's lines stay)."""
    block = f"{INCLUDE_BEGIN}\nInclude ~/{layout.SSH_CONFIG}\n{INCLUDE_END}\n"
    return (f"touch .ssh/config && chmod 600 .ssh/config && "
            f"if ! grep -qxF {shlex.quote(INCLUDE_BEGIN)} .ssh/config; then "
            f"{{ printf %s {shlex.quote(block)}; cat .ssh/config; }} > .ssh/config.cloister && "
            f"mv .ssh/config.cloister .ssh/config; fi")


def image_cleanup_script() -> str:
    """Shell, run on the dev instance before it is imaged: remove what an image must never contain
    (the cluster key and ssh setup, cloister's state, SSH control sockets) and the cluster keys that
    copy-dns authorized, so instances of the image trust no old cluster."""
    paths = " ".join(shlex.quote(p) for p in layout.NOT_IN_IMAGES)
    return (f"rm -rf -- {paths} .ssh/cloister-cm-* && "
            f"if [ -f .ssh/authorized_keys ]; then grep -v 'cloister-cluster:' .ssh/authorized_keys "
            f"> .ssh/authorized_keys.cloister; mv .ssh/authorized_keys.cloister .ssh/authorized_keys; fi && "
            f"if [ -f .ssh/config ]; then sed -i {shlex.quote(f'/^{INCLUDE_BEGIN}$/,/^{INCLUDE_END}$/d')} "
            f".ssh/config; fi")
