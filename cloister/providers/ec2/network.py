"""Security and placement groups: SSH only from ``ssh_cidr``, all traffic between members, nothing else."""

from __future__ import annotations

import ipaddress
import logging
import urllib.request
from collections.abc import Callable
from typing import Any

from ...config import ClusterConfig
from ...errors import ProviderError
from ...poll import retry
from .aws import error_code, one_line
from .instances import TAG_CLUSTER, cluster_filter, dev_instance, tag_spec

log = logging.getLogger("cloister.ec2")


CHECKIP_URL = "https://checkip.amazonaws.com"


# A security group stays "in use" for a while after its instances terminate.
IN_USE_TIMEOUT = 300.0


def until_free(call: Callable[[], Any], *, codes: tuple[str, ...], timeout: float = IN_USE_TIMEOUT) -> None:
    """Call until EC2 stops answering one of ``codes`` (a resource still in use)."""
    retry(call, transient=lambda exc: error_code(exc) in codes, timeout=timeout)


def allowed_ssh_source(cfg: ClusterConfig) -> str:
    """Who may SSH in: a security group id, a CIDR, or ("auto") this machine's public address."""
    if cfg.ssh_cidr.startswith("sg-"):
        return cfg.ssh_cidr
    if cfg.ssh_cidr != "auto":
        return str(ipaddress.ip_network(cfg.ssh_cidr, strict=False))
    try:
        with urllib.request.urlopen(CHECKIP_URL, timeout=5) as answer:
            address = ipaddress.ip_address(answer.read().decode().strip())
    except (OSError, ValueError) as exc:
        raise ProviderError(f"ssh_cidr 'auto': could not look up this machine's public address at {CHECKIP_URL} "
                            f"({one_line(exc)}); set ssh_cidr in {cfg.source}, e.g. 203.0.113.7/32",
                            provider="ec2", cluster=cfg.cluster_name) from None
    return f"{address}/{address.max_prefixlen}"


def _ssh_rule(source: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    description = "SSH from ssh_cidr"
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


def security_group_name(cluster: str) -> str:
    return f"cloister-{cluster}"


def ensure_security_group(client, cfg: ClusterConfig, ssh_source: str) -> str:
    """The cluster's group: SSH from ``ssh_source`` only, all traffic between members; reused if present."""
    name = security_group_name(cfg.cluster_name)
    try:
        group_id = client.create_security_group(
            GroupName=name, Description=f"cloister cluster {cfg.cluster_name}: SSH from ssh_cidr, members to members",
            TagSpecifications=[tag_spec("security-group", cfg.cluster_name)])["GroupId"]
    except Exception as exc:
        if error_code(exc) != "InvalidGroup.Duplicate":
            raise
        return _reuse_security_group(client, cfg, ssh_source)
    rules = [_ssh_rule(ssh_source), _members_rule(group_id), _dev_rule(client, cfg)]
    client.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[r for r in rules if r])
    return group_id


def _reuse_security_group(client, cfg: ClusterConfig, ssh_source: str) -> str:
    name = security_group_name(cfg.cluster_name)
    groups = client.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, cluster_filter(cfg.cluster_name)])["SecurityGroups"]
    if not groups:
        raise ProviderError(f"a security group named {name} exists but is not tagged {TAG_CLUSTER}="
                            f"{cfg.cluster_name}; rename the cluster or delete that group",
                            provider="ec2", cluster=cfg.cluster_name)
    group_id = groups[0]["GroupId"]
    # One call per rule: EC2 rejects a whole call if any rule in it already exists.
    for rule in (_ssh_rule(ssh_source), _members_rule(group_id), _dev_rule(client, cfg)):
        if rule is None:
            continue
        try:
            client.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[rule])
        except Exception as exc:
            if error_code(exc) != "InvalidPermission.Duplicate":
                raise
    return group_id


def ensure_placement_group(client, cfg: ClusterConfig) -> None:
    """Create the cluster placement group, tagged so destroy removes it; an existing one is used as is."""
    try:
        client.create_placement_group(GroupName=cfg.placement_group, Strategy="cluster",
                                      TagSpecifications=[tag_spec("placement-group", cfg.cluster_name)])
    except Exception as exc:
        if error_code(exc) != "InvalidPlacementGroup.Duplicate":
            raise

