"""The EC2 provider: every boto3 call cloister makes (SPEC section 5, issue 5).

Membership is the tag ``cloister:cluster`` on every resource (the old scripts used security group
names and opened every port to the world); one DescribeInstances filtered by that tag answers each
poll for the whole cluster, so the number of requests does not grow with the cluster. boto3 is
imported inside ``_client`` so that ``inv --list`` never pays for it. Retries are botocore's adaptive
mode; every botocore error becomes an AwsError with one line saying what happened and what to do.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import shutil
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn

from . import images, prices
from .cluster import LaunchResult, clear_own_servers
from .settings import Settings
from .config import ClusterConfig
from .errors import AwsError, CloisterError, ProviderError
from .images import Image
from .servers import ClusterInfo, Node

log = logging.getLogger("cloister.ec2")

TAG_CLUSTER = "cloister:cluster"
TAG_ROLE = "cloister:role"
TAG_TTL = "cloister:ttl-expires"
TAG_IMAGE = "cloister:ami-tag"
LIVE_STATES = ("pending", "running", "stopping", "stopped")
RETRIES = {"mode": "adaptive", "max_attempts": 10}
CHECKIP_URL = "https://checkip.amazonaws.com"
WAIT_TIMEOUT = 900.0
IMAGE_TIMEOUT = 3600.0
# A security group stays "in use" for a while after its instances terminate.
IN_USE_TIMEOUT = 300.0

# (text, done, total): one call per poll, for a progress bar.
Progress = Callable[[str, int, int], None]
Confirm = Callable[[str], bool]

# bootcmd runs on every boot, so a stopped and restarted node keeps its expiry; systemd-run talks to
# PID 1 directly, which works that early in boot, while `shutdown +N` needs logind over D-Bus.
TTL_USER_DATA = """\
#cloud-config
# cloister: power off at the cluster's TTL ({expires}); the instance was launched with
# InstanceInitiatedShutdownBehavior=terminate, so powering off terminates it.
bootcmd:
  - |
    left=$(( {epoch} - $(date +%s) ))
    [ "$left" -gt 60 ] || left=60
    systemd-run --unit=cloister-ttl --on-active="$left" /bin/systemctl poweroff
