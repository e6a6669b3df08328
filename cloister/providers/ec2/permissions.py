"""The IAM permissions cloister needs, in one list: the README's policy is this list, and the dry run
checks each action with EC2's DryRun (destroy's too), so a missing permission shows before a launch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .aws import error_code

# Every EC2 action the code calls, and what for.
EC2_ACTIONS: dict[str, str] = {
    "DescribeInstances": "find a cluster's instances by tag, poll their states",
    "DescribeImages": "resolve the AMI, list images for ami.*",
    "DescribeSubnets": "pick the one subnet and zone of the cluster",
    "DescribeSecurityGroups": "find the cluster's group for reuse and destroy",
    "DescribePlacementGroups": "find the placement group cloister created",
    "DescribeSnapshots": "find snapshots that ami.prune left behind",
    "DescribeSpotPriceHistory": "price spot workers",
    "DescribeVolumes": "price a cluster's disks (cluster.status, the budget of exp.sweep)",
    "GetConsoleOutput": "tell a boot that hangs from a node that booted but SSH cannot reach",
    "RunInstances": "launch the master and the workers",
    "CreateTags": "tag everything at creation; move a TTL; lock a launch",
    "DeleteTags": "release the launch lock",
    "CreateSecurityGroup": "one group per cluster",
    "AuthorizeSecurityGroupIngress": "SSH from ssh_cidr, all traffic between members",
    "RevokeSecurityGroupIngress": "drop an earlier launch's SSH source",
    "DeleteSecurityGroup": "destroy",
    "CreatePlacementGroup": "placement_group",
    "DeletePlacementGroup": "destroy",
    "TerminateInstances": "destroy, a failed launch, the reaping of expired stopped clusters",
    "StopInstances": "cluster.stop",
    "StartInstances": "cluster.start",
    "CreateImage": "ami.create",
    "DeregisterImage": "ami.prune",
    "DeleteSnapshot": "ami.prune",
    "DescribeInstanceTypeOfferings": "choose a zone that offers both instance types",
    "DescribeInstanceTypes": "check each type runs the AMI's architecture; its vCPUs against the quotas",
    "DescribeKeyPairs": "check the key pair exists before a launch",
}
# The first spot launch in an account creates EC2's spot service-linked role (and no other role).
SPOT_ROLE = {"Effect": "Allow", "Action": "iam:CreateServiceLinkedRole", "Resource": "*",
             "Condition": {"StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}}}
# Service Quotas answers the vCPU quotas a launch is checked against (it has no resources to limit).
QUOTAS = {"Effect": "Allow", "Action": "servicequotas:GetServiceQuota", "Resource": "*"}
# What no IAM policy can limit to some resources: descriptions, and the price history.
READ_ONLY = tuple(a for a in EC2_ACTIONS if a.startswith("Describe"))
# Calls that create: allowed when the request tags what it creates with the caller's own owner tag.
CREATING = {"RunInstances": ("instance", "volume"), "CreateSecurityGroup": ("security-group",),
            "CreatePlacementGroup": ("placement-group",), "CreateImage": ("image", "snapshot")}
# Calls on what exists: allowed on resources that carry the caller's owner tag.
OWNED = ("TerminateInstances", "StopInstances", "StartInstances", "GetConsoleOutput", "CreateTags",
         "DeleteTags", "AuthorizeSecurityGroupIngress", "RevokeSecurityGroupIngress", "DeleteSecurityGroup",
         "DeletePlacementGroup", "DeregisterImage", "DeleteSnapshot")
OWNER_TAG = "cloister:owner"
# The owner tag's value for IAM users and for roles assumed with botocore's own session names (cloister
# then tags with the role's ARN); anyone else puts the owner `inv cluster.launch --dry-run` prints.
PRINCIPAL = "${aws:PrincipalArn}"
# A resource id that exists nowhere, for checks that need one; a NotFound answer cannot tell.
NO_INSTANCE = "i-0000000000000000f"
NOT_CHECKABLE = ("NotFound", "Malformed", "InvalidParameter", "MissingParameter")


def policy() -> dict[str, Any]:
    """The minimal IAM policy, as the README shows it."""
    actions = [f"ec2:{a}" for a in EC2_ACTIONS]
    return {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"},
                                                    QUOTAS, SPOT_ROLE]}


def shared_policy(owner: str = PRINCIPAL) -> dict[str, Any]:
    """The policy for an account several people share: each may create only what is tagged as theirs,
    and change or end only what carries their owner tag (and never move that tag)."""
    ec2 = "arn:aws:ec2:*:*:"
    created = sorted({kind for kinds in CREATING.values() for kind in kinds})
    statements: list[dict[str, Any]] = [
        {"Sid": "Look", "Effect": "Allow", "Action": [f"ec2:{a}" for a in READ_ONLY], "Resource": "*"},
        {"Sid": "CreateTaggedAsMine", "Effect": "Allow", "Action": [f"ec2:{a}" for a in CREATING],
         "Resource": [f"{ec2}{kind}/*" for kind in created],
         "Condition": {"StringEquals": {f"aws:RequestTag/{OWNER_TAG}": owner}}},
        # What a creation only uses (the AMI, the subnet, the key pair, the group it joins, the dev
        # instance that is imaged) is not created and carries no tag of this owner.
        {"Sid": "UseWhatItNeeds", "Effect": "Allow", "Action": [f"ec2:{a}" for a in CREATING],
         "NotResource": [f"{ec2}{kind}/*" for kind in created]},
        {"Sid": "TagAtCreation", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "*",
         "Condition": {"StringEquals": {"ec2:CreateAction": list(CREATING)}}},
        {"Sid": "ChangeOnlyMine", "Effect": "Allow", "Action": [f"ec2:{a}" for a in OWNED], "Resource": "*",
         "Condition": {"StringEquals": {f"aws:ResourceTag/{OWNER_TAG}": owner}}},
        {"Sid": "NeverMoveTheOwnerTag", "Effect": "Deny", "Action": ["ec2:CreateTags", "ec2:DeleteTags"],
         "Resource": "*", "Condition": {"ForAnyValue:StringEquals": {"aws:TagKeys": [OWNER_TAG]},
                                        "Null": {"ec2:CreateAction": "true"}}},
        QUOTAS,
        SPOT_ROLE,
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def policy_actions(document: dict[str, Any]) -> set[str]:
    """Every action a policy document allows somewhere."""
    found: set[str] = set()
    for statement in document["Statement"]:
        if statement["Effect"] == "Allow":
            action = statement["Action"]
            found.update([action] if isinstance(action, str) else action)
    return found


def policy_json() -> str:
    return json.dumps(policy(), indent=2)


def allowed(call: Callable[..., Any], *, strict: bool = False, **kwargs: Any) -> bool | None:
    """EC2's DryRun: True (DryRunOperation), False (UnauthorizedOperation), None when EC2 answered that the
    arguments themselves are wrong, which a made-up resource id may cause before permissions are checked.
    ``strict``: the arguments are the launch's own, so such an answer is raised (the launch would fail)."""
    try:
        call(DryRun=True, **kwargs)
    except Exception as exc:
        code = error_code(exc) or ""
        if code == "DryRunOperation":
            return True
        if code == "UnauthorizedOperation":
            return False
        if not strict and any(part in code for part in NOT_CHECKABLE):
            return None
        raise
    return True


