"""AMIs for ami.*: list, create from the dev instance, delete with their snapshots."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from ...config import ClusterConfig
from ...errors import ProviderError
from ...poll import Backoff, retry
from ..base import Image, Progress, no_images_error, pattern, prefix
from .aws import aws_errors, client_for, error_code, on_new
from .instances import TAG_IMAGE, TAG_OWNER, dev_instance, scope_of

IMAGE_TIMEOUT = 3600.0
SNAPSHOT_IN_USE_TIMEOUT = 300.0


def to_image(raw: dict[str, Any]) -> Image:
    snapshots = tuple(m["Ebs"]["SnapshotId"] for m in raw.get("BlockDeviceMappings", [])
                      if m.get("Ebs", {}).get("SnapshotId"))
    created = datetime.fromisoformat(raw["CreationDate"].replace("Z", "+00:00"))
    return Image(id=raw["ImageId"], name=raw.get("Name", ""), created=created, state=raw.get("State", ""),
                 snapshots=snapshots)


def describe_images(client, **kwargs: Any) -> list[dict[str, Any]]:
    return [image for page in client.get_paginator("describe_images").paginate(**kwargs) for image in page["Images"]]


def _own_images(client, cfg: ClusterConfig) -> list[dict[str, Any]]:
    raw = describe_images(client, Owners=["self"], Filters=[{"Name": "name", "Values": [pattern(cfg)]}])
    return sorted(raw, key=lambda i: (i["CreationDate"], i.get("Name", "")), reverse=True)


def list_images(cfg: ClusterConfig) -> list[Image]:
    """Own AMIs whose name starts with the prefix, newest first."""
    with aws_errors(cfg):
        return [to_image(raw) for raw in _own_images(client_for(cfg.region), cfg)]


def launch_image(client, cfg: ClusterConfig) -> dict[str, Any]:
    """The AMI to launch (``latest`` resolved), checked to be available and to fit ``root_size``."""
    if cfg.ami == "latest":
        available = [raw for raw in _own_images(client, cfg) if raw.get("State") == "available"]
        if not available:
            raise no_images_error(cfg, where=f"owned by you in {cfg.region}")
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


def create_image(cfg: ClusterConfig, *, name: str, progress: Progress | None = None, no_reboot: bool = False,
                 prepare: Callable[[], None] | None = None) -> Image:
    """Image the dev instance as ``name`` and wait until the AMI is available; ``prepare`` runs once the
    dev instance is found, before it is imaged."""
    with aws_errors(cfg):
        client = client_for(cfg.region)
        dev = dev_instance(client, cfg)
        if prepare:
            prepare()
        # The owner tag lets an account's shared policy allow ami.prune on one's own images only.
        tags = [{"Key": TAG_IMAGE, "Value": prefix(cfg)}, {"Key": TAG_OWNER, "Value": scope_of(cfg).owner}]
        image_id = client.create_image(
            InstanceId=dev["InstanceId"], Name=name, Description=f"cloister image of {cfg.ami_instance_ip}",
            NoReboot=no_reboot,
            TagSpecifications=[{"ResourceType": "image", "Tags": tags}, {"ResourceType": "snapshot", "Tags": tags}],
        )["ImageId"]
        backoff = Backoff(IMAGE_TIMEOUT, initial=2.0, maximum=15.0, factor=1.5)
        while True:
            raw = on_new(lambda: client.describe_images(ImageIds=[image_id]))["Images"][0]
            if progress:
                progress(f"{name} ({image_id}): {raw['State']}", int(raw["State"] == "available"), 1)
            if raw["State"] == "available":
                return to_image(raw)
            if raw["State"] in ("failed", "invalid", "deregistered", "error"):
                reason = (raw.get("StateReason") or {}).get("Message", "no reason given")
                raise ProviderError(f"image {name} ({image_id}) {raw['State']}: {reason}",
                                    provider="ec2", cluster=cfg.cluster_name)
            if not backoff.wait():
                raise ProviderError(f"image {name} ({image_id}) still {raw['State']} after {IMAGE_TIMEOUT:.0f}s; "
                                    f"inv ami.list shows when it is ready", provider="ec2", cluster=cfg.cluster_name)


def _delete_snapshot(client, snapshot: str) -> None:
    # Right after DeregisterImage, EC2 often still counts the snapshot as used by the image for a while.
    retry(lambda: client.delete_snapshot(SnapshotId=snapshot),
          transient=lambda exc: error_code(exc) == "InvalidSnapshot.InUse", timeout=SNAPSHOT_IN_USE_TIMEOUT)


def _orphan_snapshots(client, cfg: ClusterConfig) -> list[str]:
    """Snapshots cloister tagged for this prefix that no own image uses anymore (a prune that failed half-way)."""
    pages = client.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{TAG_IMAGE}", "Values": [prefix(cfg)]}])
    tagged = [snapshot for page in pages for snapshot in page["Snapshots"]]
    used = {m["Ebs"]["SnapshotId"] for raw in describe_images(client, Owners=["self"])
            for m in raw.get("BlockDeviceMappings", []) if m.get("Ebs", {}).get("SnapshotId")}
    return sorted(s["SnapshotId"] for s in tagged if s["SnapshotId"] not in used)


def delete_images(cfg: ClusterConfig, *, doomed: list[Image]) -> list[str]:
    """Deregister each AMI, then delete its snapshots (deregistering leaves them, and they cost money);
    then delete snapshots of earlier prunes that were left behind."""
    messages = []
    with aws_errors(cfg):
        client = client_for(cfg.region)
        for image in doomed:
            client.deregister_image(ImageId=image.id)
            for snapshot in image.snapshots:
                _delete_snapshot(client, snapshot)
            messages.append(f"deregistered {image.name} ({image.id})"
                            + (f" and deleted {', '.join(image.snapshots)}" if image.snapshots else ""))
        for snapshot in _orphan_snapshots(client, cfg):
            _delete_snapshot(client, snapshot)
            messages.append(f"deleted {snapshot}, a snapshot of a '{prefix(cfg)}' image no image uses anymore")
    return messages

