"""The EC2 provider: every boto3 call cloister makes lives in this package.

Membership is the tag ``cloister:cluster`` on every resource; one DescribeInstances filtered by that
tag answers each poll for the whole cluster, so the number of requests does not grow with it.
``aws`` translates errors and holds the retries, ``instances`` finds and waits, ``network`` holds the
security and placement groups, ``zones`` picks the zone, ``preflight`` checks what would fail a launch,
``images`` the AMIs, ``launch`` and ``lifecycle`` the cluster's life, ``plan`` the dry run.
"""

from __future__ import annotations

from pathlib import Path

from ...cluster import access
from ... import layout
from ...transport import hosts
from . import prices
from ...errors import HostsFailed, ProviderError
from ...config import ClusterConfig
from ...cluster.servers import ClusterInfo, Node
from ...settings import Settings
from ..base import ClusterRow, Confirm, Image, ImageStore, Launched, NodeStatus, Plan, Progress, Provider
from . import console, images, launch, lifecycle, network, plan, resize, ttl
from .aws import aws_errors, client_for


class Ec2Images(ImageStore):
    """Own AMIs in the config's region."""

    reboots = True

    def __init__(self, provider: "Ec2Provider"):
        self.provider = provider
        self.cfg = provider.cfg
        self.where = f"owned by you in {self.cfg.region}"
        self.left_out = ("removed from the dev instance before imaging: the cluster keys copy-dns authorized, SSH "
                         "control sockets and " + ", ".join(f"~/{p}" for p in layout.NOT_IN_IMAGES))

    def list(self, pattern: str) -> list[Image]:
        return images.list_images(self.cfg)

    def create(self, name: str, *, progress: Progress | None = None, reboot: bool = True) -> Image:
        return images.create_image(self.cfg, name=name, progress=progress, no_reboot=not reboot,
                                   prepare=self.clean_dev)

    def clean_dev(self) -> None:
        """A snapshot cannot leave files out: take them off the dev instance before imaging it."""
        record, host = self.provider.dev_info()
        try:
            with hosts.connection(record, host, connect_timeout=self.provider.settings.connect_timeout) as cxn:
                done = cxn.run(access.image_cleanup_script(), timeout=60)
            problem = None if done.exited == 0 else (done.stderr or done.stdout).strip()[-200:]
        except Exception as exc:  # noqa: BLE001 - any failure to reach the dev instance is one line
            problem = hosts.describe_error(exc)
        if problem:
            raise ProviderError(f"[{host}] could not clean the dev instance before imaging it ({problem}); no image "
                                f"was made", provider=self.provider.name, cluster=self.cfg.cluster_name)

    def delete(self, doomed: list[Image]) -> list[str]:
        return images.delete_images(self.cfg, doomed=doomed)


