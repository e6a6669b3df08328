"""Images for ami.*: EC2 AMIs (through cloister.ec2) and the local provider's directory images.

A local "AMI" is a directory under ``{state_dir}/images/``; ``ami.create`` snapshots the local dev
host's home into ``{ami_tag}-{yyyymmdd-hhmm}`` and a local config with ``ami: latest`` launches
from the newest one, as an EC2 config with ``ami: latest`` launches from the newest own AMI.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import ClusterConfig
from .errors import ProviderError

TIMESTAMP = "%Y%m%d-%H%M"


@dataclass(frozen=True)
class Image:
    """An AMI (``id`` = ami-...) or a local image (``id`` = its directory)."""

    id: str
    name: str
    created: datetime
    state: str = "available"
    snapshots: tuple[str, ...] = ()


def prefix(cfg: ClusterConfig) -> str:
    """The image name prefix: ``ami_tag``, or the cluster name when a local config has none."""
    return cfg.ami_tag or cfg.cluster_name


def pattern(cfg: ClusterConfig) -> str:
    """Names of this config's images: the prefix and a dash, so 'alice-clamor' never takes 'alice-clamor2-...'."""
    return f"{prefix(cfg)}-*"


def matches(cfg: ClusterConfig, name: str) -> bool:
    return name.startswith(f"{prefix(cfg)}-")


def new_name(cfg: ClusterConfig, *, now: datetime | None = None) -> str:
    return f"{prefix(cfg)}-{(now or datetime.now(timezone.utc)):{TIMESTAMP}}"


def _require_provider(cfg: ClusterConfig) -> None:
    if cfg.provider == "static":
        raise ProviderError(f"{cfg.source}: ami.* needs the ec2 or local provider; static machines have no images",
                            provider="static", cluster=cfg.cluster_name)


# -- dispatch ------------------------------------------------------------------


def list_images(cfg: ClusterConfig, *, state_dir: str) -> list[Image]:
    """Own images whose name starts with the prefix, newest first."""
    _require_provider(cfg)
    if cfg.provider == "local":
        return _local_images(cfg, state_dir)
    from . import ec2

    return ec2.list_images(cfg)


def latest(cfg: ClusterConfig, *, state_dir: str) -> Image:
    """What ``ami: latest`` resolves to: the newest available image with the prefix."""
    available = [image for image in list_images(cfg, state_dir=state_dir) if image.state == "available"]
    if not available:
        where = f"under {_images_dir(state_dir)}" if cfg.provider == "local" else f"owned by you in {cfg.region}"
        raise no_images_error(cfg, where=where)
    return available[0]


def no_images_error(cfg: ClusterConfig, *, where: str) -> ProviderError:
    return ProviderError(f"no available image named '{pattern(cfg)}' {where}; run inv ami.create first "
                         f"(or check ami_tag in {cfg.source})", provider=cfg.provider, cluster=cfg.cluster_name)


def create(cfg: ClusterConfig, *, state_dir: str, name: str | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> Image:
    """Image the dev instance (ec2) or the dev host's home (local) as ``name`` or ``{prefix}-{UTC time}``."""
    _require_provider(cfg)
    name = name or new_name(cfg)
    if cfg.provider == "local":
        return _local_create(cfg, state_dir, name)
    from . import ec2

    return ec2.create_image(cfg, name=name, progress=progress)


def prunable(cfg: ClusterConfig, *, state_dir: str, keep: int) -> list[Image]:
    """The images ``prune --keep`` would delete: all but the newest ``keep``."""
    if keep < 0:
        raise ProviderError(f"--keep {keep}: expected 0 or more", provider=cfg.provider, cluster=cfg.cluster_name)
    return list_images(cfg, state_dir=state_dir)[keep:]


def delete(cfg: ClusterConfig, *, doomed: list[Image]) -> list[str]:
    """Delete the ``doomed`` images (AMIs with their snapshots, or directories); one line per image."""
    if cfg.provider == "local":
        for image in doomed:
            shutil.rmtree(image.id)
        return [f"deleted {image.name} ({image.id})" for image in doomed]
    from . import ec2

    return ec2.delete_images(cfg, doomed=doomed)


# -- local directory images ----------------------------------------------------------


def _images_dir(state_dir: str) -> Path:
    return Path(state_dir).resolve() / "images"


def dev_home(cfg: ClusterConfig, *, state_dir: str) -> Path:
    """The local dev host's home directory (see cloister.local)."""
    from .local import state_dir as cluster_dir

    return cluster_dir(state_dir, cfg.cluster_name) / "hosts" / f"{cfg.cluster_name}-dev" / "home"


def _local_images(cfg: ClusterConfig, state_dir: str) -> list[Image]:
    folder = _images_dir(state_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        # Names starting with "." are copies in progress (see _local_create).
        if path.is_dir() and matches(cfg, path.name) and not path.name.startswith("."):
            created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            found.append(Image(id=str(path), name=path.name, created=created))
    return sorted(found, key=lambda i: (i.created, i.name), reverse=True)


def _local_create(cfg: ClusterConfig, state_dir: str, name: str) -> Image:
    home = dev_home(cfg, state_dir=state_dir)
    if not home.is_dir():
        raise ProviderError(f"no dev host home at {home}: launch the local cluster '{cfg.cluster_name}' with "
                            f"dev_host: true first", provider="local", cluster=cfg.cluster_name)
    if "/" in name or name.startswith("."):
        raise ProviderError(f"image name '{name}': expected a plain name without '/' or a leading '.'",
                            provider="local", cluster=cfg.cluster_name)
    target = _images_dir(state_dir) / name
    if target.exists():
        raise ProviderError(f"image {target} already exists; wait a minute or pass --name",
                            provider="local", cluster=cfg.cluster_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy next to the target and rename, so `latest` never picks a half-copied image.
    partial = target.parent / f".{name}.partial-{os.getpid()}"
    try:
        shutil.copytree(home, partial, symlinks=True)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # copytree copied the home's own mtime; the image's creation time orders `latest`.
    now = time.time()
    os.utime(target, (now, now))
    return Image(id=str(target), name=name, created=datetime.fromtimestamp(now, timezone.utc))