"""

# (codes, (what happened, what to do)); {region} and {operation} are filled in.
_EXPLAIN_GROUPS: list[tuple[tuple[str, ...], tuple[str, str]]] = [
    (("AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
      "ExpiredToken", "RequestExpired"),
     ("AWS rejected the credentials", "check them with `aws sts get-caller-identity` (and the clock)")),
    (("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"),
     ("not permitted to call {operation}", "ask your AWS administrator for the ec2:{operation} permission")),
    (("InvalidAMIID.NotFound", "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"),
     ("the AMI is not available in {region}", "check `ami` in the config, or run inv ami.list")),
    (("InvalidKeyPair.NotFound",),
     ("the key pair does not exist in {region}",
      "check `key_name`, or import your public key with aws ec2 import-key-pair")),
    (("InvalidInstanceType", "InvalidInstanceType.NotFound", "Unsupported"),
     ("the instance type is not offered here", "check instance_type and master_instance_type")),
    (("InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity"),
     ("AWS has no spare capacity for this request in {region} right now",
      "retry in a few minutes, choose another instance type, or drop placement_group")),
    (("VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"),
     ("your vCPU quota in {region} is too small for this launch",
      "ask for a higher 'Running On-Demand/Spot instances' quota in Service Quotas, "
      "or use fewer or smaller instances")),
    (("RequestLimitExceeded", "Throttling", "ThrottlingException"),
     (f"EC2 kept throttling requests after {RETRIES['max_attempts']} attempts",
      "wait a minute and retry; another tool may be calling EC2 heavily")),
    (("SpotMaxPriceTooLow",),
     ("the spot max price is below the current spot price", "raise `spot` in the config, or set it to true")),
    (("DependencyViolation", "InvalidPlacementGroup.InUse"),
     ("a resource is still in use", "wait a minute and run inv cluster.destroy again")),
]
_EXPLAIN = {code: text for codes, text in _EXPLAIN_GROUPS for code in codes}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def aws_error(exc: Exception, *, region: str | None, cluster: str | None = None) -> AwsError:
    """One line for a botocore exception: what happened, AWS's own words, and what to do."""
    from botocore import exceptions as bx
    from botocore.parsers import ResponseParserError

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        what, todo = _EXPLAIN.get(code, ("EC2 {operation} failed in {region}", ""))
        fill = {"region": region, "operation": exc.operation_name}
        message = f"{what.format(**fill)} ({code}: {_one_line(error.get('Message', ''))})"
        if todo:
            message += f"; {todo.format(**fill)}"
        return AwsError(message, code=code, operation=exc.operation_name, region=region, cluster=cluster)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        message = ("no AWS credentials found: run `aws configure`, or set AWS_PROFILE, or "
                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    elif isinstance(exc, bx.NoRegionError):
        message = "no AWS region: set `region` in the cluster config"
    elif isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        message = (f"cannot reach the EC2 endpoint ({_one_line(exc)}): check the network, or "
                   f"AWS_ENDPOINT_URL_EC2 if you set it")
    elif isinstance(exc, bx.ReadTimeoutError):
        message = f"EC2 did not answer in time ({_one_line(exc)}); retry in a minute"
    elif isinstance(exc, ResponseParserError):
        message = (f"the EC2 endpoint answered with something other than EC2's XML ({_one_line(exc, 120)}); "
                   f"check AWS_ENDPOINT_URL_EC2 or any proxy in between")
    else:
        message = f"AWS client error: {_one_line(exc)}"
    return AwsError(message, code=type(exc).__name__, region=region, cluster=cluster)


@contextlib.contextmanager
def _aws(cfg: ClusterConfig) -> Iterator[None]:
    """Turn botocore errors raised inside into AwsError (no traceback for the user)."""
    try:
        yield
    except _botocore_errors() as exc:
        raise aws_error(exc, region=cfg.region, cluster=cfg.cluster_name) from None


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    return ClientError, BotoCoreError, ResponseParserError


def _client(region: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client("ec2", region_name=region, config=Config(retries=RETRIES))


def _code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


# -- instances -------------------------------------------------------------------


def _cluster_filter(cluster: str) -> dict[str, Any]:
    return {"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]}


def _live_filter() -> dict[str, Any]:
    return {"Name": "instance-state-name", "Values": list(LIVE_STATES)}


def _instances(client, *filters: dict[str, Any]) -> list[dict[str, Any]]:
    pages = client.get_paginator("describe_instances").paginate(Filters=list(filters))
    return [inst for page in pages for reservation in page["Reservations"] for inst in reservation["Instances"]]


def _find(client, cluster: str) -> list[dict[str, Any]]:
    """The cluster's instances that are not (being) terminated, master first, workers by launch index."""
    found = _instances(client, _cluster_filter(cluster), _live_filter())
    return sorted(found, key=lambda i: (_role(i) != "master", i.get("AmiLaunchIndex", 0), i["InstanceId"]))


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _role(instance: dict[str, Any]) -> str:
    return _tags(instance).get(TAG_ROLE, "worker")


def _state(instance: dict[str, Any]) -> str:
    return instance["State"]["Name"]


def _node(instance: dict[str, Any], cluster: str) -> Node:
    # One RunInstances call launches every worker with the same tags, so a worker's number is its
    # launch index; tagging each worker's Name separately would cost one request per worker.
    role = _role(instance)
    name = f"{cluster}-master" if role == "master" else f"{cluster}-worker-{instance.get('AmiLaunchIndex', 0) + 1}"
    public = instance.get("PublicDnsName") or instance.get("PublicIpAddress") or ""
    private = instance.get("PrivateIpAddress") or ""
    return Node(role=role, id=instance["InstanceId"], host=public or private, private=private, public=public,
                name=name)


def known_hosts_path(settings: Settings, cluster: str) -> Path:
    return state_path(settings, cluster) / "known_hosts"


def state_path(settings: Settings, cluster: str) -> Path:
    return Path(settings.state_dir).resolve() / "ec2" / cluster


def _info(cfg: ClusterConfig, instances: list[dict[str, Any]], settings: Settings) -> ClusterInfo:
    nodes = [_node(i, cfg.cluster_name) for i in instances]
    groups = sorted({g["GroupId"] for i in instances for g in i.get("SecurityGroups", [])})
    return ClusterInfo(provider="ec2", cluster_name=cfg.cluster_name, user=cfg.user, ssh_key=cfg.ssh_key or "",
                       nodes=nodes, known_hosts=str(known_hosts_path(settings, cfg.cluster_name)),
                       region=cfg.region, extra={"security_groups": groups})


def _forget_host_keys(settings: Settings, cluster: str) -> None:
    """New instances, or old ones with new addresses: a recorded key for a reused address would be refused."""
    known_hosts_path(settings, cluster).unlink(missing_ok=True)


def _summary(instances: list[dict[str, Any]]) -> str:
    by_role = Counter((_role(i), i["InstanceType"]) for i in instances)
    return ", ".join(f"{n} {role}{'s' if n > 1 else ''} ({kind})" for (role, kind), n in sorted(by_role.items()))


def _wait_for(client, cluster: str, ids: list[str], target: str, progress: Progress | None,
              timeout: float = WAIT_TIMEOUT) -> list[dict[str, Any]]:
    """Poll with one DescribeInstances per round until every id in ``ids`` is in state ``target``."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        seen = {i["InstanceId"]: i for i in _instances(client, _cluster_filter(cluster))
                if i["InstanceId"] in wanted}
        # Right after RunInstances an instance may not be listed yet; after termination it may be gone.
        absent = "terminated" if target == "terminated" else "pending"
        states = {i: _state(seen[i]) if i in seen else absent for i in ids}
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
        if time.monotonic() + delay > deadline:
            late = [i for i, s in states.items() if s != target]
            raise ProviderError(f"{len(late)} instance(s) not {target} after {timeout:.0f}s: {', '.join(late[:8])}",
                                provider="ec2", cluster=cluster)
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def _until_free(call: Callable[[], Any], *, codes: tuple[str, ...], timeout: float = IN_USE_TIMEOUT) -> None:
    """Call until EC2 stops answering one of ``codes`` (a resource still in use)."""
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            call()
            return
        except Exception as exc:
            if _code(exc) not in codes or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


# -- images --------------------------------------------------------------------


def _to_image(raw: dict[str, Any]) -> Image:
    snapshots = tuple(m["Ebs"]["SnapshotId"] for m in raw.get("BlockDeviceMappings", [])
                      if m.get("Ebs", {}).get("SnapshotId"))
    created = datetime.fromisoformat(raw["CreationDate"].replace("Z", "+00:00"))
    return Image(id=raw["ImageId"], name=raw.get("Name", ""), created=created, state=raw.get("State", ""),
                 snapshots=snapshots)


def _own_images(client, cfg: ClusterConfig) -> list[dict[str, Any]]:
    raw = client.describe_images(Owners=["self"],
                                 Filters=[{"Name": "name", "Values": [images.pattern(cfg)]}])["Images"]
    return sorted(raw, key=lambda i: (i["CreationDate"], i.get("Name", "")), reverse=True)


def list_images(cfg: ClusterConfig) -> list[Image]:
    """Own AMIs whose name starts with the prefix, newest first."""
    with _aws(cfg):
        return [_to_image(raw) for raw in _own_images(_client(cfg.region), cfg)]


def _launch_image(client, cfg: ClusterConfig) -> dict[str, Any]:
    """The AMI to launch (``latest`` resolved), checked to be available and to fit ``root_size``."""
    if cfg.ami == "latest":
        available = [raw for raw in _own_images(client, cfg) if raw.get("State") == "available"]
        if not available:
            raise images.no_images_error(cfg, where=f"owned by you in {cfg.region}")
        image = available[0]
    else:
        image = client.describe_images(ImageIds=[cfg.ami])["Images"][0]
        if image.get("State") != "available":
            raise ProviderError(f"AMI {cfg.ami} is {image.get('State')}, not available; wait for it or pick another",
                                provider="ec2", cluster=cfg.cluster_name)
    root = _root_volume_size(image)
    if cfg.root_size and root and cfg.root_size < root:
        raise ProviderError(f"{cfg.source}: key 'root_size': {cfg.root_size} GiB is smaller than the root volume "
                            f"of {image['ImageId']} ({root} GiB); set at least {root}",
                            provider="ec2", cluster=cfg.cluster_name)
    return image


def _root_volume_size(image: dict[str, Any]) -> int | None:
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == image.get("RootDeviceName"):
            return mapping.get("Ebs", {}).get("VolumeSize")
    return None


def _dev_instance(client, cfg: ClusterConfig) -> dict[str, Any]:
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
        found = _instances(client, {"Name": field, "Values": [address]}, _live_filter())
        if found:
            return found[0]
    raise ProviderError(f"no instance with address {address} (ami_instance_ip in {cfg.source}) in {cfg.region}",
                        provider="ec2", cluster=cfg.cluster_name)


def create_image(cfg: ClusterConfig, *, name: str, progress: Progress | None = None) -> Image:
    """Image the dev instance as ``name`` and wait until the AMI is available."""
    with _aws(cfg):
        client = _client(cfg.region)
        dev = _dev_instance(client, cfg)
        tags = [{"Key": TAG_IMAGE, "Value": images.prefix(cfg)}]
        image_id = client.create_image(
            InstanceId=dev["InstanceId"], Name=name, Description=f"cloister image of {cfg.ami_instance_ip}",
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}, {"ResourceType": "snapshot", "Tags": tags}],
        )["ImageId"]
        deadline = time.monotonic() + IMAGE_TIMEOUT
        delay = 2.0
        while True:
            raw = client.describe_images(ImageIds=[image_id])["Images"][0]
            if progress:
                progress(f"{name} ({image_id}): {raw['State']}", int(raw["State"] == "available"), 1)
            if raw["State"] == "available":
                return _to_image(raw)
            if raw["State"] in ("failed", "invalid", "deregistered", "error"):
                reason = (raw.get("StateReason") or {}).get("Message", "no reason given")
                raise ProviderError(f"image {name} ({image_id}) {raw['State']}: {reason}",
                                    provider="ec2", cluster=cfg.cluster_name)
            if time.monotonic() + delay > deadline:
                raise ProviderError(f"image {name} ({image_id}) still {raw['State']} after {IMAGE_TIMEOUT:.0f}s; "
                                    f"inv ami.list shows when it is ready", provider="ec2", cluster=cfg.cluster_name)
            time.sleep(delay)
            delay = min(delay * 1.5, 15.0)


def delete_images(cfg: ClusterConfig, *, doomed: list[Image]) -> list[str]:
    """Deregister each AMI, then delete its snapshots (deregistering leaves them, and they cost money)."""
    messages = []
    with _aws(cfg):
        client = _client(cfg.region)
        for image in doomed:
            client.deregister_image(ImageId=image.id)
            for snapshot in image.snapshots:
                client.delete_snapshot(SnapshotId=snapshot)
            messages.append(f"deregistered {image.name} ({image.id})"
                            + (f" and deleted {', '.join(image.snapshots)}" if image.snapshots else ""))
    return messages


# -- security and placement groups ----------------------------------------------------


def _ssh_source(cfg: ClusterConfig) -> str:
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
                            f"({_one_line(exc)}); set ssh_cidr in {cfg.source}, e.g. 203.0.113.7/32",
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
        dev = _dev_instance(client, cfg)
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


def _tag_spec(kind: str, cluster: str, *extra: tuple[str, str]) -> dict[str, Any]:
    tags = [(TAG_CLUSTER, cluster), *extra]
    return {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags]}


def _ensure_security_group(client, cfg: ClusterConfig, ssh_source: str) -> str:
    """The cluster's group: SSH from ``ssh_source`` only, all traffic between members; reused if present."""
    name = security_group_name(cfg.cluster_name)
    try:
        group_id = client.create_security_group(
            GroupName=name, Description=f"cloister cluster {cfg.cluster_name}: SSH from ssh_cidr, members to members",
            TagSpecifications=[_tag_spec("security-group", cfg.cluster_name)])["GroupId"]
    except Exception as exc:
        if _code(exc) != "InvalidGroup.Duplicate":
            raise
        return _reuse_security_group(client, cfg, ssh_source)
    rules = [_ssh_rule(ssh_source), _members_rule(group_id), _dev_rule(client, cfg)]
    client.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[r for r in rules if r])
    return group_id


def _reuse_security_group(client, cfg: ClusterConfig, ssh_source: str) -> str:
    name = security_group_name(cfg.cluster_name)
    groups = client.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, _cluster_filter(cfg.cluster_name)])["SecurityGroups"]
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
            if _code(exc) != "InvalidPermission.Duplicate":
                raise
    return group_id


