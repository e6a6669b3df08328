"""The one atomic-write helper (a reader sees the old file or the new one, never half of either), and the
bounded reader of the files cloister reads whole."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename it."""
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


SMALL_FILE = 1 << 20  # bytes: a config file is a page or two of text


class NotASmallFile(Exception):
    """A file cloister reads whole is not a regular file, or is far larger than such a file can be."""


def read_small(path: str | os.PathLike, *, limit: int = SMALL_FILE) -> str:
    """The text of a regular file of at most ``limit`` bytes. A device, FIFO or socket (/dev/zero, a pipe
    that never ends) is refused before it is opened; a directory raises IsADirectoryError, a missing file
    FileNotFoundError, text that is not UTF-8 UnicodeDecodeError."""
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(info.st_mode):
        raise NotASmallFile("not a regular file (a device, pipe or socket)")
    with open(path, "rb") as src:
        data = src.read(limit + 1)
    if len(data) > limit:
        raise NotASmallFile(f"larger than {limit / (1 << 20):g} MiB" if limit >= 1 << 20 else f"larger than {limit} bytes")
    return data.decode("utf-8")
