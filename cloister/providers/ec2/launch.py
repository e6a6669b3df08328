"""Launch a cluster (or adopt the running one) and give up cleanly on a failed launch."""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn

from ...config import ClusterConfig
from ...errors import AwsError, CloisterError, ProviderError
from ...interrupts import shielded
from ...settings import Settings
from ..base import Confirm, Launched, Progress
from . import preflight, swap, ttl
from .aws import CAPACITY_CODES, aws_error, aws_errors, botocore_errors, client_for, error_code, on_new, one_line
from .images import launch_image
from .instances import (TAG_ROLE, TAG_TTL, Scope, cluster_info, find, forget_host_keys, role_of, scope_of,
                        refuse_unfound, state_of, state_path, wait_for, worker_number)
from .network import (Subnet, allowed_ssh_source, ensure_placement_group, ensure_security_group,
                      release_launch_lock, until_free)
from .zones import launch_subnets

log = logging.getLogger("cloister.ec2")
# Burstable families whose CPU credits the config decides (EC2's default for t3/t3a/t4g is unlimited,
# which bills a busy benchmark for surplus credits).
BURSTABLE = ("t2", "t3", "t3a", "t4g")


def run_args(cfg: ClusterConfig, scope: Scope, *, image: dict[str, Any], role: str, count: int, token: str,
             expires: datetime | None, subnet: Subnet) -> dict[str, Any]:
    """RunInstances parameters for one role; the same for the real call and the DryRun check."""
    instance_type = cfg.master_type if role == "master" else cfg.instance_type
    name = f"{cfg.cluster_name}-{role}"
    extra = [(TAG_ROLE, role)] + ([(TAG_TTL, f"{expires:%Y-%m-%dT%H:%M:%SZ}")] if expires else [])
    args: dict[str, Any] = {
        "ImageId": image["ImageId"], "InstanceType": instance_type, "MinCount": count, "MaxCount": count,
        "KeyName": cfg.key_name,
        # The same token on a retried call makes EC2 return the first call's instances instead of new ones.
        "ClientToken": f"{cfg.cluster_name}-{role[0]}-{token}",
        "SubnetId": subnet.id,
        # IMDSv2 only: a token-less metadata request (SSRF from a benchmark's web server) gets nothing.
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [scope.tag_spec("instance", ("Name", name), *extra), scope.tag_spec("volume", *extra)],
    }
    mappings = _volumes(cfg, image)
    if mappings:
        args["BlockDeviceMappings"] = mappings
    boot: list[tuple[str, str]] = []
    if expires:
        args["InstanceInitiatedShutdownBehavior"] = "terminate"
        boot.append((f"power off at the cluster's TTL ({expires:%Y-%m-%dT%H:%M:%SZ}); the instance was launched "
                     f"with InstanceInitiatedShutdownBehavior=terminate, so powering off terminates it",
                     ttl.boot_command(epoch=int(expires.timestamp()))))
    if role == "master" and cfg.swap_size:
        args.setdefault("BlockDeviceMappings", []).append(swap.volume(cfg.swap_size))
        boot.append((f"make the {cfg.swap_size} GiB volume {swap.DEVICE} swap and enable it",
                     swap.boot_command(cfg.swap_size)))
    if boot:
        args["UserData"] = cloud_config(boot)
    if cfg.placement_group:
        args["Placement"] = {"GroupName": cfg.placement_group}
    if instance_type.split(".")[0] in BURSTABLE:
        args["CreditSpecification"] = {"CpuCredits": cfg.cpu_credits}
    if role == "worker" and cfg.spot:
        # A one-time spot instance can never be started again: one that powers itself off (a shutdown on
        # the node, with ttl 0 too) must not linger stopped, billing its disk.
        args["InstanceInitiatedShutdownBehavior"] = "terminate"
        options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if not isinstance(cfg.spot, bool):
            options["MaxPrice"] = str(cfg.spot)
        args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
    return args


