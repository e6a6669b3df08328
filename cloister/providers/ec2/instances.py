"""Instances of a cluster: found by the tag ``cloister:cluster``, one DescribeInstances per poll for all of them."""

from __future__ import annotations

import ipaddress
from collections import Counter
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import ClusterConfig
from ...errors import CloisterError, ProviderError
from ...poll import Backoff
from ...cluster.servers import ClusterInfo, Node, read_servers
from ...settings import Settings
from ..base import Progress
from .aws import caller_identity

TAG_CLUSTER = "cloister:cluster"
TAG_OWNER = "cloister:owner"
TAG_ROLE = "cloister:role"
TAG_TTL = "cloister:ttl-expires"
TAG_IMAGE = "cloister:ami-tag"
# The worker numbers of one RunInstances call, as ranges ("3-5,8"); a worker's is the one at its
# launch index. Without the tag (the first launch) a worker's number is its launch index + 1.
TAG_WORKERS = "cloister:workers"
TAG_VALUE_LIMIT = 256
LIVE_STATES = ("pending", "running", "stopping", "stopped")
WAIT_TIMEOUT = 900.0


@dataclass(frozen=True)
class Scope:
    """What makes an instance one of this cluster's: its name and its owner's tags.

    Two people of one account may both name a cluster 'exp'; the owner tag (the caller's identity,
    or ``owner`` in the config) keeps each from finding, adopting or destroying the other's.
    """

    cluster: str
    owner: str

    def filters(self) -> list[dict[str, Any]]:
        return [cluster_filter(self.cluster), {"Name": f"tag:{TAG_OWNER}", "Values": [self.owner]}]

    def tag_spec(self, kind: str, *extra: tuple[str, str]) -> dict[str, Any]:
        tags = [(TAG_CLUSTER, self.cluster), (TAG_OWNER, self.owner), *extra]
        return {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags]}


def scope_of(cfg: ClusterConfig) -> Scope:
    return Scope(cluster=cfg.cluster_name, owner=cfg.owner or caller_identity(cfg))


def cluster_filter(cluster: str) -> dict[str, Any]:
    return {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}


def live_filter() -> dict[str, Any]:
    return {"Name": "instance-state-name", "Values": list(LIVE_STATES)}


def describe(client, *filters: dict[str, Any]) -> list[dict[str, Any]]:
    pages = client.get_paginator("describe_instances").paginate(Filters=list(filters))
    return [inst for page in pages for reservation in page["Reservations"] for inst in reservation["Instances"]]


def find(client, scope: Scope) -> list[dict[str, Any]]:
    """The cluster's instances that are not (being) terminated, master first, workers by number."""
    found = describe(client, *scope.filters(), live_filter())
    return sorted(found, key=lambda i: (role_of(i) != "master", worker_number(i), i["InstanceId"]))


def encode_numbers(numbers: list[int]) -> list[list[int]]:
    """``numbers`` in batches whose ranges text fits one tag value (one RunInstances call each)."""
    batches: list[list[int]] = [[]]
    for number in numbers:
        if len(ranges(batches[-1] + [number])) > TAG_VALUE_LIMIT:
            batches.append([])
        batches[-1].append(number)
    return [b for b in batches if b]


def ranges(numbers: list[int]) -> str:
    """[3, 4, 5, 8] -> "3-5,8" (in the given order; a run is consecutive ascending numbers)."""
    parts: list[list[int]] = []
    for number in numbers:
        if parts and number == parts[-1][-1] + 1:
            parts[-1].append(number)
        else:
            parts.append([number])
    return ",".join(str(p[0]) if len(p) == 1 else f"{p[0]}-{p[-1]}" for p in parts)


def parse_ranges(text: str) -> list[int]:
    numbers: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        numbers += range(int(low), int(high or low) + 1)
    return numbers


def worker_number(instance: dict[str, Any]) -> int:
    index = instance.get("AmiLaunchIndex", 0)
    listed = tags_of(instance).get(TAG_WORKERS)
    try:
        return parse_ranges(listed)[index] if listed else index + 1
    except (ValueError, IndexError):
        return index + 1


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def role_of(instance: dict[str, Any]) -> str:
    return tags_of(instance).get(TAG_ROLE, "worker")


def state_of(instance: dict[str, Any]) -> str:
    return instance["State"]["Name"]


def node_of(instance: dict[str, Any], cluster: str) -> Node:
    # One RunInstances call launches many workers with the same tags, so a worker's number comes from its
    # launch index; tagging each worker's Name separately would cost one request per worker.
    role = role_of(instance)
    name = f"{cluster}-master" if role == "master" else f"{cluster}-worker-{worker_number(instance)}"
    public = instance.get("PublicDnsName") or instance.get("PublicIpAddress") or ""
    private = instance.get("PrivateIpAddress") or ""
    cpu = instance.get("CpuOptions") or {}
    slots = cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1) or None
    return Node(role=role, id=instance["InstanceId"], host=public or private, private=private, public=public,
                name=name, slots=slots)


def known_hosts_path(settings: Settings, cfg: ClusterConfig) -> Path:
    return state_path(settings, cfg) / "known_hosts"


def state_path(settings: Settings, cfg: ClusterConfig) -> Path:
    """This machine's state of the cluster; per region, as one name may be used in two regions."""
    return Path(settings.state_dir).resolve() / "ec2" / str(cfg.region) / cfg.cluster_name


def cluster_info(cfg: ClusterConfig, instances: list[dict[str, Any]], settings: Settings) -> ClusterInfo:
    nodes = [node_of(i, cfg.cluster_name) for i in instances]
    groups = sorted({g["GroupId"] for i in instances for g in i.get("SecurityGroups", [])})
    return ClusterInfo(provider="ec2", cluster_name=cfg.cluster_name, user=cfg.user, ssh_key=cfg.ssh_key or "",
                       nodes=nodes, known_hosts=str(known_hosts_path(settings, cfg)),
                       region=cfg.region, extra={"security_groups": groups})