def _ensure_placement_group(client, cfg: ClusterConfig) -> None:
    """Create the cluster placement group, tagged so destroy removes it; an existing one is used as is."""
    try:
        client.create_placement_group(GroupName=cfg.placement_group, Strategy="cluster",
                                      TagSpecifications=[_tag_spec("placement-group", cfg.cluster_name)])
    except Exception as exc:
        if _code(exc) != "InvalidPlacementGroup.Duplicate":
            raise


# -- launch ----------------------------------------------------------------------------


def _run_args(cfg: ClusterConfig, *, image: dict[str, Any], role: str, count: int, token: str,
              expires: datetime | None) -> dict[str, Any]:
    """RunInstances parameters for one role; the same for the real call and the DryRun check."""
    instance_type = cfg.master_type if role == "master" else cfg.instance_type
    name = f"{cfg.cluster_name}-{role}"
    extra = [(TAG_ROLE, role)] + ([(TAG_TTL, f"{expires:%Y-%m-%dT%H:%M:%SZ}")] if expires else [])
    args: dict[str, Any] = {
        "ImageId": image["ImageId"], "InstanceType": instance_type, "MinCount": count, "MaxCount": count,
        "KeyName": cfg.key_name,
        # The same token on a retried call makes EC2 return the first call's instances instead of new ones.
        "ClientToken": f"{cfg.cluster_name}-{role[0]}-{token}",
        "TagSpecifications": [_tag_spec("instance", cfg.cluster_name, ("Name", name), *extra),
                              _tag_spec("volume", cfg.cluster_name, *extra)],
    }
    if cfg.root_size:
        args["BlockDeviceMappings"] = [{"DeviceName": image["RootDeviceName"],
                                        "Ebs": {"VolumeSize": cfg.root_size, "VolumeType": "gp3",
                                                "DeleteOnTermination": True}}]
    if expires:
        args["InstanceInitiatedShutdownBehavior"] = "terminate"
        args["UserData"] = TTL_USER_DATA.format(expires=f"{expires:%Y-%m-%dT%H:%M:%SZ}",
                                                epoch=int(expires.timestamp()))
    if cfg.placement_group:
        args["Placement"] = {"GroupName": cfg.placement_group}
    if role == "worker" and cfg.spot:
        options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if not isinstance(cfg.spot, bool):
            options["MaxPrice"] = str(cfg.spot)
        args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
    return args


