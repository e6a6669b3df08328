"""The dry-run plan: what a launch would create, checked with EC2's DryRun; creates nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import preflight, prices
from ...config import ClusterConfig
from ..base import Image, Plan
from .aws import CAPACITY_CODES, aws_error, aws_errors, botocore_errors, client_for, error_code
from .images import launch_image, to_image
from .instances import TAG_OWNER, Scope, find, scope_of
from .launch import expiry, run_args
from .permissions import NO_INSTANCE, allowed, lifecycle_checks
from .network import Subnet, allowed_ssh_source, security_group_name
from .zones import launch_subnets

# A security group id that exists nowhere, for checks that need one.
NO_GROUP = "sg-0000000000000000f"


@dataclass(frozen=True)
class LaunchPlan:
    """What ``cluster.launch`` would do, checked with EC2's DryRun; nothing was created."""

    cfg: ClusterConfig
    nworkers: int
    image: Image
    ssh_source: str
    subnets: tuple[Subnet, ...]
    scope: Scope
    existing: int
    ttl_expires: datetime | None
    hourly: float | None
    denied: tuple[str, ...]
    unknown: tuple[str, ...]
    checked: int
    verdict: preflight.Preflight
    invalid: tuple[str, ...] = ()  # the launch's RunInstances calls that EC2 refused as invalid

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
            f"  subnet     {self.subnets[0].id} in {self.subnets[0].zone} ({self.subnets[0].vpc}); every node in "
            f"this zone" + (f"; without capacity there, the whole cluster in "
                            f"{', '.join(s.zone for s in self.subnets[1:])}, in this order" if self.subnets[1:]
                            else " (no other: the config names it)" if cfg.subnet_id or cfg.availability_zone
                            else ""),
            f"  owner      {self.scope.owner} (tagged; only this owner's instances are this cluster's)",
            f"  group      {security_group_name(self.scope)}: tcp 22 from {self.ssh_source}; "
            f"all traffic between members; nothing else",
        ]
        if cfg.placement_group:
            lines.append(f"  placement  {cfg.placement_group} (cluster strategy; created if missing)")
        lines.append(f"  ttl        every node terminates itself at {self.ttl_expires:%Y-%m-%d %H:%M} UTC"
                     if self.ttl_expires else "  ttl        none (ttl 0): nodes run until destroyed")
        cost = prices.dollars(self.hourly)
        lines.append(f"  cost       {cost}/hour on demand in {cfg.region}, {prices.NOTE}"
                     + (", spot costs less" if cfg.spot else "")
                     + ("" if self.hourly is not None else "; a type without a listed price makes `budget` "
                        "unenforceable"))
        lines += [f"  checked    {line}" for line in self.verdict.checked]
        if self.existing:
            lines.append(f"  existing   {self.existing} instances are tagged with this cluster: launch would "
                         f"adopt them and create nothing")
        lines.append("  dry run    EC2 refused: " + ", ".join(self.denied) if self.denied
                     else f"  dry run    EC2 would allow every call ({self.checked} checked)")
        if self.unknown:
            lines.append("  unchecked  " + ", ".join(self.unknown) + " (EC2 needs an existing resource to answer)")
        lines += [f"  unchecked  {line}" for line in self.verdict.unchecked]
        lines += [f"  FAILS      {line}" for line in self.failures]
        return lines

    @property
    def failures(self) -> tuple[str, ...]:
        return self.verdict.failures + self.invalid


def plan(cfg: ClusterConfig, *, nworkers: int) -> Plan:
    """Resolve everything a launch would use and check its permissions with DryRun; create nothing."""
    with aws_errors(cfg):
        client = client_for(cfg.region)
        scope = scope_of(cfg)
        existing = len(find(client, scope))
        subnets = launch_subnets(client, cfg)
        subnet = subnets[0]
        image = launch_image(client, cfg)
        checked = preflight.check(client, cfg, image=image, nworkers=nworkers)
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
        answers, invalid = _ask(cfg, checks)
        denied = tuple(what for what, ok in answers.items() if ok is False)
        unknown = tuple(what for what, ok in answers.items() if ok is None)
    hourly = prices.cluster_hourly(master_type=cfg.master_type, worker_type=cfg.instance_type, nworkers=nworkers,
                                   region=cfg.region)
    found = LaunchPlan(cfg=cfg, nworkers=nworkers, image=to_image(image), ssh_source=ssh_source,
                       subnets=tuple(subnets), scope=scope, existing=existing, ttl_expires=expires,
                       hourly=hourly, denied=denied, unknown=unknown, checked=len(answers), verdict=checked,
                       invalid=invalid)
    return Plan(text=tuple(found.lines()), denied=denied, failures=found.failures)


def _ask(cfg: ClusterConfig, checks: dict[str, tuple[Callable[..., Any], dict[str, Any]]]
         ) -> tuple[dict[str, bool | None], tuple[str, ...]]:
    """Every check's DryRun answer; the launch's own RunInstances arguments that EC2 calls invalid are
    failures (the launch would fail the same way), not unchecked."""
    answers: dict[str, bool | None] = {}
    invalid = []
    for what, (call, kwargs) in checks.items():
        if not what.startswith("RunInstances"):
            answers[what] = allowed(call, **kwargs)
            continue
        try:
            answers[what] = allowed(call, strict=True, **kwargs)
        except botocore_errors() as exc:
            if error_code(exc) in CAPACITY_CODES:  # a zone's state now, which the launch meets by moving on
                answers[what] = True
                continue
            invalid.append(f"{what}: {aws_error(exc, region=cfg.region, cluster=cfg.cluster_name)}")
    return answers, tuple(invalid)