def forget_host_keys(settings: Settings, cfg: ClusterConfig) -> None:
    """New instances, or old ones with new addresses: a recorded key for a reused address would be refused."""
    known_hosts_path(settings, cfg).unlink(missing_ok=True)


def summary(instances: list[dict[str, Any]]) -> str:
    by_role = Counter((role_of(i), i["InstanceType"]) for i in instances)
    return ", ".join(f"{n} {role}{'s' if n > 1 else ''} ({kind})" for (role, kind), n in sorted(by_role.items()))


def wait_for(client, cluster: str, ids: list[str], target: str, progress: Progress | None,
              timeout: float = WAIT_TIMEOUT) -> list[dict[str, Any]]:
    """Poll with one DescribeInstances per round until every id in ``ids`` is in state ``target``."""
    wanted = set(ids)
    backoff = Backoff(timeout, initial=1.0, maximum=5.0, factor=1.5)
    while True:
        seen = {i["InstanceId"]: i for i in describe(client, cluster_filter(cluster))
                if i["InstanceId"] in wanted}
        # Right after RunInstances an instance may not be listed yet; after termination it may be gone.
        absent = "terminated" if target == "terminated" else "pending"
        states = {i: state_of(seen[i]) if i in seen else absent for i in ids}
        counts = Counter(states.values())
        if progress:
            progress(f"{cluster}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), counts[target],
                     len(ids))
        if counts[target] == len(ids):
            return [seen[i] for i in ids if i in seen]
        if target != "terminated":
            lost = [i for i, s in states.items() if s in ("shutting-down", "terminated")]
            if lost:
                reasons = {(seen[i].get("StateReason") or {}).get("Message", "no reason given") for i in lost}
                raise ProviderError(f"{len(lost)} instance(s) terminated while waiting for {target}: "
                                    f"{', '.join(lost[:8])} ({'; '.join(sorted(reasons))})",
                                    provider="ec2", cluster=cluster)
        if not backoff.wait():
            late = [i for i, s in states.items() if s != target]
            raise ProviderError(f"{len(late)} instance(s) not {target} after {timeout:.0f}s: {', '.join(late[:8])}",
                                provider="ec2", cluster=cluster)


def dev_instance(client, cfg: ClusterConfig) -> dict[str, Any]:
    """The running dev instance named by ``ami_instance_ip`` (public or private DNS name or IP, or id)."""
    address = cfg.ami_instance_ip
    if not address:
        raise ProviderError(f"{cfg.source}: key 'ami_instance_ip': missing; name the dev instance to image",
                            provider="ec2", cluster=cfg.cluster_name)
    try:
        ipaddress.ip_address(address)
        fields = ("ip-address", "private-ip-address")
    except ValueError:
        fields = ("instance-id",) if address.startswith("i-") else ("dns-name", "private-dns-name")
    for field in fields:
        found = describe(client, {"Name": field, "Values": [address]}, live_filter())
        if found:
            return found[0]
    raise ProviderError(f"no instance with address {address} (ami_instance_ip in {cfg.source}) in {cfg.region}",
                        provider="ec2", cluster=cfg.cluster_name)


def find_existing(client, cfg: ClusterConfig, scope: Scope) -> list[dict[str, Any]]:
    found = find(client, scope)
    if not found:
        raise ProviderError(f"no ec2 cluster '{cfg.cluster_name}' in {cfg.region}", provider="ec2",
                            cluster=cfg.cluster_name)
    return found


def ttl_left(instance: dict[str, Any], now: datetime) -> float | None:
    expires = tags_of(instance).get(TAG_TTL)
    if not expires:
        return None
    return (datetime.fromisoformat(expires.replace("Z", "+00:00")) - now).total_seconds()


def refuse_unfound(client, cfg: ClusterConfig, settings: Settings, found: list[dict[str, Any]], *,
                   owner: str, doing: str) -> None:
    """Raise if servers/ records live instances of this cluster that this owner's tag filter did not find
    (tagged by another identity, or not at all): a destroy would clear servers/ and the cluster key while
    they run on unseen, a launch would make a second cluster beside them. ``doing``: what was not done."""
    ids = sorted(set(recorded_ids(cfg, settings)) - {i["InstanceId"] for i in found})
    alive = describe(client, {"Name": "instance-id", "Values": ids}, live_filter()) if ids else []
    if not alive:
        return
    owners = sorted({tags_of(i).get(TAG_OWNER, "(none)") for i in alive})
    listed = ", ".join(i["InstanceId"] for i in alive[:8]) + (f" and {len(alive) - 8} more" if len(alive) > 8 else "")
    raise ProviderError(
        f"servers/ records {len(alive)} running instances of ec2 cluster '{cfg.cluster_name}' ({listed}) tagged "
        f"{TAG_OWNER}={', '.join(owners)}, not {owner}; {doing}, servers/ and the cluster key are kept. If "
        f"they are yours, set \"owner\": \"{owners[0]}\" in {cfg.source} and try again",
        provider="ec2", cluster=cfg.cluster_name)


def recorded_ids(cfg: ClusterConfig, settings: Settings) -> list[str]:
    """The instance ids servers/ records for this cluster in this region (none when it records another)."""
    try:
        info = read_servers(settings.servers_dir, cluster_name=cfg.cluster_name)
    except CloisterError:
        return []
    return [n.id for n in info.nodes] if (info.provider, info.region) == ("ec2", cfg.region) else []
