"""A cluster after launch: destroy, stop, start, status and the list of every cluster in a region."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from . import prices
from ...config import ClusterConfig
from ...errors import ProviderError
from ...cluster.servers import ClusterInfo
from ...settings import Settings
from ..base import ClusterRow, Confirm, NodeStatus, Progress
from .aws import aws_errors, client_for
from . import cost, swap, ttl
from .instances import (TAG_CLUSTER, TAG_OWNER, TAG_TTL, cluster_info, describe, find, find_existing, forget_host_keys,
                        live_filter, node_of, refuse_unfound, role_of, scope_of, state_of, summary, tags_of, ttl_left,
                        wait_for)
from .launch import confirmed, teardown

def destroy(cfg: ClusterConfig, *, settings: Settings, confirm: Confirm | None = None,
            progress: Progress | None = None) -> list[str]:
    """Terminate the instances tagged with the cluster (after ``confirm``, if given) and delete its groups.

    Refuses, touching nothing, while an instance servers/ records for this cluster still runs but is not
    among them: clearing servers/ and the cluster key then would leave it running unseen."""
    name = cfg.cluster_name
    with aws_errors(cfg):
        client = client_for(cfg.region)
        scope = scope_of(cfg)
        found = find(client, scope)
        refuse_unfound(client, cfg, settings, found, owner=scope.owner, doing="nothing was terminated")
        what = summary(found)
        if found and confirm is not None and not confirmed(
                confirm, f"Terminate {len(found)} instances of ec2 cluster '{name}' in {cfg.region}: {what}?"):
            raise ProviderError("not confirmed; pass --yes to destroy without asking", provider="ec2", cluster=name)
        ids = [i["InstanceId"] for i in found]
        messages = teardown(client, cfg, ids, settings=settings, progress=progress)
    head = (f"terminated {len(ids)} instances of ec2 cluster '{name}': {what}" if ids
            else f"no instances tagged {TAG_CLUSTER}={name} in {cfg.region}; nothing to terminate")
    return [head, *messages]


def stop(cfg: ClusterConfig, *, settings: Settings, progress: Progress | None = None) -> list[str]:
    """Stop every running instance of the cluster (EBS volumes are kept) and wait until stopped."""
    name = cfg.cluster_name
    with aws_errors(cfg):
        client = client_for(cfg.region)
        found = find_existing(client, cfg, scope_of(cfg))
        spot = [i["InstanceId"] for i in found if i.get("InstanceLifecycle") == "spot"]
        if spot:
            raise ProviderError(f"{len(spot)} instances of '{name}' are one-time spot instances, which EC2 cannot "
                                f"stop; destroy the cluster instead (or launch it without spot)",
                                provider="ec2", cluster=name)
        ids = [i["InstanceId"] for i in found if state_of(i) in ("pending", "running")]
        for seconds, members in cost.stop_tags(found, datetime.now(timezone.utc)).items():
            client.create_tags(Resources=members, Tags=[{"Key": cost.TAG_RUN_SECONDS, "Value": seconds}])
        if ids:
            client.stop_instances(InstanceIds=ids)
        wait_for(client, name, [i["InstanceId"] for i in found], "stopped", progress)
    return [f"stopped {len(ids)} instances of ec2 cluster '{name}'" + (
        f" ({len(found) - len(ids)} were already stopped)" if len(found) > len(ids) else "")]


def start(cfg: ClusterConfig, *, settings: Settings, progress: Progress | None = None) -> ClusterInfo:
    """Start a stopped cluster and wait until it runs; its addresses change, so the result is new."""
    name = cfg.cluster_name
    with aws_errors(cfg):
        client = client_for(cfg.region)
        found = find_existing(client, cfg, scope_of(cfg))
        expired = _reap(client, found)
        if expired:
            raise ProviderError(f"the TTL of {len(expired)} instances of '{name}' passed while they were stopped; "
                                f"terminated them (stopped disks still bill); launch the cluster again",
                                provider="ec2", cluster=name)
        stopping = [i["InstanceId"] for i in found if state_of(i) == "stopping"]
        if stopping:
            wait_for(client, name, stopping, "stopped", progress)
        ids = [i["InstanceId"] for i in found if state_of(i) in ("stopping", "stopped")]
        if ids:
            client.start_instances(InstanceIds=ids)
        running = wait_for(client, name, [i["InstanceId"] for i in found], "running", progress)
    forget_host_keys(settings, cfg)
    return cluster_info(cfg, running, settings)


def _reap(client, instances: list[dict[str, Any]]) -> list[str]:
    """Terminate stopped instances whose TTL has passed: their timer cannot fire while they are stopped,
    and their disks bill. Returns their ids."""
    now = datetime.now(timezone.utc)
    expired = [i["InstanceId"] for i in instances if state_of(i) in ("stopping", "stopped")
               and (left := ttl_left(i, now)) is not None and left <= 0]
    if expired:
        client.terminate_instances(InstanceIds=expired)
    return expired


def reap(cfg: ClusterConfig) -> list[str]:
    """Terminate every stopped instance of this owner in the region whose TTL has passed."""
    with aws_errors(cfg):
        client = client_for(cfg.region)
        found = describe(client, {"Name": f"tag:{TAG_OWNER}", "Values": [scope_of(cfg).owner]},
                         {"Name": "tag-key", "Values": [TAG_CLUSTER]}, live_filter())
        expired = _reap(client, found)
    names = {i["InstanceId"]: tags_of(i)[TAG_CLUSTER] for i in found}
    return [f"terminated {i} of ec2 cluster '{names[i]}': stopped past its TTL" for i in expired]


def extend(cfg: ClusterConfig, *, settings: Settings, seconds: int) -> list[str]:
    """Move the cluster's TTL to ``seconds`` from now: the tag on every instance, the timer on every node."""
    name = cfg.cluster_name
    expires = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    with aws_errors(cfg):
        client = client_for(cfg.region)
        found = find_existing(client, cfg, scope_of(cfg))
        asleep = [i["InstanceId"] for i in found if state_of(i) != "running"]
        if asleep:
            raise ProviderError(f"{len(asleep)} instances of '{name}' are not running ({', '.join(asleep[:4])}); "
                                f"their timers cannot be moved: inv cluster.start first", provider="ec2", cluster=name)
        client.create_tags(Resources=[i["InstanceId"] for i in found],
                           Tags=[{"Key": TAG_TTL, "Value": f"{expires:%Y-%m-%dT%H:%M:%SZ}"}])
    info = cluster_info(cfg, found, settings)
    ttl.rearm(info, info.nodes, settings=settings, epoch=int(expires.timestamp()))
    return [f"TTL of ec2 cluster '{name}' moved to {expires:%Y-%m-%d %H:%M} UTC on {len(found)} instances "
            f"(tag and timer)"]