def cloud_config(boot: list[tuple[str, str]]) -> str:
    """User data: a cloud-config whose ``bootcmd`` runs each (why, script) at every boot, in order."""
    lines = ["#cloud-config"] + [f"# cloister: {why}" for why, _ in boot] + ["bootcmd:"]
    for _, script in boot:
        lines.append("  - |")
        lines += [f"    {line}" if line else "" for line in script.rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def _volumes(cfg: ClusterConfig, image: dict[str, Any]) -> list[dict[str, Any]]:
    """Every EBS volume of the image ends with its instance (an image's extra volume would otherwise
    outlive a terminated node and bill); the root gets ``root_size``."""
    mappings = []
    for mapping in image.get("BlockDeviceMappings", []):
        if "Ebs" not in mapping:
            continue
        # Restating the image's own snapshot and size keeps the override a full mapping.
        ebs: dict[str, Any] = {k: mapping["Ebs"][k] for k in ("SnapshotId", "VolumeSize", "VolumeType")
                               if mapping["Ebs"].get(k)}
        ebs["DeleteOnTermination"] = True
        if mapping["DeviceName"] == image.get("RootDeviceName") and cfg.root_size:
            ebs.update(VolumeSize=cfg.root_size, VolumeType="gp3")
        mappings.append({"DeviceName": mapping["DeviceName"], "Ebs": ebs})
    if cfg.root_size and not any(m["DeviceName"] == image.get("RootDeviceName") for m in mappings):
        mappings.append({"DeviceName": image["RootDeviceName"],
                         "Ebs": {"VolumeSize": cfg.root_size, "VolumeType": "gp3", "DeleteOnTermination": True}})
    return mappings


def expiry(cfg: ClusterConfig) -> datetime | None:
    seconds = cfg.ttl_seconds
    return datetime.now(timezone.utc) + timedelta(seconds=seconds) if seconds else None


def _check_complete(cfg: ClusterConfig, found: list[dict[str, Any]], nworkers: int) -> None:
    """Refuse to adopt a cluster that is stopped, lacks its master, or has other workers than asked for."""
    name = cfg.cluster_name
    stopped = [i["InstanceId"] for i in found if state_of(i) in ("stopping", "stopped")]
    if stopped:
        raise ProviderError(f"ec2 cluster '{name}' exists but {len(stopped)} of its {len(found)} instances are "
                            f"stopped; run inv cluster.start (or inv cluster.destroy)", provider="ec2", cluster=name)
    masters = [i for i in found if role_of(i) == "master"]
    indexes = {worker_number(i) - 1 for i in found if role_of(i) != "master"}
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
        fix = ("inv cluster.repair replaces missing workers" if missing and len(masters) == 1 else
               f"inv cluster.resize --nworkers {nworkers} changes its size" if len(masters) == 1 else
               "run inv cluster.destroy --yes, then launch again")
        raise ProviderError(f"ec2 cluster '{name}' already exists with {len(masters)} master(s) and {len(indexes)} "
                            f"worker(s): {'; '.join(problems)}; {fix}", provider="ec2", cluster=name)


def launch(cfg: ClusterConfig, *, nworkers: int, settings: Settings, confirm: Confirm | None = None,
           progress: Progress | None = None) -> Launched:
    """Find the cluster by tag or launch it; return once every instance is running.

    After a failure or Ctrl-C that follows the creation of the security group, ``confirm`` is asked
    whether to terminate what was created (None: terminate without asking); the error is raised either way.
    """
    name = cfg.cluster_name
    with aws_errors(cfg):
        client = client_for(cfg.region)
        scope = scope_of(cfg)
        found = find(client, scope)
        refuse_unfound(client, cfg, settings, found, owner=scope.owner, doing="nothing was launched")
        if found:
            _check_complete(cfg, found, nworkers)
            running = wait_for(client, name, [i["InstanceId"] for i in found], "running", progress)
            return Launched(info=cluster_info(cfg, running, settings), created=False)
        image = launch_image(client, cfg)
        ssh_source = allowed_ssh_source(cfg)
        subnets = launch_subnets(client, cfg)
        checked = preflight.check(client, cfg, image=image, nworkers=nworkers)
        if checked.failures:
            raise ProviderError(f"launch of ec2 cluster '{name}' would fail, nothing was created: "
                                + "; ".join(checked.failures), provider="ec2", cluster=name)
        if cfg.placement_group:
            ensure_placement_group(client, cfg, scope)
        group_id, group_created = ensure_security_group(client, cfg, scope, ssh_source=ssh_source,
                                                        vpc=subnets[0].vpc)
    expires = expiry(cfg)
    ids: list[str] = []
    try:
        with aws_errors(cfg):
            running = _launch_in_zones(client, cfg, scope, subnets, image=image, group_id=group_id,
                                       nworkers=nworkers, expires=expires, ids=ids, progress=progress)
            release_launch_lock(client, group_id)
    except BaseException as exc:
        abandon(cfg, exc, settings=settings, ids=ids, confirm=confirm, progress=progress,
                lock=(group_id, group_created))
    forget_host_keys(settings, cfg)
    return Launched(info=cluster_info(cfg, running, settings), created=True)


def _launch_in_zones(client, cfg: ClusterConfig, scope: Scope, subnets: list[Subnet], *, image: dict[str, Any],
                     group_id: str, nworkers: int, expires: datetime | None, ids: list[str],
                     progress: Progress | None) -> list[dict[str, Any]]:
    """Launch the whole cluster in the first zone that has capacity; ``ids`` holds what exists meanwhile.

    A zone without capacity for any node gets the cluster's instances there terminated, and the whole
    cluster is tried in the next zone (all nodes stay in one zone)."""
    for n, subnet in enumerate(subnets):
        token = secrets.token_hex(8)
        try:
            for role, count in (("master", 1), ("worker", nworkers)):
                if count:
                    args = run_args(cfg, scope, image=image, role=role, count=count, token=token, expires=expires,
                                    subnet=subnet)
                    # A just-created security group may be unknown to RunInstances for a while.
                    reply = on_new(lambda: client.run_instances(SecurityGroupIds=[group_id], **args),
                                   codes=("InvalidGroup.NotFound",))
                    ids += [i["InstanceId"] for i in reply["Instances"]]
            return wait_for(client, cfg.cluster_name, ids, "running", progress)
        except botocore_errors() as exc:
            code = error_code(exc)
            if code not in CAPACITY_CODES:
                raise
            if n + 1 == len(subnets):
                raise _no_capacity(cfg, subnets, exc) from None
            _terminate(client, cfg, list(ids), progress)
            log.warning("%s: no capacity in %s (%s); %slaunching the whole cluster in %s", cfg.cluster_name,
                        subnet.zone, code, f"terminated the {len(ids)} instances launched there and " if ids else "",
                        subnets[n + 1].zone)
            ids.clear()
    raise AssertionError("unreachable: launch_subnets returns at least one subnet")


def _no_capacity(cfg: ClusterConfig, subnets: list[Subnet], exc: Exception) -> AwsError:
    said = one_line(getattr(exc, "response", {}).get("Error", {}).get("Message", ""), 160)
    if cfg.subnet_id or cfg.availability_zone:
        key = "subnet_id" if cfg.subnet_id else "availability_zone"
        todo = (f"retry later, or drop {key} from {cfg.source} so that cloister tries every zone that offers "
                f"the types")
        where = f"{subnets[0].zone}, the zone {key} names"
    else:
        todo = "retry in a few minutes, or choose other instance types"
        where = "any zone that offers the types (" + ", ".join(s.zone for s in subnets) + ")"
    return AwsError(f"no capacity for the cluster in {where} ({error_code(exc)}: {said}); {todo}",
                    code=error_code(exc) or "", operation="RunInstances", region=cfg.region, cluster=cfg.cluster_name)


def _terminate(client, cfg: ClusterConfig, ids: list[str], progress: Progress | None) -> None:
    if ids:
        # A just-launched instance may be unknown to TerminateInstances for a while; that does not mean gone.
        on_new(lambda: client.terminate_instances(InstanceIds=ids))
        wait_for(client, cfg.cluster_name, ids, "terminated", progress)


def confirmed(confirm: Confirm | None, question: str) -> bool:
    if confirm is None:
        return True
    try:
        return confirm(question)
    except (KeyboardInterrupt, EOFError):
        return False


def as_error(exc: BaseException, cfg: ClusterConfig) -> CloisterError:
    if isinstance(exc, CloisterError):
        return exc
    if isinstance(exc, botocore_errors()):
        return aws_error(exc, region=cfg.region, cluster=cfg.cluster_name)
    if isinstance(exc, KeyboardInterrupt):
        return ProviderError("interrupted (Ctrl-C)", provider="ec2", cluster=cfg.cluster_name)
    return ProviderError(f"{type(exc).__name__}: {one_line(exc)}", provider="ec2", cluster=cfg.cluster_name)


def abandon(cfg: ClusterConfig, cause: BaseException, *, settings: Settings, ids: Iterable[str] = (),
            confirm: Confirm | None = None, progress: Progress | None = None,
            lock: tuple[str, bool] | None = None) -> NoReturn:
    """A launch failed or was interrupted: offer to terminate what it created, then raise one clear error.

    Instances are found by tag as well as by ``ids``, so one whose RunInstances answer was lost to the
    failure is found too (tags are set at creation). ``lock`` is the security group the launch locked
    and whether it created it: a group it created for instances that never came is deleted.
    """
    name = cfg.cluster_name
    error = as_error(cause, cfg)
    known = list(ids)
    try:
        with aws_errors(cfg):
            client = client_for(cfg.region)
            known += [i["InstanceId"] for i in find(client, scope_of(cfg)) if i["InstanceId"] not in known]
            if not known:
                outcome = "no instances were created" + _drop_group(client, lock)
            elif confirmed(confirm, f"launch of ec2 cluster '{name}' failed ({one_line(error, 120)}); "
                                     f"terminate the {len(known)} instances it created?"):
                with shielded():  # asked first; once the answer is yes, a second Ctrl-C must not cut it short
                    teardown(client, cfg, known, settings=settings, progress=progress)
                outcome = f"terminated the {len(known)} instances it created"
            else:
                outcome = (f"left {len(known)} instances running (they terminate at their TTL); "
                           f"inv cluster.destroy --yes removes them")
    except CloisterError as cleanup:
        outcome = f"could not clean up ({one_line(cleanup, 200)}); inv cluster.destroy --yes removes what is left"
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


def _drop_group(client, lock: tuple[str, bool] | None) -> str:
    """After a launch that created no instance: delete the group it created, unlock one it reused."""
    if lock is None:
        return ""
    group_id, created = lock
    if created:
        until_free(lambda: on_new(lambda: client.delete_security_group(GroupId=group_id)),
                   codes=("DependencyViolation",))
        return f"; deleted the security group it created ({group_id})"
    release_launch_lock(client, group_id)
    return ""


def teardown(client, cfg: ClusterConfig, ids: list[str], *, settings: Settings,
             progress: Progress | None) -> list[str]:
    """Terminate ``ids`` and wait; then delete the cluster's security groups and its placement group."""
    messages = []
    _terminate(client, cfg, ids, progress)
    scope = scope_of(cfg)
    groups = client.describe_security_groups(Filters=scope.filters())["SecurityGroups"]
    for group in groups:
        until_free(lambda: client.delete_security_group(GroupId=group["GroupId"]), codes=("DependencyViolation",))
        messages.append(f"deleted security group {group['GroupName']} ({group['GroupId']})")
    # Only a group cloister created is tagged; one the user made stays.
    if cfg.placement_group:
        placement = client.describe_placement_groups(Filters=scope.filters())["PlacementGroups"]
        for pg in placement:
            until_free(lambda: client.delete_placement_group(GroupName=pg["GroupName"]),
                        codes=("InvalidPlacementGroup.InUse",))
            messages.append(f"deleted placement group {pg['GroupName']}")
    shutil.rmtree(state_path(settings, cfg), ignore_errors=True)
    return messages

