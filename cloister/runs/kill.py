"""Ending a benchmark's processes on the hosts outside a running ``Run``: one run's, or all of them."""

from __future__ import annotations

from ..transport import hosts, remote
from .experiments import Benchmark
from .conclusion import killed_script
from .scripts import kill_script, killall_script, parse_killed


def kill_run(grp: hosts.CappedGroup, *, bench: Benchmark, run_id: str) -> dict[str, str]:
    """Kill every process group run ``run_id`` started on the hosts of ``grp``; return per-host errors."""
    script = kill_script(bench, run_id)
    return hosts.failures(hosts.call(grp, lambda c: remote.reconnecting(lambda: c.run(script, warn=True, timeout=60))))


def end_run(grp: hosts.CappedGroup, *, bench: Benchmark, run_id: str, by: str) -> dict[str, str]:
    """Kill run ``run_id`` on the hosts of ``grp``, marked as killed by ``by``, for the session that follows
    it to conclude it so; return per-host errors."""
    script = "\n".join([killed_script(bench.name, run_id, by=by), kill_script(bench, run_id)])
    return hosts.failures(hosts.call(grp, lambda c: remote.reconnecting(lambda: c.run(script, warn=True, timeout=60))))


def killall(grp: hosts.CappedGroup, *, bench: Benchmark) -> dict[str, int | BaseException]:
    """Kill the benchmark's processes on every host of ``grp``: host -> processes signalled (or the error)."""
    result = hosts.call(grp, lambda c: c.run(killall_script(bench), warn=False, timeout=60))
    return {cxn.host: value if isinstance(value, BaseException) else parse_killed(value.stdout)
            for cxn, value in result.items()}