def status(cfg: ClusterConfig) -> list[NodeStatus]:
    """One row per instance: role, id, public host, type, state, uptime, TTL left, estimated cost so far.

    A stopped instance past its TTL is terminated on sight (and shown so)."""
    with aws_errors(cfg):
        client = client_for(cfg.region)
        scope = scope_of(cfg)
        found = find(client, scope)
        expired = set(_reap(client, found))
        found = [{**i, "State": {"Name": "shutting-down"}} if i["InstanceId"] in expired else i for i in found]
        now = datetime.now(timezone.utc)
        volumes = cost.describe_volumes(client, scope)
        costs = cost.node_costs(client, cfg, found, volumes, now)
    swaps = {a["InstanceId"]: v["Size"] for v in volumes for a in v.get("Attachments", [])
             if a.get("Device") == swap.DEVICE}
    rows = []
    for inst in found:
        node = node_of(inst, cfg.cluster_name)
        up = (now - inst["LaunchTime"]).total_seconds() if state_of(inst) == "running" else None
        left = ttl_left(inst, now)
        spent = costs[inst["InstanceId"]]
        rows.append(NodeStatus(
            role=node.role, id=node.id, name=node.name, host=node.host or "-",
            type=inst["InstanceType"] + (" (spot)" if inst.get("InstanceLifecycle") == "spot" else "")
            + (f", swap {swaps[node.id]} GiB" if node.id in swaps else ""),
            state=state_of(inst), uptime_s=up, ttl_left_s=None if left is None else max(left, 0.0),
            cost=prices.dollars(spent.so_far), cost_usd=spent.so_far, hourly_usd=spent.hourly))
    return rows