def _expiry(cfg: ClusterConfig) -> datetime | None:
    seconds = cfg.ttl_seconds
    return datetime.now(timezone.utc) + timedelta(seconds=seconds) if seconds else None


def _check_complete(cfg: ClusterConfig, found: list[dict[str, Any]], nworkers: int) -> None:
    """Refuse to adopt a cluster that is stopped, lacks its master, or has other workers than asked for."""
    name = cfg.cluster_name
    stopped = [i["InstanceId"] for i in found if _state(i) in ("stopping", "stopped")]
    if stopped:
        raise ProviderError(f"ec2 cluster '{name}' exists but {len(stopped)} of its {len(found)} instances are "
                            f"stopped; run inv cluster.start (or inv cluster.destroy)", provider="ec2", cluster=name)
    masters = [i for i in found if _role(i) == "master"]
    indexes = {i.get("AmiLaunchIndex", 0) for i in found if _role(i) != "master"}
    launched = max(indexes) + 1 if indexes else 0
    missing = [f"worker-{k + 1}" for k in range(max(launched, nworkers)) if k not in indexes]
    problems = []
    if len(masters) != 1:
        problems.append("no master" if not masters else f"{len(masters)} masters")
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        problems.append("missing " + ", ".join(missing[:8]) + more)
    elif len(indexes) != nworkers:
        problems.append(f"{len(indexes)} workers, not the {nworkers} asked for")
    if problems:
        raise ProviderError(f"ec2 cluster '{name}' already exists with {len(masters)} master(s) and {len(indexes)} "
                            f"worker(s): {'; '.join(problems)}; run inv cluster.destroy --yes, then launch again",
                            provider="ec2", cluster=name)


