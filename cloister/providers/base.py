"""The contract every provider fulfils, and the typed rows it answers with.

A provider turns a ``ClusterConfig`` into machines and back: launch, destroy, status, list, and a
rollback for a launch that failed after it created something. Capabilities not every provider has
(stop/start, a dry-run plan, images for ``ami.*``) raise ``ProviderError("provider X cannot Y")``
unless the provider overrides them. Code outside ``cloister/providers/`` talks to providers only
through this class; it never asks which provider it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from ..config import ClusterConfig
from ..errors import HostsFailed, ProviderError
from ..cluster.servers import ClusterInfo, Node
from ..settings import Settings

# (text, done, total): one call per poll, for a progress bar.
Progress = Callable[[str, int, int], None]
# Asked before anything is terminated; answers True to go ahead.
Confirm = Callable[[str], bool]


@dataclass(frozen=True)
class NodeStatus:
    """One node as its provider sees it now."""

    role: str
    id: str
    host: str
    state: str
    uptime_s: float | None = None
    name: str = ""
    type: str = ""
    ttl_left_s: float | None = None
    cost: str = ""  # for people: "$0.12", "-" or "unknown"
    cost_usd: float | None = None  # so far; None: unknown
    hourly_usd: float | None = None  # now
    why: str = ""  # a node servers/ records that the provider no longer runs: what became of it


@dataclass(frozen=True)
class ClusterRow:
    """One cluster in ``cluster.list``."""

    cluster: str
    masters: int
    workers: int
    states: str
    age_s: float | None = None
    types: str = ""
    ttl_left_s: float | None = None


@dataclass(frozen=True)
class Launched:
    """What a provider's launch brought up; ``created`` is False when it found the cluster running."""

    info: ClusterInfo
    created: bool


@dataclass(frozen=True)
class Image:
    """An image ``ami.*`` lists, creates and prunes: an AMI (``id`` = ami-...) or a local directory."""

    id: str
    name: str
    created: datetime
    state: str = "available"
    snapshots: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a launch would do, for ``cluster.launch --dry-run``; nothing was created."""

    text: tuple[str, ...]
    denied: tuple[str, ...] = ()  # calls the provider refused
    failures: tuple[str, ...] = ()  # what would make the launch fail, one line each

    def lines(self) -> list[str]:
        return list(self.text)


TIMESTAMP = "%Y%m%d-%H%M"


def prefix(cfg: ClusterConfig) -> str:
    """The image name prefix: ``ami_tag``, or the cluster name when a local config has none."""
    return cfg.ami_tag or cfg.cluster_name


def pattern(cfg: ClusterConfig) -> str:
    """Names of this config's images: the prefix and a dash, so 'alice-clamor' never takes 'alice-clamor2-...'."""
    return f"{prefix(cfg)}-*"


def matches(cfg: ClusterConfig, name: str) -> bool:
    return name.startswith(f"{prefix(cfg)}-")


def no_images_error(cfg: ClusterConfig, *, where: str) -> ProviderError:
    return ProviderError(f"no available image named '{pattern(cfg)}' {where}; run inv ami.create first "
                         f"(or check ami_tag in {cfg.source})", provider=cfg.provider, cluster=cfg.cluster_name)


class ImageStore(ABC):
    """A provider's images, named ``{prefix}-{yyyymmdd-hhmm}`` (see ``cloister.cluster.images``)."""

    where: str = ""  # for messages: "owned by you in us-west-2", "under .cloister/images"
    reboots: bool = False  # the dev instance restarts while it is imaged, unless asked not to
    left_out: str = ""  # what an image never contains, for ami.create to say; "" when it copies everything

    @abstractmethod
    def list(self, pattern: str) -> list[Image]:
        """Own images whose name matches ``pattern`` (``prefix-*``), newest first."""

    @abstractmethod
    def create(self, name: str, *, progress: Progress | None = None, reboot: bool = True) -> Image:
        """Image the dev instance as ``name`` and wait until the image can be launched; ``reboot``: let the
        provider restart the machine for a consistent disk, where it does (see ``reboots``)."""

    @abstractmethod
    def delete(self, doomed: list[Image]) -> list[str]:
        """Delete ``doomed`` with everything that backs them; one line per image."""


