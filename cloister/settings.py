"""Where cloister keeps its files and how hard it pushes SSH: the ``cloister.*`` settings.

These are not cluster-config keys (those live in ``config.py``). The defaults are defined here once;
``tasks/__init__.py`` derives Invoke's defaults from them and a test checks that ``invoke.yaml``
mirrors them, so ``INVOKE_CLOISTER_*`` environment variables override each one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_CONCURRENCY = 64
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_SSH_IDLE = 600.0


@dataclass(frozen=True)
class Settings:
    """The ``cloister.*`` settings a task was given."""

    config: str = "configs/local.json"
    servers_dir: str = "servers"
    state_dir: str = ".cloister"
    concurrency: int = DEFAULT_CONCURRENCY
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    # Seconds a host's warm SSH connection (an OpenSSH master) stays open unused; 0: none kept.
    ssh_idle: float = DEFAULT_SSH_IDLE
    ssh_timeout: float = 600.0
    redeploy_concurrency: int = 8  # rsyncs at once from the dev instance
    # A booting node whose console has not moved for this long, with no SSH yet, is a hung boot.
    boot_stall: float = 120.0
    experiments: str = "experiments.yaml"
    runs_dir: str = "runs"


def defaults() -> dict[str, Any]:
    """The settings' defaults by name, as Invoke's configuration holds them."""
    return {f.name: f.default for f in dataclasses.fields(Settings)}
