"""The cluster as a sweep uses it: one open connection per host for all runs, and, when a run fails
because a node is gone, which of the run's nodes went and why, and a repair after which the
connections are opened again (a replaced worker has a new address and host key)."""

from __future__ import annotations

import time
from collections.abc import Callable

from fabric import Connection

from ..cluster import lifecycle, resize
from ..cluster.servers import ClusterInfo
from ..config import ClusterConfig
from ..settings import Settings
from ..transport import hosts
from .experiments import Benchmark
from .orchestration import Run
from .record import RunRecord
from .spec import RunSpec
from .sweep import Combo


class SweepCluster:
    """``info`` and its connections; ``repair`` replaces gone workers and reconnects. ``say`` gets a line
    for people at each repair."""

    def __init__(self, cfg: ClusterConfig, *, settings: Settings, info: ClusterInfo, spot_fallback: bool = False,
                 say: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.settings = settings
        self.info = info
        self.spot_fallback = spot_fallback
        self.say = say or (lambda line: None)
        self.repairs: list[float] = []  # seconds each repair took
        self._pool = self._open()

    def _open(self) -> hosts.CappedGroup:
        return hosts.group(self.info, self.info.cluster_nodes, concurrency=self.settings.concurrency,
                           connect_timeout=self.settings.connect_timeout)

    def connections(self) -> dict[str, Connection]:
        return {c.host: c for c in self._pool}

    def close(self) -> None:
        self._pool.close()

    def run(self, combo: Combo, run_id: str, *, bench: Benchmark, timeout: float | None,
            manager: bool = True) -> RunRecord:
        """One run of the sweep over its connections; a failed run's run.json names the nodes that are gone."""
        spec = RunSpec(info=self.info, bench=bench, k=combo.k, nprocs=combo.p, args=list(combo.args), run_id=run_id,
                       settings=self.settings, timeout=timeout, config_name=self.cfg.source, manager=manager)
        return Run(spec, connections=self.connections(),
                   gone=lambda: lifecycle.gone_hosts(self.cfg, settings=self.settings, info=self.info)).execute()

    def lost(self, record: RunRecord) -> list[str]:
        """The nodes of ``record``'s run that the provider no longer runs, one line each with why."""
        used = {record.hosts.master, *record.hosts.workers}
        return [resize.describe_gone(g) for g in resize.gone_nodes(self.cfg, settings=self.settings)
                if g.node.host in used]

    def repair(self) -> None:
        start = time.monotonic()
        self.say(f"repairing cluster '{self.cfg.cluster_name}'")
        change = resize.repair(self.cfg, settings=self.settings, spot_fallback=self.spot_fallback)
        for line in change.lines:
            self.say(line)
        self.close()
        self.info = change.info
        self._pool = self._open()
        self.repairs.append(time.monotonic() - start)
        self.say(f"repaired in {self.repairs[-1]:.1f}s; the sweep goes on")
