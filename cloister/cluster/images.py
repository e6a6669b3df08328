"""Images for ami.*: what ``ami: latest`` resolves to, creating and pruning, for any provider's image store.

Names are ``{ami_tag}-{yyyymmdd-hhmm}`` (``cloister.providers.base.prefix``); the store that lists,
creates and deletes them belongs to the provider (EC2 AMIs, local directory images).
"""

from __future__ import annotations

from datetime import datetime, timezone

from .. import providers
from ..config import ClusterConfig
from ..errors import ProviderError
from ..providers.base import TIMESTAMP, Image, ImageStore, Progress, matches, no_images_error, pattern, prefix
from ..settings import Settings

__all__ = ["Image", "create", "delete", "latest", "list_images", "matches", "new_name", "pattern", "prunable"]


def new_name(cfg: ClusterConfig, *, now: datetime | None = None) -> str:
    return f"{prefix(cfg)}-{(now or datetime.now(timezone.utc)):{TIMESTAMP}}"


def _store(cfg: ClusterConfig, settings: Settings) -> ImageStore:
    return providers.get(cfg, settings=settings).images()


def list_images(cfg: ClusterConfig, *, settings: Settings) -> list[Image]:
    """Own images whose name starts with the prefix, newest first."""
    return _store(cfg, settings).list(pattern(cfg))


def latest(cfg: ClusterConfig, *, settings: Settings) -> Image:
    """What ``ami: latest`` resolves to: the newest available image with the prefix."""
    store = _store(cfg, settings)
    available = [image for image in store.list(pattern(cfg)) if image.state == "available"]
    if not available:
        raise no_images_error(cfg, where=store.where)
    return available[0]


def create(cfg: ClusterConfig, *, settings: Settings, name: str | None = None,
           progress: Progress | None = None, reboot: bool = True) -> Image:
    """Image the dev instance as ``name`` or ``{prefix}-{UTC time}`` and wait until it can be launched."""
    return _store(cfg, settings).create(name or new_name(cfg), progress=progress, reboot=reboot)


def prunable(cfg: ClusterConfig, *, settings: Settings, keep: int) -> list[Image]:
    """The images ``prune --keep`` would delete: all but the newest ``keep``."""
    if keep < 0:
        raise ProviderError(f"--keep {keep}: expected 0 or more", provider=cfg.provider, cluster=cfg.cluster_name)
    return list_images(cfg, settings=settings)[keep:]


def delete(cfg: ClusterConfig, *, settings: Settings, doomed: list[Image]) -> list[str]:
    """Delete the ``doomed`` images with what backs them; one line per image."""
    return _store(cfg, settings).delete(doomed)