class Ec2Provider(Provider):
    name = "ec2"
    confirms_destroy = True
    resizable = True

    def __init__(self, cfg: ClusterConfig, settings: Settings):
        super().__init__(cfg, settings)
        self._boot_watch: console.BootWatch | None = None

    def launch(self, *, nworkers: int, confirm: Confirm | None = None,
               progress: Progress | None = None) -> Launched:
        return launch.launch(self.cfg, nworkers=nworkers, settings=self.settings, confirm=confirm, progress=progress)

    def rollback(self, cause: BaseException, *, info: ClusterInfo, confirm: Confirm | None = None,
                 progress: Progress | None = None) -> None:
        launch.abandon(self.cfg, cause, settings=self.settings, ids=[n.id for n in info.nodes], confirm=confirm,
                       progress=progress)

    def verify_nodes(self, info: ClusterInfo) -> None:
        if self.cfg.ttl_seconds:
            ttl.wait_armed(info, info.nodes, settings=self.settings)

    def boot_failures(self, info: ClusterInfo, waiting: list[Node]) -> dict[str, str]:
        if self._boot_watch is None:
            self._boot_watch = console.BootWatch(stall=self.settings.boot_stall,
                                                  key_name=self.cfg.key_name or "")
        with aws_errors(self.cfg):
            client = client_for(self.cfg.region)
            reasons = {node: self._boot_watch.stalled(client, node.id) for node in waiting}
        return {node.host: f"{node.id}: {why}" for node, why in reasons.items() if why}

    def ssh_hint(self, info: ClusterInfo, failed: HostsFailed) -> str:
        if self.cfg.ssh_cidr != "auto" or len(failed.failures) < failed.total:
            return ""
        if not all("timed out" in error for error in failed.failures.values()):
            return ""
        sources = network.ssh_sources(self.cfg, info.extra.get("security_groups", []))
        return (f"SSH timed out on every node while the security group lets in only {', '.join(sources) or '-'} "
                f"(ssh_cidr auto); this machine may reach AWS from another address (a VPN, a proxy, a second "
                f"uplink): set ssh_cidr in {self.cfg.source} to the address the nodes see")

    def destroy(self, *, confirm: Confirm | None = None, progress: Progress | None = None) -> list[str]:
        return lifecycle.destroy(self.cfg, settings=self.settings, confirm=confirm, progress=progress)

    def status(self) -> list[NodeStatus]:
        return lifecycle.status(self.cfg)

    def gone(self, info: ClusterInfo) -> dict[str, str]:
        return lifecycle.gone(self.cfg, info)

    def list_clusters(self) -> list[ClusterRow]:
        return lifecycle.list_clusters(self.cfg)

    def scope(self) -> str:
        return f"in {self.cfg.region}"

    def status_caption(self, rows: list[NodeStatus]) -> str | None:
        known = [r.cost_usd for r in rows if r.cost_usd is not None]
        unknown = len(rows) - len(known)
        hourly = sum(r.hourly_usd or 0.0 for r in rows)
        return (f"cost so far {prices.dollars(sum(known))}"
                + (f" plus {unknown} nodes of unknown price" if unknown else "")
                + f"; {prices.dollars(hourly)}/hour now; {prices.NOTE}")

    def launch_warnings(self) -> list[str]:
        if self.cfg.ttl_seconds == 0:
            return [f"ttl 0: the instances of '{self.cfg.cluster_name}' never terminate themselves; "
                    f"remember inv cluster.destroy"]
        return []

    def interrupted_note(self) -> str:
        return "; inv cluster.status shows what is left"

    def stop(self, *, progress: Progress | None = None) -> list[str]:
        return lifecycle.stop(self.cfg, settings=self.settings, progress=progress)

    def start(self, *, progress: Progress | None = None) -> ClusterInfo:
        return lifecycle.start(self.cfg, settings=self.settings, progress=progress)

    def extend(self, *, seconds: int) -> list[str]:
        return lifecycle.extend(self.cfg, settings=self.settings, seconds=seconds)

    def reap(self) -> list[str]:
        return lifecycle.reap(self.cfg)

    def plan(self, *, nworkers: int) -> Plan:
        return plan.plan(self.cfg, nworkers=nworkers)

    def images(self) -> ImageStore:
        return Ec2Images(self)

    def add_workers(self, info: ClusterInfo, *, numbers: list[int], spot_fallback: bool = False,
                    progress: Progress | None = None) -> list[Node]:
        return resize.add_workers(self.cfg, numbers=numbers, spot_fallback=spot_fallback, progress=progress)

    def remove_workers(self, info: ClusterInfo, *, nodes: list[Node], progress: Progress | None = None) -> list[str]:
        return resize.remove_workers(self.cfg, nodes=nodes, progress=progress)

    def node_hourly(self, info: ClusterInfo, *, role: str) -> float | None:
        return resize.worker_hourly(self.cfg) if role == "worker" else None

    def dev_info(self) -> tuple[ClusterInfo, str]:
        cfg = self.cfg
        if not cfg.ami_instance_ip or not cfg.ssh_key:
            raise ProviderError(f"{cfg.source}: keys 'ami_instance_ip' and 'ssh_key' name the dev instance and its "
                                f"key; set both", provider=self.name, cluster=cfg.cluster_name)
        # The dev instance outlives clusters, so its host key is kept apart from theirs.
        known = Path(self.settings.state_dir).resolve() / self.name / "dev_known_hosts"
        known.parent.mkdir(parents=True, exist_ok=True)
        info = ClusterInfo(provider=self.name, cluster_name=cfg.cluster_name, user=cfg.user, ssh_key=cfg.ssh_key,
                           nodes=[], known_hosts=str(known))
        return info, cfg.ami_instance_ip
