"""A run's logs: fetched from the hosts as one tar stream, removed from them, listed and read here.

Locally a run is ``{runs_dir}/{benchmark}/{run_id}/``: one folder per host and ``run.json``.
"""

from __future__ import annotations

import os
import re
import shlex
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from fabric import Connection

from ..transport import hosts, remote
from ..errors import CloisterError
from ..layout import RUNS_DIR, run_dir
from .record import RECORD_FILE, RunRecord

FETCH_TIMEOUT = 120.0  # seconds for one host's clean-up and archive


def local_run_dir(runs_dir: str | os.PathLike, *, benchmark: str, run_id: str) -> Path:
    return Path(runs_dir) / benchmark / run_id


def download_run(grp: hosts.CappedGroup, *, benchmark: str, run_id: str, local_dir: Path,
                 before: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Fetch the run's folder from every host of ``grp`` into ``local_dir/{host}/``: (per-host errors,
    the hosts that had the folder).

    One command per host streams the folder as a tar archive; ``before`` (e.g. the kill script)
    runs first in the same command, so finishing a run costs one round trip per host. ``before``
    must be safe to run twice: a host whose SSH session is lost is reconnected and asked again.
    """
    fetch_logs = f"cd {run_dir(benchmark, run_id)} 2>/dev/null || exit 0\ntar -czf - ."
    script = (f"( {before}\n) 1>&2\n" if before else "") + fetch_logs
    command = f"bash -c {shlex.quote(script)}"

    def fetch(cxn: Connection) -> bool:
        # On disk, not in memory: a run's logs may be large.
        with tempfile.TemporaryFile() as archive:
            size = remote.reconnecting(lambda: _fetch_once(cxn, command=command, archive=archive, stop=grp.stop))
            if not size:
                return False
            archive.seek(0)
            target = local_dir / cxn.host
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=archive, mode="r:gz") as tar:
                tar.extractall(target, members=[m for m in tar.getmembers() if m.isfile()], filter="data")
            return True

    result = hosts.call(grp, fetch)
    return hosts.failures(result), [cxn.host for cxn, value in result.items() if value is True]


def _fetch_once(cxn: Connection, *, command: str, archive: BinaryIO, stop: threading.Event) -> int:
    """Run ``command`` once, its stdout into ``archive`` (emptied first); the archive's size."""
    archive.seek(0)
    archive.truncate()
    err = bytearray()
    code = remote.execute(cxn, command, stdout=archive.write, stderr=err.extend, timeout=FETCH_TIMEOUT, stop=stop)
    if code != 0:
        raise CloisterError(f"exit {code}: " + (err.decode(errors="replace").strip().splitlines() or
                                                ["(no message)"])[-1])
    return archive.tell()


def clean_remote(grp: hosts.CappedGroup, *, benchmark: str | None,
                 run_id: str | None) -> tuple[dict[str, str], list[str]]:
    """Remove a run's (or a benchmark's, or every) remote logs: (per-host errors, hosts that had them)."""
    if benchmark and run_id:
        target = run_dir(benchmark, run_id)
    else:
        target = f'"$HOME"/{RUNS_DIR}' + (f"/{shlex.quote(benchmark)}" if benchmark else "")
    result = hosts.call(grp, lambda c: c.run(f"if [ -e {target} ]; then rm -rf -- {target} && echo removed; fi",
                                             warn=False, timeout=60))
    had = [cxn.host for cxn, value in result.items()
           if not isinstance(value, BaseException) and value.stdout.strip() == "removed"]
    return hosts.failures(result), had


def local_runs(runs_dir: str | os.PathLike, *, benchmark: str | None = None) -> list[RunRecord]:
    """The record of every past run under ``runs_dir``, oldest first; unreadable ones are skipped."""
    pattern = f"{benchmark}/*/{RECORD_FILE}" if benchmark else f"*/*/{RECORD_FILE}"
    records = []
    for path in Path(runs_dir).glob(pattern):
        try:
            records.append(RunRecord.read(path.parent))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: r.run_id)


def read_metric(path: Path, *, pattern: str) -> float | str | None:
    """The first group of the last match of ``pattern`` in a log, as a float when it is one."""
    try:
        matches = re.findall(pattern, path.read_text(errors="replace"), flags=re.MULTILINE)
    except OSError:
        return None
    if not matches:
        return None
    value = matches[-1][0] if isinstance(matches[-1], tuple) else matches[-1]
    try:
        return float(value)
    except ValueError:
        return value
