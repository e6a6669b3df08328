"""The local provider: a cluster of real sshd "hosts" on this machine, each in its own namespaces.

``machines`` starts and ends the hosts (``hostfiles``: what each host runs), ``subnets`` hands out their
addresses, ``links`` makes their bridge, links and shaping, ``procs`` reads /proc, ``images`` keeps
directory images for ``ami.*``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ...errors import ProviderError
from ...cluster.servers import ClusterInfo, Node
from ..base import (ClusterRow, Confirm, ImageStore, Launched, NodeStatus, Progress, Provider,
                    no_images_error, pattern)
from . import resize
from .images import LocalImages
from .machines import STATE_FILE, LocalCluster
from .subnets import claimed_local_clusters


class LocalProvider(Provider):
    name = "local"
    resizable = True

    @property
    def machines(self) -> LocalCluster:
        return LocalCluster(state_root=self.settings.state_dir, cluster=self.cfg.cluster_name, user=self.cfg.user,
                            spec=self.cfg.network_spec)

    def launch(self, *, nworkers: int, confirm: Confirm | None = None,
               progress: Progress | None = None) -> Launched:
        machines = self.machines
        created = not machines.exists()
        image = self.cfg.image
        if created and self.cfg.ami == "latest":
            image = self._latest_image()
        return Launched(info=machines.launch(nworkers=nworkers, dev=self.cfg.dev_host, image=image), created=created)

    def _latest_image(self) -> str:
        store = self.images()
        found = [i for i in store.list(pattern(self.cfg)) if i.state == "available"]
        if not found:
            raise no_images_error(self.cfg, where=store.where)
        return found[0].id

    def rollback(self, cause: BaseException, *, info: ClusterInfo, confirm: Confirm | None = None,
                 progress: Progress | None = None) -> str | None:
        return self.machines.end_launch()

    def destroy(self, *, confirm: Confirm | None = None, progress: Progress | None = None) -> list[str]:
        machines = self.machines
        name = self.cfg.cluster_name
        if not machines.exists():
            return [f"no local cluster '{name}' is running; nothing to destroy"]
        running = machines.destroy()
        left = machines.running_hosts()
        if left:
            raise ProviderError(f"local cluster '{name}': {len(left)} hosts still running after the destroy: "
                                f"{', '.join(left[:8])}; run inv cluster.destroy --yes again",
                                provider=self.name, cluster=name)
        return [f"destroyed local cluster '{name}' ({running} hosts were running)"]

    def status(self) -> list[NodeStatus]:
        machines = self.machines
        return machines.status() if machines.exists() else []

    def list_clusters(self) -> list[ClusterRow]:
        """Every local cluster on this machine: this state_dir's, and any other whose addresses are claimed."""
        own_root = Path(self.settings.state_dir).resolve()
        found = {state.parent.resolve() for state in (own_root / "local").glob(f"*/{STATE_FILE}")}
        found |= {folder for folder in claimed_local_clusters() if (folder / STATE_FILE).exists()}
        rows = []
        for folder in sorted(found):
            machines = LocalCluster(state_root=folder.parent.parent, cluster=folder.name)
            nodes = machines.status()
            states = Counter(node.state for node in nodes)
            rows.append(ClusterRow(
                cluster=machines.cluster if folder.parent.parent == own_root else f"{machines.cluster} ({folder})",
                masters=sum(n.role == "master" for n in nodes), workers=sum(n.role == "worker" for n in nodes),
                states=", ".join(f"{n} {s}" for s, n in sorted(states.items())),
                age_s=max((n.uptime_s or 0 for n in nodes), default=None)))
        return rows

    def ensure_running(self, info: ClusterInfo) -> None:
        self._running()

    def _running(self) -> LocalCluster:
        machines = self.machines
        if not machines.exists():
            raise ProviderError(f"local cluster '{self.cfg.cluster_name}' is not running; run inv cluster.launch",
                                provider=self.name, cluster=self.cfg.cluster_name)
        return machines

    def gone(self, info: ClusterInfo) -> dict[str, str]:
        machines = self._running()
        dead = resize.gone(machines)
        known = {h["name"] for h in machines.state()["hosts"]}
        return {node.id: f"dead: {dead[node.id]}" if node.id in dead else
                "not found: the local cluster has no such host any more"
                for node in info.nodes if node.id in dead or node.id not in known}

    def add_workers(self, info: ClusterInfo, *, numbers: list[int], spot_fallback: bool = False,
                    progress: Progress | None = None) -> list[Node]:
        names = [f"{self.cfg.cluster_name}-worker-{n}" for n in numbers]
        started = resize.add_workers(self._running(), numbers=numbers, image=self.cfg.image)
        by_id = {node.id: node for node in started.nodes}
        return [by_id[name] for name in names]

    def remove_workers(self, info: ClusterInfo, *, nodes: list[Node], progress: Progress | None = None) -> list[str]:
        running = resize.remove_workers(self._running(), names=[n.id for n in nodes])
        return [f"ended {len(nodes)} local hosts ({running} were running)"]

    def node_hourly(self, info: ClusterInfo, *, role: str) -> float | None:
        return 0.0  # hosts on this machine

    def launch_warnings(self) -> list[str]:
        if self.cfg.swap_size:
            return [f"swap_size {self.cfg.swap_size}: skipped; local hosts share this machine's memory and swap"]
        return []

    def interrupted_note(self) -> str:
        return "; inv cluster.status shows what is left"

    def images(self) -> ImageStore:
        return LocalImages(self.cfg, state_dir=self.settings.state_dir)

    def dev_info(self) -> tuple[ClusterInfo, str]:
        info = self._running().info()
        if info.dev is None:
            raise ProviderError(f"local cluster '{self.cfg.cluster_name}' has no dev host; set dev_host: true and "
                                f"launch again", provider=self.name, cluster=self.cfg.cluster_name)
        return info, info.dev.host
