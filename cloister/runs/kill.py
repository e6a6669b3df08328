"""Ending a benchmark's processes on the hosts outside a running ``Run``: one run's, or all of them."""

from __future__ import annotations

from ..transport import hosts, remote
from .experiments import Benchmark
from .conclusion import killed_script
from .detached import forget_kept_script
from .lock import release_script
from .scripts import kill_script, killall_script, parse_killed


def _on_each(grp: hosts.CappedGroup, script: str, *, bench: Benchmark) -> dict[str, str]:
    """Run ``script`` on every host of ``grp``, reconnecting a lost session; per-host errors. Its kill waits up
    to the benchmark's ``stop_grace`` between TERM and KILL."""
    return hosts.failures(hosts.call(grp, lambda c: remote.reconnecting(
        lambda: c.run(script, warn=True, timeout=60 + bench.stop_grace))))


def kill_run(grp: hosts.CappedGroup, *, bench: Benchmark, run_id: str) -> dict[str, str]:
    """Kill every process group run ``run_id`` started on the hosts of ``grp``; return per-host errors."""
    return _on_each(grp, kill_script(bench, run_id), bench=bench)


def end_run(grp: hosts.CappedGroup, *, bench: Benchmark, run_id: str, by: str) -> dict[str, str]:
    """Kill run ``run_id`` on the hosts of ``grp``, marked as killed by ``by``, for the session that follows
    it to conclude it so; return per-host errors."""
    return _on_each(grp, "\n".join([killed_script(bench.name, run_id, by=by), kill_script(bench, run_id)]),
                    bench=bench)


def end_kept(grp: hosts.CappedGroup, *, bench: Benchmark, run_id: str) -> dict[str, str]:
    """Kill the processes a concluded run kept (--keep) on the hosts of ``grp``, release its run lock and take
    it off exp.ps (its record stays as its run wrote it); return per-host errors."""
    script = "\n".join([kill_script(bench, run_id), release_script(run_id), forget_kept_script(bench.name, run_id)])
    return _on_each(grp, script, bench=bench)


def killall(grp: hosts.CappedGroup, *, bench: Benchmark) -> dict[str, int | BaseException]:
    """Kill the benchmark's processes on every host of ``grp``: host -> processes signalled (or the error);
    its kept runs are no longer listed."""
    script = f"{killall_script(bench)}\n{forget_kept_script(bench.name)} >&2"
    result = hosts.call(grp, lambda c: c.run(script, warn=False, timeout=60 + bench.stop_grace))
    return {cxn.host: value if isinstance(value, BaseException) else parse_killed(value.stdout)
            for cxn, value in result.items()}