def lifecycle_checks(client, *, instance: str, group: str,
                     owner: dict[str, str]) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """The calls of a cluster's life after launch (stop, start, extend, destroy), on one of its instances;
    ``owner`` is the owner tag that creations carry."""
    tag = [{"Key": "cloister:dry-run", "Value": "1"}]
    owned = [{"Key": owner["Key"], "Value": owner["Value"]}]
    return {
        "DescribeInstances": (client.describe_instances, {}),
        "DescribeImages": (client.describe_images, {"Owners": ["self"]}),
        "DescribeSubnets": (client.describe_subnets, {}),
        "DescribeSecurityGroups": (client.describe_security_groups, {}),
        "DescribeSnapshots": (client.describe_snapshots, {"OwnerIds": ["self"], "Filters": [
            {"Name": "tag-key", "Values": ["cloister:ami-tag"]}]}),
        # Narrow arguments: an endpoint that ignores DryRun (moto) then answers quickly.
        "DescribeSpotPriceHistory": (client.describe_spot_price_history,
                                     {"MaxResults": 5, "InstanceTypes": ["t3.micro"], "StartTime": "2020-01-01"}),
        "DescribeVolumes": (client.describe_volumes, {"MaxResults": 5}),
        "GetConsoleOutput": (client.get_console_output, {"InstanceId": instance}),
        "DescribeInstanceTypeOfferings": (client.describe_instance_type_offerings, {
            "Filters": [{"Name": "instance-type", "Values": ["t3.micro"]}]}),
        "DescribeInstanceTypes": (client.describe_instance_types, {"InstanceTypes": ["t3.micro"]}),
        "DescribeKeyPairs": (client.describe_key_pairs, {}),
        "CreateTags": (client.create_tags, {"Resources": [instance], "Tags": tag}),
        "DeleteTags": (client.delete_tags, {"Resources": [instance], "Tags": tag}),
        "StopInstances": (client.stop_instances, {"InstanceIds": [instance]}),
        "StartInstances": (client.start_instances, {"InstanceIds": [instance]}),
        "TerminateInstances": (client.terminate_instances, {"InstanceIds": [instance]}),
        "RevokeSecurityGroupIngress": (client.revoke_security_group_ingress, {
            "GroupId": group, "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                                 "IpRanges": [{"CidrIp": "192.0.2.1/32"}]}]}),
        "DeleteSecurityGroup": (client.delete_security_group, {"GroupId": group}),
        "CreateImage": (client.create_image, {"InstanceId": instance, "Name": "cloister-dry-run", "TagSpecifications": [
            {"ResourceType": "image", "Tags": owned}, {"ResourceType": "snapshot", "Tags": owned}]}),
        "DeregisterImage": (client.deregister_image, {"ImageId": "ami-0000000000000000f"}),
        "DeleteSnapshot": (client.delete_snapshot, {"SnapshotId": "snap-0000000000000000f"}),
    }
