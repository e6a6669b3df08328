"""Security and placement groups: SSH only from ``ssh_cidr``, all traffic between members, nothing else."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ...config import ClusterConfig
from ...errors import ProviderError
from ...poll import retry
from .aws import aws_errors, client_for, error_code, on_new, one_line
from .instances import Scope, dev_instance
log = logging.getLogger("cloister.ec2")


CHECKIP_URL = "https://checkip.amazonaws.com"
SSH_DESCRIPTION = "SSH from ssh_cidr"
TAG_LAUNCHING = "cloister:launching"
# A launch that has held its lock this long has died (a launch takes minutes, not a quarter of an hour).
LAUNCH_LOCK_STALE = 900.0

# A security group stays "in use" for a while after its instances terminate.
IN_USE_TIMEOUT = 300.0


def until_free(call: Callable[[], Any], *, codes: tuple[str, ...], timeout: float = IN_USE_TIMEOUT) -> None:
    """Call until EC2 stops answering one of ``codes`` (a resource still in use)."""
    retry(call, transient=lambda exc: error_code(exc) in codes, timeout=timeout)


def allowed_ssh_source(cfg: ClusterConfig) -> str:
    """Who may SSH in: a security group id, a CIDR, or ("auto") this machine's public IPv4 address.

    The lookup goes out directly, as the SSH connections will: through an HTTPS proxy it would
    return the proxy's address, and the nodes would refuse this machine.
    """
    if cfg.ssh_cidr.startswith("sg-"):
        return cfg.ssh_cidr
    if cfg.ssh_cidr != "auto":
        return str(ipaddress.ip_network(cfg.ssh_cidr, strict=False))
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(CHECKIP_URL, timeout=5) as answer:
            text = answer.read().decode().strip()
        address = ipaddress.ip_address(text)
    except (OSError, ValueError) as exc:
        raise ProviderError(f"ssh_cidr 'auto': could not look up this machine's public address at {CHECKIP_URL} "
                            f"({one_line(exc)}); set ssh_cidr in {cfg.source}, e.g. 203.0.113.7/32",
                            provider="ec2", cluster=cfg.cluster_name) from None
    if address.version != 4:
        raise ProviderError(f"ssh_cidr 'auto': {CHECKIP_URL} answered {address}, not an IPv4 address; set ssh_cidr "
                            f"in {cfg.source} to your public IPv4 address, e.g. 203.0.113.7/32",
                            provider="ec2", cluster=cfg.cluster_name)
    return f"{address}/32"


def _ssh_rule(source: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    description = SSH_DESCRIPTION
    if source.startswith("sg-"):
        rule["UserIdGroupPairs"] = [{"GroupId": source, "Description": description}]
    elif ipaddress.ip_network(source).version == 6:
        rule["Ipv6Ranges"] = [{"CidrIpv6": source, "Description": description}]
    else:
        rule["IpRanges"] = [{"CidrIp": source, "Description": description}]
    return rule


def _members_rule(group_id: str) -> dict[str, Any]:
    return {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "cluster members"}]}


def _dev_rule(client, cfg: ClusterConfig) -> dict[str, Any] | None:
    """SSH from the dev instance's security groups: redeploy runs rsync on it, towards private addresses."""
    if not cfg.ami_instance_ip:
        return None
    try:
        dev = dev_instance(client, cfg)
    except ProviderError:
        log.warning("dev instance %s not found in %s; redeploy from it will need SSH access to the nodes",
                    cfg.ami_instance_ip, cfg.region)
        return None
    groups = [g["GroupId"] for g in dev.get("SecurityGroups", [])]
    if not groups:
        return None
    return {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
            "UserIdGroupPairs": [{"GroupId": g, "Description": "SSH from the dev instance"} for g in groups]}


def security_group_name(scope: Scope) -> str:
    """Group names are unique per VPC: a short hash of the owner lets two people of one account each
    have a cluster of the same name (the group is found by its tags, never by this name)."""
    return f"cloister-{scope.cluster}-{hashlib.sha256(scope.owner.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Subnet:
    id: str
    vpc: str
    zone: str


def launch_subnet(client, cfg: ClusterConfig) -> Subnet:
    """The one subnet every node goes into, so the whole cluster shares a zone (cross-zone traffic is billed
    and skews network benchmarks): ``subnet_id``, else the default subnet of ``availability_zone`` or
    of the first zone by name."""
    if cfg.subnet_id:
        found = client.describe_subnets(SubnetIds=[cfg.subnet_id])["Subnets"]
    else:
        filters = [{"Name": "default-for-az", "Values": ["true"]}]
        if cfg.availability_zone:
            filters.append({"Name": "availability-zone", "Values": [cfg.availability_zone]})
        found = sorted(client.describe_subnets(Filters=filters)["Subnets"], key=lambda s: s["AvailabilityZone"])
    if not found:
        where = f"in {cfg.availability_zone}" if cfg.availability_zone else f"in {cfg.region}"
        raise ProviderError(f"no default subnet {where} (the account has no default VPC there); set subnet_id in "
                            f"{cfg.source} to a subnet of your VPC", provider="ec2", cluster=cfg.cluster_name)
    chosen = found[0]
    if cfg.availability_zone and chosen["AvailabilityZone"] != cfg.availability_zone:
        raise ProviderError(f"{cfg.source}: subnet_id {chosen['SubnetId']} is in {chosen['AvailabilityZone']}, "
                            f"not in availability_zone {cfg.availability_zone}; drop one of the two",
                            provider="ec2", cluster=cfg.cluster_name)
    return Subnet(id=chosen["SubnetId"], vpc=chosen["VpcId"], zone=chosen["AvailabilityZone"])


