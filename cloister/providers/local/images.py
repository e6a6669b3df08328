"""Directory images for the local provider: ``ami.create`` copies the dev host's home.

An image is a directory ``{state_dir}/images/{prefix}-{yyyymmdd-hhmm}``; a local config with
``ami: latest`` launches from the newest, as an EC2 config launches from the newest own AMI.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from ... import layout
from ...config import ClusterConfig
from ...errors import ProviderError
from ..base import Image, ImageStore, Progress, matches
from .machines import state_dir as cluster_dir

LEFT_OUT = layout.NOT_IN_IMAGES
LEFT_OUT_NOTE = ("the image leaves out sockets, fifos and device files (such as SSH control sockets), the "
                 "cluster key and cloister's state on the node: " + ", ".join(f"~/{p}" for p in LEFT_OUT))


def _left_out(home: Path) -> Callable[[str, list[str]], set[str]]:
    """A copytree ``ignore`` for ``home``: what LEFT_OUT names, and every entry that is not a
    regular file, directory or symlink (a socket cannot be copied; a fifo would block the copy)."""
    skipped = {home / path for path in LEFT_OUT}

    def ignore(folder: str, names: list[str]) -> set[str]:
        out = set()
        for name in names:
            path = Path(folder) / name
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue  # gone since it was listed: copytree reports it if it matters
            if path in skipped or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                out.add(name)
        return out

    return ignore


def _first_problem(err: OSError) -> str:
    """One line for a failed copy: copytree gathers (source, target, why) for every file that failed."""
    problems = err.args[0] if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) else []
    if not problems:
        return f"{err.filename}: {err.strerror}" if err.filename else str(err)
    source, _, why = problems[0]
    return f"{source}: {why}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def images_dir(state_dir: str) -> Path:
    return Path(state_dir).resolve() / "images"


def dev_home(cfg: ClusterConfig, *, state_dir: str) -> Path:
    """The local dev host's home directory."""
    return cluster_dir(state_dir, cfg.cluster_name) / "hosts" / f"{cfg.cluster_name}-dev" / "home"


class LocalImages(ImageStore):
    """Directory images under ``{state_dir}/images``."""

    def __init__(self, cfg: ClusterConfig, *, state_dir: str):
        self.cfg = cfg
        self.state_dir = state_dir
        self.folder = images_dir(state_dir)
        self.where = f"under {self.folder}"
        self.left_out = LEFT_OUT_NOTE

    def list(self, pattern: str) -> list[Image]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            # Names starting with "." are copies in progress (see create).
            if path.is_dir() and matches(self.cfg, path.name) and not path.name.startswith("."):
                created = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
                found.append(Image(id=str(path), name=path.name, created=created))
        return sorted(found, key=lambda i: (i.created, i.name), reverse=True)

    def create(self, name: str, *, progress: Progress | None = None, reboot: bool = True) -> Image:
        cfg = self.cfg
        home = dev_home(cfg, state_dir=self.state_dir)
        if not home.is_dir():
            raise ProviderError(f"no dev host home at {home}: launch the local cluster '{cfg.cluster_name}' with "
                                f"dev_host: true first", provider="local", cluster=cfg.cluster_name)
        if "/" in name or name.startswith("."):
            raise ProviderError(f"image name '{name}': expected a plain name without '/' or a leading '.'",
                                provider="local", cluster=cfg.cluster_name)
        target = self.folder / name
        if target.exists():
            raise ProviderError(f"image {target} already exists; wait a minute or pass --name",
                                provider="local", cluster=cfg.cluster_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy next to the target and rename, so `latest` never picks a half-copied image.
        partial = target.parent / f".{name}.partial-{os.getpid()}"
        try:
            shutil.copytree(home, partial, symlinks=True, ignore=_left_out(home))
            partial.rename(target)
        except (shutil.Error, OSError) as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise ProviderError(f"cannot copy the dev host's home into {target}: {_first_problem(err)}",
                                provider="local", cluster=cfg.cluster_name)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        # copytree copied the home's own mtime; the image's creation time orders `latest`.
        now = time.time()
        os.utime(target, (now, now))
        return Image(id=str(target), name=name, created=datetime.fromtimestamp(now, timezone.utc))

    def delete(self, doomed: list[Image]) -> list[str]:
        for image in doomed:
            shutil.rmtree(image.id)
        return [f"deleted {image.name} ({image.id})" for image in doomed]