def launch(cfg: ClusterConfig, *, nworkers: int, settings: Settings, confirm: Confirm | None = None,
           progress: Progress | None = None) -> LaunchResult:
    """Find the cluster by tag or launch it; return once every instance is running.

    After a failure or Ctrl-C that follows the first RunInstances, ``confirm`` is asked whether to
    terminate what was created (None: terminate without asking); the error is raised either way.
    """
    name = cfg.cluster_name
    with _aws(cfg):
        client = _client(cfg.region)
        found = _find(client, name)
        if found:
            _check_complete(cfg, found, nworkers)
            running = _wait_for(client, name, [i["InstanceId"] for i in found], "running", progress)
            return LaunchResult(info=_info(cfg, running, settings), created=False)
        image = _launch_image(client, cfg)
        ssh_source = _ssh_source(cfg)
        if cfg.placement_group:
            _ensure_placement_group(client, cfg)
        group_id = _ensure_security_group(client, cfg, ssh_source)
    token = secrets.token_hex(8)
    expires = _expiry(cfg)
    ids: list[str] = []
    try:
        with _aws(cfg):
            for role, count in (("master", 1), ("worker", nworkers)):
                if count:
                    args = _run_args(cfg, image=image, role=role, count=count, token=token, expires=expires)
                    reply = client.run_instances(SecurityGroupIds=[group_id], **args)
                    ids += [i["InstanceId"] for i in reply["Instances"]]
            running = _wait_for(client, name, ids, "running", progress)
    except BaseException as exc:
        abandon(cfg, exc, settings=settings, ids=ids, confirm=confirm, progress=progress)
    _forget_host_keys(settings, name)
    return LaunchResult(info=_info(cfg, running, settings), created=True)


