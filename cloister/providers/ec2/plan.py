"""The dry-run plan: what a launch would create, checked with EC2's DryRun; creates nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import prices
from ...config import ClusterConfig
from ..base import Image, Plan
from .aws import aws_errors, client_for
from .images import launch_image, to_image
from .instances import TAG_OWNER, Scope, find, scope_of
from .launch import expiry, run_args
from .permissions import NO_INSTANCE, allowed, lifecycle_checks
from .network import Subnet, allowed_ssh_source, launch_subnet, security_group_name

# A security group id that exists nowhere, for checks that need one.
NO_GROUP = "sg-0000000000000000f"


@dataclass(frozen=True)
class LaunchPlan:
    """What ``cluster.launch`` would do, checked with EC2's DryRun; nothing was created."""

    cfg: ClusterConfig
    nworkers: int
    image: Image
    ssh_source: str
    subnet: Subnet
    scope: Scope
    existing: int
    ttl_expires: datetime | None
    hourly: float | None
    denied: tuple[str, ...]
    unknown: tuple[str, ...]
    checked: int

    def lines(self) -> list[str]:
        cfg = self.cfg
        spot = ""
        if cfg.spot:
            spot = " spot" + (f" (max ${cfg.spot}/h)" if not isinstance(cfg.spot, bool) else "")
        lines = [
            f"plan for ec2 cluster '{cfg.cluster_name}' in {cfg.region} (dry run: nothing was created)",
            f"  image      {self.image.id} ({self.image.name}, {self.image.created:%Y-%m-%d %H:%M} UTC)",
            f"  master     1 x {cfg.master_type} on-demand",
            f"  workers    {self.nworkers} x {cfg.instance_type}{spot or ' on-demand'}",
            f"  root       {cfg.root_size} GiB gp3 per node" if cfg.root_size else "  root       the AMI's default",
            f"  key        {cfg.key_name}",
            f"  subnet     {self.subnet.id} in {self.subnet.zone} ({self.subnet.vpc}); every node in this zone",
            f"  owner      {self.scope.owner} (tagged; only this owner's instances are this cluster's)",
            f"  group      {security_group_name(self.scope)}: tcp 22 from {self.ssh_source}; "
            f"all traffic between members; nothing else",
        ]
        if cfg.placement_group:
            lines.append(f"  placement  {cfg.placement_group} (cluster strategy; created if missing)")
        lines.append(f"  ttl        every node terminates itself at {self.ttl_expires:%Y-%m-%d %H:%M} UTC"
                     if self.ttl_expires else "  ttl        none (ttl 0): nodes run until destroyed")
        cost = prices.dollars(self.hourly)
        lines.append(f"  cost       {cost}/hour, {prices.NOTE}" + (", spot costs less" if cfg.spot else ""))
        if self.existing:
            lines.append(f"  existing   {self.existing} instances are tagged with this cluster: launch would "
                         f"adopt them and create nothing")
        lines.append("  dry run    EC2 refused: " + ", ".join(self.denied) if self.denied
                     else f"  dry run    EC2 would allow every call ({self.checked} checked)")
        if self.unknown:
            lines.append("  unchecked  " + ", ".join(self.unknown) + " (EC2 needs an existing resource to answer)")
        return lines


def plan(cfg: ClusterConfig, *, nworkers: int) -> Plan:
    """Resolve everything a launch would use and check its permissions with DryRun; create nothing."""
    with aws_errors(cfg):
        client = client_for(cfg.region)
        scope = scope_of(cfg)
        existing = len(find(client, scope))
        subnet = launch_subnet(client, cfg)
        image = launch_image(client, cfg)
        ssh_source = allowed_ssh_source(cfg)
        expires = expiry(cfg)
        checks: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
            "CreateSecurityGroup": (client.create_security_group,
                                    {"GroupName": security_group_name(scope), "Description": "dry run",
                                     "VpcId": subnet.vpc, "TagSpecifications": [scope.tag_spec("security-group")]}),
            "RunInstances (master)": (client.run_instances, run_args(
                cfg, scope, image=image, role="master", count=1, token="dry-run", expires=expires, subnet=subnet)),
        }
        if nworkers:
            checks["RunInstances (workers)"] = (client.run_instances, run_args(
                cfg, scope, image=image, role="worker", count=nworkers, token="dry-run", expires=expires,
                subnet=subnet))
        if cfg.placement_group:
            checks["CreatePlacementGroup"] = (client.create_placement_group,
                                              {"GroupName": cfg.placement_group, "Strategy": "cluster",
                                               "TagSpecifications": [scope.tag_spec("placement-group")]})
        if cfg.placement_group:
            checks["DeletePlacementGroup"] = (client.delete_placement_group, {"GroupName": cfg.placement_group})
            checks["DescribePlacementGroups"] = (client.describe_placement_groups, {})
        checks["AuthorizeSecurityGroupIngress"] = (client.authorize_security_group_ingress, {
            "GroupId": NO_GROUP, "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                                    "IpRanges": [{"CidrIp": "192.0.2.1/32"}]}]})
        ours = find(client, scope)
        checks.update(lifecycle_checks(client, instance=ours[0]["InstanceId"] if ours else NO_INSTANCE,
                                       group=NO_GROUP, owner={"Key": TAG_OWNER, "Value": scope.owner}))
        answers = {what: allowed(call, **kwargs) for what, (call, kwargs) in checks.items()}
        denied = tuple(what for what, ok in answers.items() if ok is False)
        unknown = tuple(what for what, ok in answers.items() if ok is None)
    hourly = prices.cluster_hourly(master_type=cfg.master_type, worker_type=cfg.instance_type, nworkers=nworkers)
    found = LaunchPlan(cfg=cfg, nworkers=nworkers, image=to_image(image), ssh_source=ssh_source, subnet=subnet,
                       scope=scope, existing=existing,
                       ttl_expires=expires, hourly=hourly, denied=denied, unknown=unknown, checked=len(answers))
    return Plan(text=tuple(found.lines()), denied=denied)