def ensure_security_group(client, cfg: ClusterConfig, scope: Scope, *, ssh_source: str,
                          vpc: str) -> tuple[str, bool]:
    """The cluster's group, (id, created): SSH from ``ssh_source`` only, all traffic between members.

    The group is also the launch lock: it carries ``cloister:launching`` until the instances run, and a
    second launch that finds a fresh lock refuses instead of making a second master.
    """
    name = security_group_name(scope)
    try:
        group_id = client.create_security_group(
            GroupName=name, VpcId=vpc,
            Description=f"cloister cluster {cfg.cluster_name}: SSH from ssh_cidr, members to members",
            TagSpecifications=[scope.tag_spec("security-group", (TAG_LAUNCHING, _now()))])["GroupId"]
    except Exception as exc:
        if error_code(exc) != "InvalidGroup.Duplicate":
            raise
        return _reuse_security_group(client, cfg, scope, ssh_source=ssh_source, vpc=vpc), False
    rules = [_ssh_rule(ssh_source), _members_rule(group_id), _dev_rule(client, cfg)]
    on_new(lambda: client.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[r for r in rules if r]))
    return group_id, True


def _now() -> str:
    return f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"


def _reuse_security_group(client, cfg: ClusterConfig, scope: Scope, *, ssh_source: str, vpc: str) -> str:
    name = security_group_name(scope)
    groups = client.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}, *scope.filters()])
    groups = groups["SecurityGroups"]
    if not groups:
        raise ProviderError(f"a security group named {name} exists in {vpc} but is not tagged as this cluster of "
                            f"{scope.owner}; delete that group if it is yours, or rename the cluster",
                            provider="ec2", cluster=cfg.cluster_name)
    group = groups[0]
    _check_launch_lock(cfg, group)
    client.create_tags(Resources=[group["GroupId"]], Tags=[{"Key": TAG_LAUNCHING, "Value": _now()}])
    _replace_ssh_source(client, group, ssh_source)
    # One call per rule: EC2 rejects a whole call if any rule in it already exists.
    for rule in (_ssh_rule(ssh_source), _members_rule(group["GroupId"]), _dev_rule(client, cfg)):
        if rule is None:
            continue
        try:
            client.authorize_security_group_ingress(GroupId=group["GroupId"], IpPermissions=[rule])
        except Exception as exc:
            if error_code(exc) != "InvalidPermission.Duplicate":
                raise
    return group["GroupId"]


def _check_launch_lock(cfg: ClusterConfig, group: dict[str, Any]) -> None:
    started = {t["Key"]: t["Value"] for t in group.get("Tags", [])}.get(TAG_LAUNCHING)
    if not started:
        return
    age = (datetime.now(timezone.utc) - datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds()
    if age < LAUNCH_LOCK_STALE:
        raise ProviderError(f"another launch of ec2 cluster '{cfg.cluster_name}' started at {started} and has not "
                            f"finished ({group['GroupId']} is tagged {TAG_LAUNCHING}); wait for it, or if it died, "
                            f"run inv cluster.destroy --yes", provider="ec2", cluster=cfg.cluster_name)


def _replace_ssh_source(client, group: dict[str, Any], ssh_source: str) -> None:
    """Revoke SSH sources of earlier launches (a laptop's old address) that are not this launch's."""
    wanted = _ssh_rule(ssh_source)
    stale: list[dict[str, Any]] = []
    for perm in group.get("IpPermissions", []):
        if (perm.get("IpProtocol"), perm.get("FromPort")) != ("tcp", 22):
            continue
        for key, field in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"), ("UserIdGroupPairs", "GroupId")):
            for entry in perm.get(key, []):
                if entry.get("Description") == SSH_DESCRIPTION and entry[field] not in _sources(wanted):
                    stale.append({"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                  key: [{field: entry[field]}]})
    if stale:
        client.revoke_security_group_ingress(GroupId=group["GroupId"], IpPermissions=stale)


def _sources(rule: dict[str, Any]) -> set[str]:
    return ({r["CidrIp"] for r in rule.get("IpRanges", [])} | {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}
            | {g["GroupId"] for g in rule.get("UserIdGroupPairs", [])})


def release_launch_lock(client, group_id: str) -> None:
    on_new(lambda: client.delete_tags(Resources=[group_id], Tags=[{"Key": TAG_LAUNCHING}]))


def ensure_placement_group(client, cfg: ClusterConfig, scope: Scope) -> None:
    """Create the cluster placement group, tagged so destroy removes it; an existing one is used as is."""
    try:
        client.create_placement_group(GroupName=cfg.placement_group, Strategy="cluster",
                                      TagSpecifications=[scope.tag_spec("placement-group")])
    except Exception as exc:
        if error_code(exc) != "InvalidPlacementGroup.Duplicate":
            raise



def ssh_sources(cfg: ClusterConfig, group_ids: list[str]) -> list[str]:
    """The sources the cluster's groups let SSH in from (their ``ssh_cidr`` rules)."""
    if not group_ids:
        return []
    with aws_errors(cfg):
        groups = client_for(cfg.region).describe_security_groups(GroupIds=group_ids)["SecurityGroups"]
    return sorted({entry[field] for group in groups for perm in group.get("IpPermissions", [])
                   if (perm.get("IpProtocol"), perm.get("FromPort")) == ("tcp", 22)
                   for key, field in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6"))
                   for entry in perm.get(key, []) if entry.get("Description") == SSH_DESCRIPTION})