def _confirmed(confirm: Confirm | None, question: str) -> bool:
    if confirm is None:
        return True
    try:
        return confirm(question)
    except (KeyboardInterrupt, EOFError):
        return False


def _as_error(exc: BaseException, cfg: ClusterConfig) -> CloisterError:
    if isinstance(exc, CloisterError):
        return exc
    if isinstance(exc, _botocore_errors()):
        return aws_error(exc, region=cfg.region, cluster=cfg.cluster_name)
    if isinstance(exc, KeyboardInterrupt):
        return ProviderError("interrupted (Ctrl-C)", provider="ec2", cluster=cfg.cluster_name)
    return ProviderError(f"{type(exc).__name__}: {_one_line(exc)}", provider="ec2", cluster=cfg.cluster_name)


def abandon(cfg: ClusterConfig, cause: BaseException, *, settings: Settings, ids: Iterable[str] = (),
            confirm: Confirm | None = None, progress: Progress | None = None) -> NoReturn:
    """A launch failed or was interrupted: offer to terminate what it created, then raise one clear error.

    Instances are found by tag as well as by ``ids``, so one whose RunInstances answer was lost to the
    failure is found too (tags are set at creation).
    """
    name = cfg.cluster_name
    error = _as_error(cause, cfg)
    known = list(ids)
    try:
        with _aws(cfg):
            client = _client(cfg.region)
            known += [i["InstanceId"] for i in _find(client, name) if i["InstanceId"] not in known]
            if not known:
                outcome = "no instances were created"
            elif _confirmed(confirm, f"launch of ec2 cluster '{name}' failed ({_one_line(error, 120)}); "
                                     f"terminate the {len(known)} instances it created?"):
                _teardown(client, cfg, known, settings=settings, progress=progress)
                outcome = f"terminated the {len(known)} instances it created"
            else:
                outcome = (f"left {len(known)} instances running (they terminate at their TTL); "
                           f"inv cluster.destroy --yes removes them")
    except CloisterError as cleanup:
        outcome = f"could not clean up ({_one_line(cleanup, 200)}); inv cluster.destroy --yes removes what is left"
    text = str(error)
    summary = f"launch of ec2 cluster '{name}' failed"
    message = f"{text}\n{summary}; {outcome}" if "\n" in text else f"{summary}: {text}; {outcome}"
    if isinstance(error, AwsError):
        raise AwsError(message, code=error.code, operation=error.operation, region=error.region,
                       cluster=name) from cause
    if isinstance(cause, (CloisterError, KeyboardInterrupt)):
        raise ProviderError(message, provider="ec2", cluster=name) from cause
    # A bug, not a user error: keep its traceback, with what became of the instances.
    cause.add_note(f"{summary}; {outcome}")
    raise cause


def _teardown(client, cfg: ClusterConfig, ids: list[str], *, settings: Settings,
              progress: Progress | None) -> list[str]:
    """Terminate ``ids`` and wait; then delete the cluster's security groups and its placement group."""
    messages = []
    if ids:
        client.terminate_instances(InstanceIds=ids)
        _wait_for(client, cfg.cluster_name, ids, "terminated", progress)
    groups = client.describe_security_groups(Filters=[_cluster_filter(cfg.cluster_name)])["SecurityGroups"]
    for group in groups:
        _until_free(lambda: client.delete_security_group(GroupId=group["GroupId"]), codes=("DependencyViolation",))
        messages.append(f"deleted security group {group['GroupName']} ({group['GroupId']})")
    # Only a group cloister created is tagged; one the user made stays.
    if cfg.placement_group:
        placement = client.describe_placement_groups(Filters=[_cluster_filter(cfg.cluster_name)])["PlacementGroups"]
        for pg in placement:
            _until_free(lambda: client.delete_placement_group(GroupName=pg["GroupName"]),
                        codes=("InvalidPlacementGroup.InUse",))
            messages.append(f"deleted placement group {pg['GroupName']}")
    shutil.rmtree(state_path(settings, cfg.cluster_name), ignore_errors=True)
    clear_own_servers(cfg, settings)
    return messages


