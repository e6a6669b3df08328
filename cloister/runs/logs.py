"""A run's logs: fetched from the hosts as one tar stream, removed from them, listed and read here.

Locally a run is ``{runs_dir}/{benchmark}/{run_id}/``: one folder per host and ``run.json``.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import tarfile
from pathlib import Path

from fabric import Connection

from .. import hosts
from ..errors import CloisterError
from ..layout import RUNS_DIR, run_dir
from .record import RECORD_FILE, RunRecord


def local_run_dir(runs_dir: str | os.PathLike, *, benchmark: str, run_id: str) -> Path:
    return Path(runs_dir) / benchmark / run_id


def download_run(grp: hosts.CappedGroup, *, benchmark: str, run_id: str, local_dir: Path,
                 before: str | None = None) -> dict[str, str]:
    """Fetch the run's folder from every host of ``grp`` into ``local_dir/{host}/``; return per-host errors.

    One command per host streams the folder as a tar archive; ``before`` (e.g. the kill script)
    runs first in the same command, so finishing a run costs one round trip per host.
    """
    fetch_logs = f"cd {run_dir(benchmark, run_id)} 2>/dev/null || exit 0\ntar -czf - ."
    script = (f"( {before}\n) 1>&2\n" if before else "") + fetch_logs

    def fetch(cxn: Connection) -> int:
        code, data, err = hosts.stream(cxn, f"bash -c {shlex.quote(script)}", timeout=120)
        if code != 0:
            raise CloisterError(f"exit {code}: " + (err.strip().splitlines() or ["(no message)"])[-1])
        if not data:
            return 0
        target = local_dir / cxn.host
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            archive.extractall(target, members=members, filter="data")
        return len(members)

    return hosts.failures(hosts.call(grp, fetch))


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
