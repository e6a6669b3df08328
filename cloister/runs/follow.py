"""Following a run's master: its log streamed as ``[master]`` lines until it ends, then its exit code."""

from __future__ import annotations

import shlex
import threading
from typing import TextIO

from fabric import Connection
from invoke.exceptions import CommandTimedOut

from ..errors import HostsFailed, RunTimeout
from ..layout import run_dir
from ..transport import hosts, remote
from .experiments import Benchmark
from .record import Proc
from .scripts import log_name

_OUTPUT_LOCK = threading.Lock()


def follow(cxn: Connection, proc: Proc, *, bench: Benchmark, run_id: str, out: TextIO | None, timeout: float,
           lines: str, limit: float, keep: bool, total: int) -> None:
    """Stream the master ``proc``'s log from line ``lines`` (tail's -n) to ``out`` until it ends or ``timeout``
    seconds pass (RunTimeout naming ``limit``, the whole timeout); set its exit code and status. A lost
    session is HostsFailed (``total`` hosts in the run)."""
    rdir = run_dir(bench.name, run_id)
    logfile = f"{rdir}/{log_name('master', None, run_id)}"
    exit_file = f"{rdir}/{proc.key}.exit"
    # -F, not -f: the log may not exist yet when the PID is already known. An ended master's PID may have
    # been reused by the time an attach comes: its exit file says it ended. The exit code comes back on
    # stderr once tail ends with the master, so no second round trip asks for it.
    command = (f"if [ -e {exit_file} ]; then tail -n {shlex.quote(lines)} {logfile} 2>/dev/null; "
               f"else tail -n {shlex.quote(lines)} -s 0.05 -F --pid={proc.pid} {logfile} 2>/dev/null; fi; "
               f"cat {exit_file} >&2 2>/dev/null; true")
    writer = remote.LineWriter("master", out, _OUTPUT_LOCK) if out else None
    exit_text = bytearray()
    try:
        # Guarded: a tail whose session is lost ends with it instead of outliving the run.
        remote.execute(cxn, f"bash -c {shlex.quote(command)}", timeout=timeout,
                       stdout=writer.write if writer else _discard, stderr=exit_text.extend)
    except CommandTimedOut:
        proc.status = "timeout"
        outcome = "left running (--keep)" if keep else "killed"
        raise RunTimeout(f"[{proc.host}] master still running after the {limit:g}s timeout; {outcome}",
                         benchmark=bench.name, run_id=run_id, timeout=limit)
    except Exception as exc:
        if not remote.connection_lost(exc):
            raise
        why = remote.lost_session(cxn) or hosts.describe_error(exc)
        raise HostsFailed({proc.host: f"SSH session lost while the master ran ({why})"}, total=total, what="master")
    finally:
        if writer:
            writer.flush()
    code = exit_text.decode(errors="replace").strip()
    proc.exit = int(code) if code.lstrip("-").isdigit() else None
    proc.status = "ok" if proc.exit == 0 else "failed"


def _discard(chunk: bytes) -> None:
    """A sink for output nobody reads (a run without ``out``)."""