class Provider(ABC):
    """One provider bound to one cluster config; built by ``cloister.providers.get``."""

    name: ClassVar[str]
    # Machines that exist already answer SSH now or never; fresh ones take the full ssh_timeout.
    ssh_wait_cap: ClassVar[float | None] = None
    # True when destroy() asks ``confirm`` itself, with what it will end.
    confirms_destroy: ClassVar[bool] = False
    # True when it can start and end single workers of a running cluster (resize, repair).
    resizable: ClassVar[bool] = False

    def __init__(self, cfg: ClusterConfig, settings: Settings):
        self.cfg = cfg
        self.settings = settings

    def cannot(self, what: str) -> ProviderError:
        return ProviderError(f"provider {self.name} cannot {what} (cluster '{self.cfg.cluster_name}')",
                             provider=self.name, cluster=self.cfg.cluster_name)

    # -- the contract ---------------------------------------------------------------------

    @abstractmethod
    def launch(self, *, nworkers: int, confirm: Confirm | None = None,
               progress: Progress | None = None) -> Launched:
        """Bring the cluster up with ``nworkers`` workers, or find it running (idempotent)."""

    @abstractmethod
    def rollback(self, cause: BaseException, *, info: ClusterInfo, confirm: Confirm | None = None,
                 progress: Progress | None = None) -> str | None:
        """A launch that created ``info`` failed later (``cause``): end what it created, and say what
        became of it in one line (what was really ended, what was not), or None when nothing was made.

        May raise an error that tells what became of the machines instead of returning; the caller
        re-raises ``cause`` when it returns. Runs shielded from further Ctrl-C.
        """

    @abstractmethod
    def destroy(self, *, confirm: Confirm | None = None, progress: Progress | None = None) -> list[str]:
        """Tear the cluster down; one line for each thing done."""

    @abstractmethod
    def status(self) -> list[NodeStatus]:
        """Every node of the cluster now; empty when nothing of it exists."""

    @abstractmethod
    def list_clusters(self) -> list[ClusterRow]:
        """Every cluster this provider can see (ec2: in the region; local: on this machine)."""

    def verify_nodes(self, info: ClusterInfo) -> None:
        """Once SSH answers on every node: check what the provider promised (a TTL armed, say)."""

    def boot_failures(self, info: ClusterInfo, waiting: list[Node]) -> dict[str, str]:
        """Of the nodes SSH does not reach yet, those whose boot has visibly failed: host -> why."""
        return {}

    def ssh_hint(self, info: ClusterInfo, failed: HostsFailed) -> str:
        """What may be wrong when SSH never answered (a line for the user), or ""."""
        return ""

    def gone(self, info: ClusterInfo) -> dict[str, str]:
        """Nodes of ``info`` that the provider knows to have ended (reclaimed, terminated): node id -> why.
        One request for the whole cluster."""
        return {}

    def ensure_running(self, info: ClusterInfo) -> None:
        """Raise ProviderError when the cluster recorded in ``info`` is known to be gone."""

    def scope(self) -> str:
        """Where ``list_clusters`` looked, for people: "in us-west-2", "(local provider)"."""
        return f"({self.name} provider)"

    def status_caption(self, rows: list[NodeStatus]) -> str | None:
        """A line under the status table (the cost so far, say)."""
        return None

    def launch_warnings(self) -> list[str]:
        """What a person should know before this launch (a cluster without a TTL, say)."""
        return []

    def interrupted_note(self) -> str:
        """Said after a launch was interrupted: what became of the machines."""
        return ""

    # -- optional capabilities ---------------------------------------------------------

    def stop(self, *, progress: Progress | None = None) -> list[str]:
        raise self.cannot("stop a cluster")

    def start(self, *, progress: Progress | None = None) -> ClusterInfo:
        raise self.cannot("start a stopped cluster")

    def extend(self, *, seconds: int) -> list[str]:
        raise self.cannot("extend a TTL")

    def reap(self) -> list[str]:
        """End what outlived its TTL without noticing (a stopped cluster); one line for each."""
        return []

    def plan(self, *, nworkers: int) -> Plan:
        raise self.cannot("plan a launch (--dry-run)")

    # -- resize and repair (optional; a provider that can add workers can do both) ----------

    def add_workers(self, info: ClusterInfo, *, numbers: list[int], spot_fallback: bool = False,
                    progress: Progress | None = None) -> list[Node]:
        """Start workers numbered ``numbers`` (worker-N) as the cluster's others were started (type, image,
        network, tags, key, the cluster's expiry); return them running, in the order of ``numbers``.
        ``spot_fallback``: where spot capacity is refused, start them on demand instead."""
        raise self.cannot("resize or repair a cluster (its machines are not cloister's to start)")

    def remove_workers(self, info: ClusterInfo, *, nodes: list[Node], progress: Progress | None = None) -> list[str]:
        """End the workers ``nodes`` (gone ones included) and wait; one line for what was done."""
        raise self.cannot("resize a cluster (its machines are not cloister's to end)")

    def node_hourly(self, info: ClusterInfo, *, role: str) -> float | None:
        """What one more node of ``role`` costs per hour, in dollars (None: unknown or free)."""
        return None

    def images(self) -> ImageStore:
        raise self.cannot("keep images (ami.*)")

    def dev_info(self) -> tuple[ClusterInfo, str]:
        """How to reach the dev instance for ``ami.login``: (cluster record with its key, host)."""
        raise self.cannot("name a dev instance")