# -- destroy, stop, start, status, list ------------------------------------------------------


def destroy(cfg: ClusterConfig, *, settings: Settings, confirm: Confirm | None = None,
            progress: Progress | None = None) -> list[str]:
    """Terminate the instances tagged with the cluster (after ``confirm``, if given) and delete its groups."""
    name = cfg.cluster_name
    with _aws(cfg):
        client = _client(cfg.region)
        found = _find(client, name)
        summary = _summary(found)
        if found and confirm is not None and not _confirmed(
                confirm, f"Terminate {len(found)} instances of ec2 cluster '{name}' in {cfg.region}: {summary}?"):
            raise ProviderError("not confirmed; pass --yes to destroy without asking", provider="ec2", cluster=name)
        ids = [i["InstanceId"] for i in found]
        messages = _teardown(client, cfg, ids, settings=settings, progress=progress)
    head = (f"terminated {len(ids)} instances of ec2 cluster '{name}': {summary}" if ids
            else f"no instances tagged {TAG_CLUSTER}={name} in {cfg.region}; nothing to terminate")
    return [head, *messages]


def _find_existing(client, cfg: ClusterConfig) -> list[dict[str, Any]]:
    found = _find(client, cfg.cluster_name)
    if not found:
        raise ProviderError(f"no ec2 cluster '{cfg.cluster_name}' in {cfg.region}", provider="ec2",
                            cluster=cfg.cluster_name)
    return found


def stop(cfg: ClusterConfig, *, settings: Settings, progress: Progress | None = None) -> list[str]:
    """Stop every running instance of the cluster (EBS volumes are kept) and wait until stopped."""
    name = cfg.cluster_name
    with _aws(cfg):
        client = _client(cfg.region)
        found = _find_existing(client, cfg)
        spot = [i["InstanceId"] for i in found if i.get("InstanceLifecycle") == "spot"]
        if spot:
            raise ProviderError(f"{len(spot)} instances of '{name}' are one-time spot instances, which EC2 cannot "
                                f"stop; destroy the cluster instead (or launch it without spot)",
                                provider="ec2", cluster=name)
        ids = [i["InstanceId"] for i in found if _state(i) in ("pending", "running")]
        if ids:
            client.stop_instances(InstanceIds=ids)
        _wait_for(client, name, [i["InstanceId"] for i in found], "stopped", progress)
    return [f"stopped {len(ids)} instances of ec2 cluster '{name}'" + (
        f" ({len(found) - len(ids)} were already stopped)" if len(found) > len(ids) else "")]


def start(cfg: ClusterConfig, *, settings: Settings, progress: Progress | None = None) -> ClusterInfo:
    """Start a stopped cluster and wait until it runs; its addresses change, so the result is new."""
    name = cfg.cluster_name
    with _aws(cfg):
        client = _client(cfg.region)
        found = _find_existing(client, cfg)
        now = datetime.now(timezone.utc)
        expired = [i["InstanceId"] for i in found if (left := _ttl_left(i, now)) is not None and left <= 0]
        if expired:
            raise ProviderError(f"the TTL of {len(expired)} instances of '{name}' has passed, so they would power "
                                f"off (terminate) a minute after boot; destroy the cluster and launch again",
                                provider="ec2", cluster=name)
        stopping = [i["InstanceId"] for i in found if _state(i) == "stopping"]
        if stopping:
            _wait_for(client, name, stopping, "stopped", progress)
        ids = [i["InstanceId"] for i in found if _state(i) in ("stopping", "stopped")]
        if ids:
            client.start_instances(InstanceIds=ids)
        running = _wait_for(client, name, [i["InstanceId"] for i in found], "running", progress)
    _forget_host_keys(settings, name)
    return _info(cfg, running, settings)


def _ttl_left(instance: dict[str, Any], now: datetime) -> float | None:
    expires = _tags(instance).get(TAG_TTL)
    if not expires:
        return None
    return (datetime.fromisoformat(expires.replace("Z", "+00:00")) - now).total_seconds()


