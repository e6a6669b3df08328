"""What a cluster has cost so far and costs per hour now: instances (spot at their spot price), EBS
volumes (billed while stopped too) and public IPv4 addresses.

EC2 resets LaunchTime at every start, so the running time before a stop is kept in a tag that
``cluster.stop`` writes; a stopped cluster's disks keep billing from their creation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ...config import ClusterConfig
from . import prices
from .instances import Scope, state_of, tags_of

TAG_RUN_SECONDS = "cloister:run-seconds"


@dataclass(frozen=True)
class NodeCost:
    so_far: float | None  # None: the instance's price is unknown
    hourly: float | None
    rate_source: str      # "on-demand", "spot", "unknown"


def run_seconds(instance: dict[str, Any], now: datetime) -> float:
    """Seconds the instance has run: before its last start (the tag) and since."""
    before = float(tags_of(instance).get(TAG_RUN_SECONDS, 0) or 0)
    if state_of(instance) in ("pending", "running", "stopping"):
        before += max(0.0, (now - instance["LaunchTime"]).total_seconds())
    return before


def _spot_prices(client, instances: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """The current spot price of each (type, zone) that has a spot instance; one request each."""
    wanted = {(i["InstanceType"], i["Placement"]["AvailabilityZone"]) for i in instances
              if i.get("InstanceLifecycle") == "spot"}
    found = {}
    for kind, zone in sorted(wanted):
        # StartTime now: the price in force now (without it EC2 may answer an older entry first).
        history = client.describe_spot_price_history(InstanceTypes=[kind], AvailabilityZone=zone, MaxResults=1,
                                                     StartTime=datetime.now(timezone.utc),
                                                     ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
        if history:
            found[kind, zone] = float(history[0]["SpotPrice"])
    return found


def describe_volumes(client, scope: Scope) -> list[dict[str, Any]]:
    pages = client.get_paginator("describe_volumes").paginate(Filters=scope.filters())
    return [volume for page in pages for volume in page["Volumes"]]


def _volumes(volumes: list[dict[str, Any]], now: datetime,
             region: str | None) -> tuple[dict[str, float], dict[str, float]]:
    """Per instance: EBS $ so far (from each volume's creation) and $/hour now."""
    so_far: dict[str, float] = defaultdict(float)
    hourly: dict[str, float] = defaultdict(float)
    for volume in volumes:
        rate = prices.ebs_hourly(volume["Size"], region) or 0.0
        for attachment in volume.get("Attachments", []):
            hours = max(0.0, (now - volume["CreateTime"]).total_seconds()) / 3600
            so_far[attachment["InstanceId"]] += rate * hours
            hourly[attachment["InstanceId"]] += rate
    return so_far, hourly


def node_costs(client, cfg: ClusterConfig, instances: list[dict[str, Any]], volumes: list[dict[str, Any]],
               now: datetime) -> dict[str, NodeCost]:
    """Every instance's cost so far and per hour now."""
    spot = _spot_prices(client, instances)
    ebs_so_far, ebs_hourly = _volumes(volumes, now, cfg.region)
    costs = {}
    for inst in instances:
        kind, zone = inst["InstanceType"], inst["Placement"]["AvailabilityZone"]
        rate = spot.get((kind, zone)) if inst.get("InstanceLifecycle") == "spot" else prices.hourly(kind, cfg.region)
        source = "unknown" if rate is None else ("spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand")
        ran = run_seconds(inst, now) / 3600
        running = state_of(inst) in ("pending", "running")
        ipv4 = prices.PUBLIC_IPV4_HOURLY if inst.get("PublicIpAddress") else 0.0
        iid = inst["InstanceId"]
        so_far = None if rate is None else rate * ran + ipv4 * ran + ebs_so_far[iid]
        hourly = None if rate is None else (rate + ipv4 if running else 0.0) + ebs_hourly[iid]
        costs[iid] = NodeCost(so_far=so_far, hourly=hourly, rate_source=source)
    return costs


def stop_tags(instances: list[dict[str, Any]], now: datetime) -> dict[str, list[str]]:
    """The run-seconds tag values to write before a stop, grouped so one CreateTags covers many instances."""
    groups: dict[str, list[str]] = defaultdict(list)
    for inst in instances:
        if state_of(inst) in ("pending", "running"):
            groups[str(int(run_seconds(inst, now)) // 60 * 60)].append(inst["InstanceId"])
    return dict(groups)
