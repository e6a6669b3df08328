"""Where cloister keeps its files on the nodes, relative to the login user's home.

Every module that places or reads something on a node takes its path from here, so a redeploy
that must not overwrite cloister's own files and the image builder that must leave them out
agree with the code that writes them.
"""

from __future__ import annotations

import shlex

REMOTE_DIR = "cloister"
SERVERS_DIR = f"{REMOTE_DIR}/servers"
KNOWN_HOSTS = f"{REMOTE_DIR}/known_hosts"
RUNS_DIR = f"{REMOTE_DIR}/runs"
# The cluster key and the known_hosts that OpenSSH on a node (rsync, ssh) uses to reach the others.
KEY = ".ssh/cloister_key"
SSH_KNOWN_HOSTS = ".ssh/cloister_known_hosts"
# The ssh client config (cluster key, host keys, user) that `ssh WORKER` and mpirun on a node use.
SSH_CONFIG = ".ssh/cloister_config"
# cloister's own files under ~/cloister: the default redeploy_paths include cloister/, and a
# redeploy must neither overwrite nor --delete these.
NODE_STATE = (f"{SERVERS_DIR}/", KNOWN_HOSTS, f"{RUNS_DIR}/")
# Never in an image: the cluster's private key and ssh setup, and cloister's state on a node (servers/,
# known hosts, run logs), which belong to the cluster the dev instance served.
NOT_IN_IMAGES = (KEY, SSH_KNOWN_HOSTS, SSH_CONFIG, SERVERS_DIR, KNOWN_HOSTS, RUNS_DIR)


def home_path(path: str) -> str:
    """``path`` for ``~/...`` readers (cluster.json as a node sees it)."""
    return f"~/{path}"


def run_dir(benchmark: str, run_id: str) -> str:
    """A run's folder on a node, as a shell word (quoted, ``$HOME`` expanded by the shell)."""
    return f'"$HOME"/{RUNS_DIR}/{shlex.quote(benchmark)}/{shlex.quote(run_id)}'
