"""The static provider: machines that exist already (``hosts`` in the config, the master first).

Nothing is started or stopped; launch records the machines in servers/, destroy forgets them.
"""

from __future__ import annotations

from pathlib import Path

from ..transport import hosts
from ..cluster import keys
from ..cluster.servers import ClusterInfo, Node
from ..errors import ProviderError
from .base import ClusterRow, Confirm, ImageStore, Launched, NodeStatus, Progress, Provider

PROBE_TIMEOUT = 5.0


class StaticProvider(Provider):
    name = "static"
    # Existing machines answer now or not at all.
    ssh_wait_cap = 20.0

    def info(self) -> ClusterInfo:
        cfg = self.cfg
        names = cfg.hosts or []
        nodes = [Node(role="master" if i == 0 else "worker", id=h, host=h, private=h, public=h, name=h)
                 for i, h in enumerate(names)]
        if cfg.ami_instance_ip:
            nodes.append(Node(role="dev", id=cfg.ami_instance_ip, host=cfg.ami_instance_ip,
                              public=cfg.ami_instance_ip, name="dev"))
        known = Path(self.settings.state_dir).resolve() / "static" / cfg.cluster_name / "known_hosts"
        return ClusterInfo(provider=self.name, cluster_name=cfg.cluster_name, user=cfg.user,
                           ssh_key=cfg.ssh_key or "", nodes=nodes, known_hosts=str(known))

    def launch(self, *, nworkers: int, confirm: Confirm | None = None,
               progress: Progress | None = None) -> Launched:
        return Launched(info=self.info(), created=False)

    def rollback(self, cause: BaseException, *, info: ClusterInfo, confirm: Confirm | None = None,
                 progress: Progress | None = None) -> str | None:
        """Nothing was created, so nothing is ended."""
        return None

    def destroy(self, *, confirm: Confirm | None = None, progress: Progress | None = None) -> list[str]:
        """The machines stay; the cluster key that copy-dns authorized on them goes."""
        info = self.info()
        timeout = min(self.settings.connect_timeout, PROBE_TIMEOUT)
        with hosts.group(info, info.nodes, concurrency=self.settings.concurrency, connect_timeout=timeout) as grp:
            failed = hosts.failures(hosts.call(grp, lambda cxn: cxn.run(keys.revoke_script(info), timeout=30)))
        lines = [f"static cluster '{self.cfg.cluster_name}': machines are not ours to stop; revoked the cluster "
                 f"key on {len(info.nodes) - len(failed)}/{len(info.nodes)} of them; forgot servers/"]
        return lines + [f"[{host}] cluster key not revoked: {error}" for host, error in failed.items()]

    def status(self) -> list[NodeStatus]:
        """Each machine's uptime, read over SSH; an unreachable one says why."""
        info = self.info()
        timeout = min(self.settings.connect_timeout, PROBE_TIMEOUT)
        with hosts.group(info, info.nodes, concurrency=self.settings.concurrency, connect_timeout=timeout) as grp:
            result = hosts.call(grp, lambda cxn: cxn.run("cat /proc/uptime", timeout=10))
        failed = hosts.failures(result)
        by_host = {cxn.host: value for cxn, value in result.items()}
        rows = []
        for node in info.nodes:
            up = None if node.host in failed else float(by_host[node.host].stdout.split()[0])
            rows.append(NodeStatus(role=node.role, id=node.id, host=node.host, name=node.name,
                                   state="reachable" if up is not None else failed[node.host], uptime_s=up))
        return rows

    def launch_warnings(self) -> list[str]:
        if self.cfg.swap_size:
            return [f"swap_size {self.cfg.swap_size}: skipped; cloister does not change existing machines' swap"]
        return []

    def images(self) -> ImageStore:
        raise ProviderError(f"{self.cfg.source}: ami.* needs the ec2 or local provider; static machines have no "
                            f"images", provider=self.name, cluster=self.cfg.cluster_name)

    def list_clusters(self) -> list[ClusterRow]:
        return [ClusterRow(cluster=self.cfg.cluster_name, masters=1, workers=len(self.cfg.hosts or []) - 1,
                           states="static")]