def list_clusters(cfg: ClusterConfig) -> list[ClusterRow]:
    """Every cloister cluster of this owner in the config's region (any name), from one DescribeInstances."""
    with aws_errors(cfg):
        owner = scope_of(cfg).owner
        found = describe(client_for(cfg.region), {"Name": "tag-key", "Values": [TAG_CLUSTER]},
                         {"Name": f"tag:{TAG_OWNER}", "Values": [owner]}, live_filter())
    now = datetime.now(timezone.utc)
    clusters: dict[str, list[dict[str, Any]]] = {}
    for inst in found:
        clusters.setdefault(tags_of(inst)[TAG_CLUSTER], []).append(inst)
    rows = []
    for name, members in sorted(clusters.items()):
        states = Counter(state_of(i) for i in members)
        lefts = [left for i in members if (left := ttl_left(i, now)) is not None]
        rows.append(ClusterRow(
            cluster=name, masters=sum(role_of(i) == "master" for i in members),
            workers=sum(role_of(i) != "master" for i in members),
            states=", ".join(f"{n} {s}" for s, n in sorted(states.items())),
            types=", ".join(sorted({i["InstanceType"] for i in members})),
            age_s=max((now - i["LaunchTime"]).total_seconds() for i in members),
            ttl_left_s=max(min(lefts), 0.0) if lefts else None))
    return rows



# What EC2's StateReason codes mean for someone whose node vanished.
FATES = {
    "Server.SpotInstanceTermination": "EC2 reclaimed the spot instance (it needed the capacity back or the spot "
                                      "price rose above the maximum)",
    "Client.InstanceInitiatedShutdown": "it powered itself off (its TTL, or a shutdown on the node)",
    "Client.UserInitiatedShutdown": "someone terminated it (a destroy elsewhere, the console, another tool)",
    "Server.InternalError": "EC2 ended it after an internal error (a hardware failure)",
    "Server.ScheduledStop": "EC2 retired it (scheduled maintenance of its host)",
}
# EC2 accepts at most this many values in one filter.
FILTER_VALUES = 199


def gone(cfg: ClusterConfig, info: ClusterInfo) -> dict[str, str]:
    """The nodes of ``info`` that have ended, node id -> what became of each (EC2's StateReason)."""
    ids = [n.id for n in info.nodes if n.id]
    seen: dict[str, dict[str, Any]] = {}
    with aws_errors(cfg):
        client = client_for(cfg.region)
        for start in range(0, len(ids), FILTER_VALUES):
            chunk = ids[start:start + FILTER_VALUES]
            seen.update((i["InstanceId"], i) for i in describe(client, {"Name": "instance-id", "Values": chunk}))
    fates = {}
    for instance_id in ids:
        found = seen.get(instance_id)
        if found is None:
            fates[instance_id] = "EC2 no longer lists it (terminated over an hour ago)"
        elif state_of(found) in ("shutting-down", "terminated"):
            fates[instance_id] = fate(found)
    return fates


def fate(instance: dict[str, Any]) -> str:
    reason = instance.get("StateReason") or {}
    code = reason.get("Code", "")
    told = FATES.get(code) or reason.get("Message") or "no reason given"
    return f"{state_of(instance)}" + (f" ({code})" if code else "") + f": {told}"