def status(cfg: ClusterConfig, *, settings: Settings) -> list[dict[str, Any]]:
    """One row per instance: role, id, public host, type, state, uptime, TTL left, estimated cost so far."""
    with _aws(cfg):
        found = _find(_client(cfg.region), cfg.cluster_name)
    now = datetime.now(timezone.utc)
    rows = []
    for inst in found:
        node = _node(inst, cfg.cluster_name)
        up = (now - inst["LaunchTime"]).total_seconds() if _state(inst) == "running" else None
        rate = prices.hourly(inst["InstanceType"])
        cost = None if rate is None or up is None else rate * up / 3600
        left = _ttl_left(inst, now)
        rows.append({"role": node.role, "id": node.id, "name": node.name, "host": node.host or "-",
                     "type": inst["InstanceType"] + (" (spot)" if inst.get("InstanceLifecycle") == "spot" else ""),
                     "state": _state(inst), "uptime_s": up, "ttl_left_s": None if left is None else max(left, 0.0),
                     "cost": "-" if up is None else prices.dollars(cost), "cost_usd": cost})
    return rows


def list_clusters(cfg: ClusterConfig) -> list[dict[str, Any]]:
    """Every cloister cluster in the config's region (any name), from one DescribeInstances."""
    with _aws(cfg):
        found = _instances(_client(cfg.region), {"Name": "tag-key", "Values": [TAG_CLUSTER]}, _live_filter())
    now = datetime.now(timezone.utc)
    clusters: dict[str, list[dict[str, Any]]] = {}
    for inst in found:
        clusters.setdefault(_tags(inst)[TAG_CLUSTER], []).append(inst)
    rows = []
    for name, members in sorted(clusters.items()):
        states = Counter(_state(i) for i in members)
        lefts = [left for i in members if (left := _ttl_left(i, now)) is not None]
        rows.append({"cluster": name, "masters": sum(_role(i) == "master" for i in members),
                     "workers": sum(_role(i) != "master" for i in members),
                     "states": ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
                     "types": ", ".join(sorted({i["InstanceType"] for i in members})),
                     "age_s": max((now - i["LaunchTime"]).total_seconds() for i in members),
                     "ttl_left_s": max(min(lefts), 0.0) if lefts else None})
    return rows


# -- dry run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What ``cluster.launch`` would do, checked with EC2's DryRun; nothing was created."""

    cfg: ClusterConfig
    nworkers: int
    image: Image
    ssh_source: str
    existing: int
    ttl_expires: datetime | None
    hourly: float | None
    denied: tuple[str, ...]

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
            f"  group      {security_group_name(cfg.cluster_name)}: tcp 22 from {self.ssh_source}; "
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
                     else "  dry run    EC2 would allow every call")
        return lines


def _allowed(call: Callable[..., Any], **kwargs: Any) -> bool:
    """EC2's DryRun: answered with an error either way; DryRunOperation means it would have succeeded."""
    try:
        call(DryRun=True, **kwargs)
    except Exception as exc:
        if _code(exc) == "DryRunOperation":
            return True
        if _code(exc) == "UnauthorizedOperation":
            return False
        raise
    return True


def plan(cfg: ClusterConfig, *, nworkers: int) -> Plan:
    """Resolve everything a launch would use and check its permissions with DryRun; create nothing."""
    with _aws(cfg):
        client = _client(cfg.region)
        existing = len(_find(client, cfg.cluster_name))
        image = _launch_image(client, cfg)
        ssh_source = _ssh_source(cfg)
        expires = _expiry(cfg)
        checks: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
            "CreateSecurityGroup": (client.create_security_group,
                                    {"GroupName": security_group_name(cfg.cluster_name), "Description": "dry run"}),
            "RunInstances (master)": (client.run_instances, _run_args(
                cfg, image=image, role="master", count=1, token="dry-run", expires=expires)),
        }
        if nworkers:
            checks["RunInstances (workers)"] = (client.run_instances, _run_args(
                cfg, image=image, role="worker", count=nworkers, token="dry-run", expires=expires))
        if cfg.placement_group:
            checks["CreatePlacementGroup"] = (client.create_placement_group,
                                              {"GroupName": cfg.placement_group, "Strategy": "cluster"})
        denied = tuple(what for what, (call, kwargs) in checks.items() if not _allowed(call, **kwargs))
    return Plan(cfg=cfg, nworkers=nworkers, image=_to_image(image), ssh_source=ssh_source, existing=existing,
                ttl_expires=expires,
                hourly=prices.cluster_hourly(master_type=cfg.master_type, worker_type=cfg.instance_type,
                                             nworkers=nworkers),
                denied=denied)
