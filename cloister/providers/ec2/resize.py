"""Workers added to and removed from a running cluster.

New workers are launched as the cluster's were: the master's image, subnet, security groups, key and
placement group, the cluster's tags and its expiry (the TTL tag, which ``cluster.extend`` moves), so
they end with the others. Their numbers travel in one tag per RunInstances call (``TAG_WORKERS``), so
adding N workers costs the same few requests as adding one.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from ...config import ClusterConfig
from ...errors import ProviderError
from ...cluster.servers import Node
from ..base import Progress
from . import prices
from .aws import aws_errors, client_for, error_code
from .instances import (TAG_TTL, TAG_WORKERS, describe, encode_numbers, find, live_filter, node_of,
                        ranges, role_of, scope_of, state_of, tags_of, wait_for)
from .launch import run_args
from .network import Subnet

# What EC2 answers when it has no spot capacity (or not at the price asked) for a RunInstances call.
SPOT_REFUSED = ("InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
                "InsufficientCapacity", "UnfulfillableCapacity")


def _cluster_parts(cfg: ClusterConfig, found: list[dict[str, Any]]) -> dict[str, Any]:
    """What a new worker shares with the running cluster, read from its master (and a worker, for the type)."""
    masters = [i for i in found if role_of(i) == "master"]
    if not masters:
        raise ProviderError(f"ec2 cluster '{cfg.cluster_name}' has no running master in {cfg.region}; it cannot "
                            f"grow or be repaired (inv cluster.destroy --yes, then launch again)",
                            provider="ec2", cluster=cfg.cluster_name)
    asleep = [i["InstanceId"] for i in found if state_of(i) in ("stopping", "stopped")]
    if asleep:
        raise ProviderError(f"{len(asleep)} instances of '{cfg.cluster_name}' are stopped ({', '.join(asleep[:4])}); "
                            f"inv cluster.start first", provider="ec2", cluster=cfg.cluster_name)
    master = masters[0]
    workers = [i for i in found if role_of(i) != "master"]
    expires = tags_of(master).get(TAG_TTL)
    return {
        "image_id": master["ImageId"], "key": master.get("KeyName"),
        "type": workers[0]["InstanceType"] if workers else cfg.instance_type,
        "groups": sorted({g["GroupId"] for g in master.get("SecurityGroups", [])}),
        "subnet": Subnet(id=master["SubnetId"], vpc=master.get("VpcId", ""),
                         zone=master.get("Placement", {}).get("AvailabilityZone", "")),
        "placement": master.get("Placement", {}).get("GroupName") or cfg.placement_group or None,
        "expires": datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None,
    }


def _image(client, cfg: ClusterConfig, image_id: str) -> dict[str, Any]:
    found = client.describe_images(ImageIds=[image_id])["Images"]
    if not found:
        raise ProviderError(f"the cluster's image {image_id} is gone (deregistered?); new workers must start from "
                            f"the image the others run", provider="ec2", cluster=cfg.cluster_name)
    return found[0]


def _worker_args(cfg: ClusterConfig, parts: dict[str, Any], image: dict[str, Any], numbers: list[int],
                 token: str) -> dict[str, Any]:
    scope = scope_of(cfg)
    # The config's type and placement group are replaced by the running cluster's own.
    args = run_args(cfg.replace(instance_type=parts["type"], placement_group=parts["placement"] or ""), scope,
                    image=image, role="worker", count=len(numbers), token=token, expires=parts["expires"],
                    subnet=parts["subnet"])
    args["TagSpecifications"][0]["Tags"].append({"Key": TAG_WORKERS, "Value": ranges(numbers)})
    if parts["key"]:
        args["KeyName"] = parts["key"]
    args["SecurityGroupIds"] = parts["groups"]
    return args


def add_workers(cfg: ClusterConfig, *, numbers: list[int], spot_fallback: bool,
                progress: Progress | None) -> list[Node]:
    """Launch workers ``numbers`` beside the running cluster; return them running, in that order.

    On any failure after RunInstances, the instances this call launched are terminated again.
    """
    name = cfg.cluster_name
    ids: list[str] = []
    with aws_errors(cfg):
        client = client_for(cfg.region)
        parts = _cluster_parts(cfg, find(client, scope_of(cfg)))
        image = _image(client, cfg, parts["image_id"])
        token = secrets.token_hex(8)
        try:
            for batch in encode_numbers(numbers):
                args = _worker_args(cfg, parts, image, batch, f"{token}-{batch[0]}")
                ids += [i["InstanceId"] for i in _run(client, cfg, args, batch, spot_fallback)["Instances"]]
            running = wait_for(client, name, ids, "running", progress)
        except BaseException:
            if ids:
                client.terminate_instances(InstanceIds=ids)
            raise
    by_name = {n.name: n for n in (node_of(i, name) for i in running)}
    return [by_name[f"{name}-worker-{number}"] for number in numbers]


def _run(client, cfg: ClusterConfig, args: dict[str, Any], numbers: list[int], spot_fallback: bool) -> dict[str, Any]:
    """RunInstances; a spot request EC2 has no capacity for goes on demand when ``spot_fallback`` allows."""
    try:
        return client.run_instances(**args)
    except Exception as exc:
        code = error_code(exc)
        if "InstanceMarketOptions" not in args or code not in SPOT_REFUSED:
            raise
        which = ", ".join(f"worker-{n}" for n in numbers)
        if not spot_fallback:
            raise ProviderError(f"EC2 refused spot capacity for {which} ({code}); inv cluster.repair --spot-fallback "
                                f"replaces them on demand", provider="ec2", cluster=cfg.cluster_name) from exc
    on_demand = {k: v for k, v in args.items() if k != "InstanceMarketOptions"}
    on_demand["ClientToken"] = args["ClientToken"] + "-od"
    return client.run_instances(**on_demand)


def remove_workers(cfg: ClusterConfig, *, nodes: list[Node], progress: Progress | None) -> list[str]:
    """Terminate the instances of ``nodes`` that still live, and wait until they are terminated."""
    wanted = {n.id for n in nodes}
    with aws_errors(cfg):
        client = client_for(cfg.region)
        live = [i["InstanceId"] for i in describe(client, *scope_of(cfg).filters(), live_filter())
                if i["InstanceId"] in wanted]
        if live:
            client.terminate_instances(InstanceIds=live)
            wait_for(client, cfg.cluster_name, live, "terminated", progress)
    return [f"terminated {len(live)} instances of ec2 cluster '{cfg.cluster_name}': "
            + ", ".join(n.name for n in nodes if n.id in live)] if live else []


def worker_hourly(cfg: ClusterConfig) -> float | None:
    """One more worker's on-demand list price per hour (spot workers cost less; unknown type: None)."""
    return prices.hourly(cfg.instance_type, cfg.region)
