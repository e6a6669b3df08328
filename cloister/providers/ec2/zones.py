"""Where the cluster goes: one zone that offers both instance types, and the next one when a zone has
no capacity. Every node of a cluster shares its zone (cross-zone traffic is billed and skews network
benchmarks), so a fallback moves the whole cluster, never a part of it.
"""

from __future__ import annotations

from ...config import ClusterConfig
from ...errors import ProviderError
from .network import Subnet, launch_subnet


def offered_zones(client, types: set[str]) -> dict[str, set[str]]:
    """Zone -> the ones of ``types`` EC2 offers there (one paginated DescribeInstanceTypeOfferings)."""
    pages = client.get_paginator("describe_instance_type_offerings").paginate(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": sorted(types)}])
    zones: dict[str, set[str]] = {}
    for page in pages:
        for offer in page["InstanceTypeOfferings"]:
            zones.setdefault(offer["Location"], set()).add(offer["InstanceType"])
    return zones


def launch_subnets(client, cfg: ClusterConfig) -> list[Subnet]:
    """The subnets to try, in order: the one the config names (``subnet_id`` or ``availability_zone``:
    no other), else the region's default subnets in the zones that offer both instance types."""
    types = {cfg.master_type, cfg.instance_type}
    offered = offered_zones(client, types)
    if cfg.subnet_id or cfg.availability_zone:
        subnet = launch_subnet(client, cfg)
        missing = sorted(types - offered.get(subnet.zone, set()))
        if missing:
            key = "subnet_id" if cfg.subnet_id else "availability_zone"
            raise ProviderError(f"{cfg.source}: {key}: {', '.join(missing)} is not offered in {subnet.zone}; "
                                f"{_where_offered(offered, types)}", provider="ec2", cluster=cfg.cluster_name)
        return [subnet]
    found = client.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    if not found:
        raise ProviderError(f"no default subnet in {cfg.region} (the account has no default VPC there); set "
                            f"subnet_id in {cfg.source} to a subnet of your VPC", provider="ec2",
                            cluster=cfg.cluster_name)
    usable = [Subnet(id=s["SubnetId"], vpc=s["VpcId"], zone=s["AvailabilityZone"])
              for s in sorted(found, key=lambda s: s["AvailabilityZone"])
              if types <= offered.get(s["AvailabilityZone"], set())]
    if not usable:
        raise ProviderError(f"no zone of {cfg.region} with a default subnet offers {' and '.join(sorted(types))}; "
                            f"{_where_offered(offered, types)}", provider="ec2", cluster=cfg.cluster_name)
    return usable


def _where_offered(offered: dict[str, set[str]], types: set[str]) -> str:
    nowhere = sorted(types - set().union(*offered.values()))
    if nowhere:
        return (f"EC2 offers {' and '.join(nowhere)} in no zone of this region: check instance_type and "
                f"master_instance_type")
    both = sorted(zone for zone, kinds in offered.items() if types <= kinds)
    if both:
        return f"zones that offer {' and '.join(sorted(types))}: {', '.join(both)}"
    return "no zone offers " + " and ".join(sorted(types)) + " together: choose other instance types"
