"""The EC2 provider against a moto EC2 server over HTTP (issue 5).

What moto lacks (placement groups, ClientToken idempotency, capacity, quota and throttling errors) is
injected with botocore ``before-send`` handlers registered first on boto3's default session; the
product code has no test-only paths. Nothing here reaches a public endpoint: every AWS variable
points at the local server and ``ssh_cidr`` is always explicit.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import yaml

import moto_server as ms  # before anything imports moto
from cloister.cluster import lifecycle as lib
from cloister.cluster import budget, images
from cloister.transport import hosts
from cloister.providers.ec2 import aws as ec2_aws
from cloister.providers.ec2 import launch as ec2_launch
from cloister.providers.ec2 import Ec2Images
from cloister.providers.ec2 import console as ec2_console
from cloister.providers.ec2 import permissions as ec2_permissions
from cloister.providers.ec2 import ttl as ec2_ttl
from cloister.settings import Settings
from cloister.config import load_config
from cloister.errors import AwsError, CloisterError, ExperimentError, HostsFailed, ProviderError
from cloister.cluster.servers import read_servers

from conftest import REPO, run_inv

SSH_CIDR = "198.51.100.7/32"


@pytest.fixture(scope="module")
def moto():
    server = ms.MotoEc2()
    saved = dict(os.environ)
    env = ms.aws_env(server.url)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


@pytest.fixture(scope="module")
def arrange(moto):
    """A boto3 client of its own for arranging and checking state."""
    return ms.client()


@pytest.fixture
def aws(moto, arrange):
    """A fresh moto account with key pair 'alice'; ``inject`` sees every request cloister sends."""
    moto.reset()
    client = arrange
    ms.seed(client)
    inject = ms.Injector()
    try:
        yield client, inject
    finally:
        inject.close()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(servers_dir=str(tmp_path / "servers"), state_dir=str(tmp_path / "state"),
                    connect_timeout=0.5, ssh_timeout=1.0)


@pytest.fixture
def key_file(tmp_path) -> Path:
    key = tmp_path / "alice.pem"
    key.write_text("not a real key\n")
    key.chmod(0o600)
    return key


@pytest.fixture
def make_cfg(tmp_path, key_file):
    """Write a cluster config (explicit ssh_cidr) and load it as a task would."""

    def make(**overrides):
        data = {"cluster_name": "t1", "provider": "ec2", "region": ms.REGION, "ami": ms.UBUNTU_AMI,
                "key_name": "alice", "ssh_key": str(key_file), "nworkers": 2, "instance_type": "m5.large",
                "ssh_cidr": SSH_CIDR, "ttl": "2h", **overrides}
        path = tmp_path / f"{data['cluster_name']}.json"
        path.write_text(json.dumps(data))
        return load_config(path)

    return make


def instances(client, *filters) -> list[dict]:
    pages = client.get_paginator("describe_instances").paginate(Filters=list(filters))
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def live(client, cluster: str | None = None) -> list[dict]:
    filters = [{"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
    if cluster:
        filters.append({"Name": "tag:cloister:cluster", "Values": [cluster]})
    return instances(client, *filters)


def tags(instance) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def cluster_groups(client, cluster: str) -> list[dict]:
    return client.describe_security_groups(
        Filters=[{"Name": "tag:cloister:cluster", "Values": [cluster]}])["SecurityGroups"]


def world_open(group) -> list[tuple]:
    """(protocol, from, to) of every ingress rule open to 0.0.0.0/0 or ::/0."""
    return [(p["IpProtocol"], p.get("FromPort"), p.get("ToPort")) for p in group["IpPermissions"]
            if any(r["CidrIp"] == "0.0.0.0/0" for r in p.get("IpRanges", []))
            or any(r["CidrIpv6"] == "::/0" for r in p.get("Ipv6Ranges", []))]


def run_instance(client, **tagged) -> str:
    """An instance cloister did not launch (optionally with tags)."""
    kwargs = {}
    if tagged:
        kwargs["TagSpecifications"] = [{"ResourceType": "instance",
                                        "Tags": [{"Key": k, "Value": v} for k, v in tagged.items()]}]
    return client.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                                **kwargs)["Instances"][0]["InstanceId"]


def make_image(client, name: str, source: str | None = None) -> str:
    return client.create_image(InstanceId=source or run_instance(client), Name=name)["ImageId"]


# What moto's STS answers for any credentials: the owner every test cluster is tagged with.
OWNER = "arn:aws:sts::123456789012:user/moto"


def scheduled_poweroff(boot_command: str, tmp_path: Path) -> int:
    """Run a bootcmd entry as cloud-init would (sh) with systemd-run (and systemctl) replaced by recorders;
    return the seconds asked. The timer must stay out of boot's way: no default dependencies, no waiting."""
    for tool in ("systemd-run", "systemctl"):
        stub = tmp_path / "bin" / tool
        stub.parent.mkdir(exist_ok=True)
        stub.write_text(f'#!/bin/sh\n[ {tool} = systemd-run ] && echo "$@"\nexit 0\n')
        stub.chmod(0o755)
    # The expiry file goes to a folder of the test's, not this machine's /var/lib.
    boot_command = boot_command.replace(ec2_ttl.EXPIRY_FILE.rsplit("/", 1)[0], str(tmp_path / "var"))
    ran = subprocess.run(["sh", "-c", boot_command], capture_output=True, text=True, timeout=10,
                         env={**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "INSTANCE_ID": "i-1"})
    assert (tmp_path / "var" / "ttl-expires").read_text().split()[0] == "i-1"
    args = ran.stdout.split()
    assert ran.returncode == 0 and args[-2:] == ["/bin/systemctl", "poweroff"], ran
    assert {"--unit=cloister-ttl", "--no-block", "--timer-property=DefaultDependencies=no",
            "--timer-property=AccuracySec=1s"} <= set(args), args
    (active,) = [a for a in args if a.startswith("--on-active=")]
    return int(active.removeprefix("--on-active="))


# -- launch ---------------------------------------------------------------------------


def test_launch_1_plus_8_tags_rules_ttl_and_servers(aws, make_cfg, settings, tmp_path):
    client, inject = aws
    cfg = make_cfg(nworkers=8, master_instance_type="m5.xlarge", root_size=60)
    polls = []
    result = lib.launch(cfg, settings=settings, wait=False, progress=lambda *a: polls.append(a))
    assert result.created
    found = live(client, "t1")
    assert len(found) == 9 and all(i["State"]["Name"] == "running" for i in found)
    masters = [i for i in found if tags(i)["cloister:role"] == "master"]
    workers = [i for i in found if tags(i)["cloister:role"] == "worker"]
    assert len(masters) == 1 and len(workers) == 8
    assert masters[0]["InstanceType"] == "m5.xlarge" and {w["InstanceType"] for w in workers} == {"m5.large"}
    assert tags(masters[0])["Name"] == "t1-master" and {tags(w)["Name"] for w in workers} == {"t1-worker"}
    expires = {tags(i)["cloister:ttl-expires"] for i in found}
    assert len(expires) == 1
    left = time.mktime(time.strptime(expires.pop(), "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())
    assert 7000 < left <= 7200
    attribute = client.describe_instance_attribute(InstanceId=workers[0]["InstanceId"],
                                                   Attribute="instanceInitiatedShutdownBehavior")
    assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    user_data = client.describe_instance_attribute(InstanceId=masters[0]["InstanceId"], Attribute="userData")
    cloud_config = base64.b64decode(user_data["UserData"]["Value"]).decode()
    assert cloud_config.startswith("#cloud-config\n")
    (boot,) = yaml.safe_load(cloud_config)["bootcmd"]
    assert scheduled_poweroff(boot, tmp_path) in range(7000, 7201)
    volumes = client.describe_volumes(Filters=[{"Name": "tag:cloister:cluster", "Values": ["t1"]}])["Volumes"]
    assert len(volumes) == 9 and {v["Size"] for v in volumes} == {60}

    # One security group: SSH from ssh_cidr only, everything between members, nothing open to the world.
    (group,) = cluster_groups(client, "t1")
    assert re.fullmatch(r"cloister-t1-[0-9a-f]{8}", group["GroupName"]), group["GroupName"]  # owner hash
    assert {g["GroupId"] for i in found for g in i["SecurityGroups"]} == {group["GroupId"]}
    rules = {(p["IpProtocol"], p.get("FromPort")): p for p in group["IpPermissions"]}
    assert set(rules) == {("tcp", 22), ("-1", None)}
    assert [r["CidrIp"] for r in rules["tcp", 22]["IpRanges"]] == [SSH_CIDR]
    assert [g["GroupId"] for g in rules["-1", None]["UserIdGroupPairs"]] == [group["GroupId"]]
    assert world_open(group) == []

    # One RunInstances per role with its own ClientToken; one DescribeInstances per poll (plus the find and
    # the account's vCPUs in use, for the quota check).
    runs = [p for a, p in inject.calls if a == "RunInstances"]
    assert [(p["MinCount"], p["InstanceType"]) for p in runs] == [("1", "m5.xlarge"), ("8", "m5.large")]
    assert len({p["ClientToken"] for p in runs}) == 2 and all(p["ClientToken"].startswith("t1-") for p in runs)
    assert inject.count("DescribeInstances") == 2 + len(polls)
    assert polls[-1] == ("t1: 9 running", 9, 9)

    info = read_servers(settings.servers_dir, cluster_name="t1")
    assert info.provider == "ec2" and info.region == ms.REGION
    assert [n.name for n in info.nodes] == ["t1-master"] + [f"t1-worker-{k}" for k in range(1, 9)]
    by_id = {i["InstanceId"]: i for i in found}
    for node in info.nodes:
        assert node.host == node.public == by_id[node.id]["PublicDnsName"]
        assert node.private == by_id[node.id]["PrivateIpAddress"]
    assert info.known_hosts == str(Path(settings.state_dir).resolve() / "ec2" / ms.REGION / "t1" / "known_hosts")
    servers_txt = (Path(settings.servers_dir) / "servers.txt").read_text().split()
    assert servers_txt == [n.public for n in info.workers]


def test_launch_1_plus_64_takes_the_same_requests(aws, make_cfg, settings):
    client, inject = aws
    result = lib.launch(make_cfg(nworkers=64), settings=settings, wait=False)
    assert len(result.info.workers) == 64 and len(live(client, "t1")) == 65
    assert inject.count("RunInstances") == 2
    # The subnet lookup, the launch lock's release and the checks before RunInstances (zones, key pair, types,
    # vCPUs in use) are among them; STS (the owner) and Service Quotas are not EC2.
    assert inject.count() <= 14
    assert len(lib.status(make_cfg(nworkers=64), settings=settings)) == 65
    assert inject.count() <= 16


def test_ssh_from_a_security_group_or_explicitly_from_anywhere(aws, make_cfg, settings):
    client, _ = aws
    bastion = client.create_security_group(GroupName="bastion", Description="jump hosts")["GroupId"]
    lib.launch(make_cfg(cluster_name="via-sg", ssh_cidr=bastion, nworkers=1), settings=settings, wait=False)
    (group,) = cluster_groups(client, "via-sg")
    ssh = next(p for p in group["IpPermissions"] if p.get("FromPort") == 22)
    assert [g["GroupId"] for g in ssh["UserIdGroupPairs"]] == [bastion] and ssh["IpRanges"] == []
    assert world_open(group) == []

    lib.launch(make_cfg(cluster_name="open", ssh_cidr="0.0.0.0/0", nworkers=1), settings=settings, wait=False)
    (group,) = cluster_groups(client, "open")
    # Written explicitly by the user, and even then only for port 22.
    assert world_open(group) == [("tcp", 22, 22)]


def test_the_dev_instance_may_ssh_to_the_nodes_for_redeploy(aws, make_cfg, settings):
    client, _ = aws
    dev_group = client.create_security_group(GroupName="dev", Description="the dev instance")["GroupId"]
    dev = client.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                               SecurityGroupIds=[dev_group])["Instances"][0]
    lib.launch(make_cfg(cluster_name="with-dev", nworkers=1, ami_instance_ip=dev["PrivateIpAddress"]),
               settings=settings, wait=False)
    (group,) = cluster_groups(client, "with-dev")
    ssh = next(p for p in group["IpPermissions"] if p.get("FromPort") == 22)
    # rsync runs on the dev instance towards the nodes' private addresses: SSH only, from its group.
    assert [g["GroupId"] for g in ssh["UserIdGroupPairs"]] == [dev_group]
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == [SSH_CIDR]
    assert world_open(group) == []

    # A dev instance that cannot be found does not stop the launch.
    lib.launch(make_cfg(cluster_name="no-dev", nworkers=1, ami_instance_ip="10.9.9.9"), settings=settings,
               wait=False)
    (group,) = cluster_groups(client, "no-dev")
    ssh = next(p for p in group["IpPermissions"] if p.get("FromPort") == 22)
    assert ssh["UserIdGroupPairs"] == []


def test_spot_workers_and_on_demand_master(aws, make_cfg, settings):
    client, inject = aws
    lib.launch(make_cfg(nworkers=2, spot=0.25), settings=settings, wait=False)
    found = live(client, "t1")
    lifecycle = {tags(i)["cloister:role"]: i.get("InstanceLifecycle", "on-demand") for i in found}
    assert lifecycle == {"master": "on-demand", "worker": "spot"}
    master_run, worker_run = [p for a, p in inject.calls if a == "RunInstances"]
    assert not any(k.startswith("InstanceMarketOptions") for k in master_run)
    assert worker_run["InstanceMarketOptions.MarketType"] == "spot"
    assert worker_run["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.25"


def test_latest_ami_is_the_newest_with_the_prefix(aws, make_cfg, settings):
    client, _ = aws
    source = run_instance(client)
    older = make_image(client, "alice-clamor-zzz-older", source)
    make_image(client, "bob-clamor-20991231-2359", source)
    make_image(client, "alice-clamor2-20991231-2359", source)  # another prefix that merely starts alike
    time.sleep(1.1)  # CreationDate has one-second resolution; the newer image must sort by date, not name
    newest = make_image(client, "alice-clamor-aaa-newer", source)
    cfg = make_cfg(ami="latest", ami_tag="alice-clamor", nworkers=1)
    assert images.latest(cfg, settings=settings).id == newest
    assert [i.id for i in images.list_images(cfg, settings=settings)] == [newest, older]
    lib.launch(cfg, settings=settings, wait=False)
    assert {i["ImageId"] for i in live(client, "t1")} == {newest}

    nothing = make_cfg(cluster_name="t2", ami="latest", ami_tag="carol")
    with pytest.raises(ProviderError, match=r"no available image named 'carol-\*' owned by you in us-west-2"):
        lib.launch(nothing, settings=settings, wait=False)
    assert live(client, "t2") == []


def test_second_launch_finds_the_cluster_and_rewrites_servers(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=3)
    first = lib.launch(cfg, settings=settings, wait=False)
    for path in Path(settings.servers_dir).iterdir():
        path.unlink()
    second = lib.launch(cfg, settings=settings, wait=False)
    assert not second.created and second.info == first.info
    assert inject.count("RunInstances") == 2 and inject.count("CreateSecurityGroup") == 1
    assert len(live(client, "t1")) == 4
    assert read_servers(settings.servers_dir).nodes == first.info.nodes


def test_an_incomplete_cluster_is_reported_precisely(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=3)
    info = lib.launch(cfg, settings=settings, wait=False).info
    with pytest.raises(ProviderError, match="3 workers, not the 2 asked for"):
        lib.launch(cfg, settings=settings, nworkers=2, wait=False)
    client.terminate_instances(InstanceIds=[info.workers[1].id])
    with pytest.raises(ProviderError, match=r"1 master\(s\) and 2 worker\(s\): missing worker-2; inv "
                                            r"cluster.repair replaces missing workers"):
        lib.launch(cfg, settings=settings, wait=False)
    client.terminate_instances(InstanceIds=[info.master.id])
    with pytest.raises(ProviderError, match="no master; missing worker-2"):
        lib.launch(cfg, settings=settings, wait=False)
    client.stop_instances(InstanceIds=[info.workers[0].id])
    with pytest.raises(ProviderError, match="stopped; run inv cluster.start"):
        lib.launch(cfg, settings=settings, wait=False)
    assert inject.count("RunInstances") == 2


# -- failures --------------------------------------------------------------------------


def test_failed_launch_offers_to_terminate_what_it_created(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=4)

    def no_capacity(request, **_):
        # EC2 answers HTTP 500 here and botocore retries it; 400 keeps the test to one attempt.
        if ms.params(request)["MinCount"] == "4":
            return ms.error_response(request, "InsufficientInstanceCapacity",
                                     "We currently do not have sufficient m5.large capacity.")

    inject.on("before-send.ec2.RunInstances", no_capacity)
    asked = []
    with pytest.raises(AwsError) as failed:
        lib.launch(cfg, settings=settings, wait=False, confirm=lambda q: asked.append(q) or True)
    message = str(failed.value)
    assert "\n" not in message and failed.value.code == "InsufficientInstanceCapacity"
    # Every zone refuses the workers: the whole cluster was tried in each zone offering the types, in turn.
    assert message.startswith("launch of ec2 cluster 't1' failed: no capacity for the cluster in any zone that "
                              "offers the types (us-west-2a, us-west-2b, us-west-2c, us-west-2d)")
    assert [p["SubnetId"] for a, p in inject.calls if a == "RunInstances"] == [
        s["SubnetId"] for s in sorted(client.describe_subnets()["Subnets"], key=lambda s: s["AvailabilityZone"])
        for _ in ("master", "workers")]
    assert "choose other instance types" in message and message.endswith("terminated the 1 instances it created")
    assert asked and "terminate the 1 instances it created?" in asked[0]
    assert live(client, "t1") == [] and cluster_groups(client, "t1") == []
    assert not (Path(settings.servers_dir) / "cluster.json").exists()

    # Declined: the master stays, tagged, and the message says how to remove it.
    with pytest.raises(AwsError, match=r"left 1 instances running \(they terminate at their TTL\); "
                                       r"inv cluster.destroy --yes removes them"):
        lib.launch(cfg, settings=settings, wait=False, confirm=lambda q: False)
    (master,) = live(client, "t1")
    assert tags(master)["cloister:role"] == "master"


def test_ctrl_c_after_the_master_terminates_it(aws, make_cfg, settings):
    client, inject = aws

    def interrupt(request, **_):
        if ms.params(request)["MinCount"] == "2":
            raise KeyboardInterrupt

    inject.on("before-send.ec2.RunInstances", interrupt)
    with pytest.raises(ProviderError, match=r"launch of ec2 cluster 't1' failed: interrupted \(Ctrl-C\); "
                                            r"terminated the 1 instances"):
        lib.launch(make_cfg(), settings=settings, wait=False)
    assert live(client, "t1") == []


def test_a_lost_runinstances_answer_is_retried_with_the_same_client_token(aws, make_cfg, settings):
    """EC2 returns the first call's instances for a repeated ClientToken; moto does not, so emulate it."""
    client, inject = aws
    answers: dict[str, str] = {}

    def lose_first_answer(request, **_):
        token = ms.params(request)["ClientToken"]
        if token in answers:
            return ms.ok_response(request, answers[token])
        if not answers:  # the master's call: let it take effect, then lose the answer
            status, body = ms.forward(request)
            answers[token] = body.decode()
            return ms.error_response(request, "ServiceUnavailable", "connection reset", status=503)

    inject.on("before-send.ec2.RunInstances", lose_first_answer)
    result = lib.launch(make_cfg(), settings=settings, wait=False)
    tokens = [p["ClientToken"] for a, p in inject.calls if a == "RunInstances"]
    assert len(tokens) == 3 and tokens[0] == tokens[1] != tokens[2]
    assert len(live(client, "t1")) == 3 and len(result.info.nodes) == 3


def test_throttling_is_retried(aws, make_cfg, settings):
    client, inject = aws
    throttled = []

    def throttle_once(request, **_):
        if not throttled:
            throttled.append(True)
            return ms.error_response(request, "RequestLimitExceeded", "Request limit exceeded.", status=503)

    inject.on("before-send.ec2.DescribeInstances", throttle_once)
    result = lib.launch(make_cfg(), settings=settings, wait=False)
    assert throttled and result.created and len(live(client, "t1")) == 3


@pytest.mark.parametrize("overrides, code, advice", [
    ({"ami": "ami-12345678"}, "InvalidAMIID.NotFound", "check `ami` in the config, or run inv ami.list"),
    # Found before any RunInstances: by DescribeKeyPairs, by DescribeInstanceTypeOfferings.
    ({"key_name": "nobody"}, None, "key pair 'nobody' does not exist in us-west-2: check key_name"),
    ({"instance_type": "m5.hugex"}, None, "EC2 offers m5.hugex in no zone of this region: check instance_type"),
])
def test_bad_input_rejected_by_ec2_gives_one_line(aws, make_cfg, settings, overrides, code, advice):
    client, inject = aws
    with pytest.raises(CloisterError) as failed:
        lib.launch(make_cfg(**overrides), settings=settings, wait=False)
    assert getattr(failed.value, "code", None) == code and advice in str(failed.value)
    assert "\n" not in str(failed.value) and live(client) == [] and cluster_groups(client, "t1") == []
    assert inject.count("RunInstances") == 0


@pytest.mark.parametrize("code, expected", [
    ("VcpuLimitExceeded", "your on-demand vCPU quota in us-west-2 is too small for this launch (VcpuLimitExceeded: "
                          "You have requested more vCPU capacity than your current vCPU limit allows.); "
                          "ask for more 'Running On-Demand Standard instances' vCPUs (quota L-1216C47A)"),
    ("InsufficientInstanceCapacity", "no capacity for the cluster in any zone that offers the types"),
    ("UnauthorizedOperation", "not permitted to call RunInstances"),
])
def test_launch_errors_from_ec2_explain_what_to_do(aws, make_cfg, settings, code, expected):
    client, inject = aws
    inject.on("before-send.ec2.RunInstances", lambda request, **_: ms.error_response(
        request, code, "You have requested more vCPU capacity than your current vCPU limit allows."))
    with pytest.raises(AwsError) as failed:
        lib.launch(make_cfg(), settings=settings, wait=False)
    assert expected in str(failed.value) and "\n" not in str(failed.value)
    assert "no instances were created" in str(failed.value) and live(client) == []


def test_throttling_after_every_retry_and_missing_credentials_read_as_one_line():
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    throttled = ClientError({"Error": {"Code": "RequestLimitExceeded", "Message": "Request limit exceeded."}},
                            "DescribeInstances")
    assert str(ec2_aws.aws_error(throttled, region="eu-west-1")) == (
        "EC2 kept throttling requests after 10 attempts (RequestLimitExceeded: Request limit exceeded.); "
        "wait a minute and retry; another tool may be calling EC2 heavily")
    assert str(ec2_aws.aws_error(NoCredentialsError(), region="eu-west-1")).startswith("no AWS credentials found")
    unreachable = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    assert "cannot reach the EC2 endpoint" in str(ec2_aws.aws_error(unreachable, region="eu-west-1"))


# -- destroy, stop, start, status, list ---------------------------------------------------


def test_destroy_touches_only_this_clusters_instances(aws, make_cfg, settings):
    client, inject = aws
    stranger = run_instance(client)
    neighbour = run_instance(client, **{"cloister:cluster": "t2", "cloister:role": "master"})
    cfg = make_cfg(nworkers=3)
    lib.launch(cfg, settings=settings, wait=False)
    known_hosts = Path(settings.state_dir) / "ec2" / ms.REGION / "t1" / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.write_text("")
    asked = []
    messages = lib.destroy(cfg, settings=settings, confirm=lambda q: asked.append(q) or True)
    assert asked == [f"Terminate 4 instances of ec2 cluster 't1' in {ms.REGION}: "
                     f"1 master (m5.large), 3 workers (m5.large)?"]
    assert messages[0] == "terminated 4 instances of ec2 cluster 't1': 1 master (m5.large), 3 workers (m5.large)"
    assert re.match(r"deleted security group cloister-t1-[0-9a-f]{8} \(sg-", messages[1]), messages
    assert inject.count("TerminateInstances") == 1
    assert {i["InstanceId"] for i in live(client)} == {stranger, neighbour}
    assert live(client, "t1") == [] and cluster_groups(client, "t1") == []
    assert not (Path(settings.servers_dir) / "cluster.json").exists() and not known_hosts.parent.exists()
    assert lib.destroy(cfg, settings=settings) == [
        f"no instances tagged cloister:cluster=t1 in {ms.REGION}; nothing to terminate"]


def test_destroy_asks_and_works_without_a_master(aws, make_cfg, settings):
    client, _ = aws
    cfg = make_cfg()
    info = lib.launch(cfg, settings=settings, wait=False).info
    with pytest.raises(ProviderError, match="not confirmed; pass --yes"):
        lib.destroy(cfg, settings=settings, confirm=lambda q: False)
    assert len(live(client, "t1")) == 3
    client.terminate_instances(InstanceIds=[info.master.id])
    assert lib.destroy(cfg, settings=settings)[0].startswith("terminated 2 instances")
    assert live(client, "t1") == []


def test_security_group_deletion_waits_while_ec2_reports_dependencies(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=1)
    lib.launch(cfg, settings=settings, wait=False)
    refused = []

    def still_in_use(request, **_):
        if not refused:
            refused.append(True)
            return ms.error_response(request, "DependencyViolation", "resource has a dependent object")

    inject.on("before-send.ec2.DeleteSecurityGroup", still_in_use)
    lib.destroy(cfg, settings=settings)
    assert refused and inject.count("DeleteSecurityGroup") == 2 and cluster_groups(client, "t1") == []


def test_placement_group_created_tagged_and_removed_only_if_ours(aws, make_cfg, settings):
    client, inject = aws
    store = {"theirs": {"strategy": "cluster", "tags": "{}"}}
    inject.on("before-send.ec2", ms.placement_groups_handler(store))
    ours = make_cfg(placement_group="pg-t1")
    lib.launch(ours, settings=settings, wait=False)
    assert store["pg-t1"]["strategy"] == "cluster"
    assert json.loads(store["pg-t1"]["tags"]) == {"cloister:cluster": "t1", "cloister:owner": OWNER}
    run = next(p for a, p in inject.calls if a == "RunInstances")
    assert run["Placement.GroupName"] == "pg-t1"
    assert "deleted placement group pg-t1" in lib.destroy(ours, settings=settings)
    assert "pg-t1" not in store

    theirs = make_cfg(cluster_name="t2", placement_group="theirs")
    lib.launch(theirs, settings=settings, wait=False)
    assert not any("placement" in m for m in lib.destroy(theirs, settings=settings))
    assert "theirs" in store


def test_stop_and_start_rewrite_servers(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=2)
    before = lib.launch(cfg, settings=settings, wait=False).info
    known_hosts = Path(before.known_hosts)
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    known_hosts.write_text(f"{before.master.host} ssh-ed25519 AAAA\n")
    assert lib.stop(cfg, settings=settings) == ["stopped 3 instances of ec2 cluster 't1'"]
    assert {i["State"]["Name"] for i in live(client, "t1")} == {"stopped"}
    assert {r.state for r in lib.status(cfg, settings=settings)} == {"stopped"}
    after = lib.start(cfg, settings=settings, wait=False)
    assert [n.id for n in after.nodes] == [n.id for n in before.nodes]
    assert all(a.public != b.public for a, b in zip(after.nodes, before.nodes))
    assert read_servers(settings.servers_dir, cluster_name="t1") == after
    assert (Path(settings.servers_dir) / "servers.txt").read_text().split() == [n.public for n in after.workers]
    # New addresses: keys recorded for the old ones must not be checked against other machines.
    assert not known_hosts.exists()
    assert inject.count("StopInstances") == inject.count("StartInstances") == 1


def test_status_rows_with_uptime_ttl_and_cost(aws, make_cfg, settings):
    client, _ = aws
    cfg = make_cfg(nworkers=2, instance_type="t2.nano", master_instance_type="m5.large")
    lib.launch(cfg, settings=settings, wait=False)
    master, *workers = [asdict(r) for r in lib.status(cfg, settings=settings)]
    assert (master["role"], master["type"], master["state"]) == ("master", "m5.large", "running")
    assert master["host"].startswith("ec2-") and 0 <= master["uptime_s"] < 60
    assert 7000 < master["ttl_left_s"] <= 7200
    assert master["cost"] == "$0.00" and master["cost_usd"] > 0
    assert [w["cost"] for w in workers] == ["unknown", "unknown"]


def test_list_shows_every_cloister_cluster_in_the_region(aws, make_cfg, settings):
    client, _ = aws
    run_instance(client)
    lib.launch(make_cfg(nworkers=2), settings=settings, wait=False)
    lib.launch(make_cfg(cluster_name="t2", nworkers=1, instance_type="c5.large", ttl=0), settings=settings,
               wait=False)
    rows = [asdict(r) for r in lib.list_clusters(make_cfg(), settings=settings)]
    assert [(r["cluster"], r["masters"], r["workers"], r["states"]) for r in rows] == [
        ("t1", 1, 2, "3 running"), ("t2", 1, 1, "2 running")]
    assert rows[1]["types"] == "c5.large" and rows[1]["ttl_left_s"] is None
    assert rows[0]["ttl_left_s"] > 7000 and rows[0]["age_s"] >= 0


def test_dry_run_resolves_and_checks_but_creates_nothing(aws, make_cfg, settings):
    client, inject = aws
    make_image(client, "alice-clamor-20250101-0000")
    cfg = make_cfg(ami="latest", ami_tag="alice-clamor", nworkers=8, spot=True, ttl="6h")
    lines = lib.plan(cfg, settings=settings).lines()
    text = "\n".join(lines)
    assert "alice-clamor-20250101-0000" in text and "1 x m5.large on-demand" in text
    assert "8 x m5.large spot" in text and f"tcp 22 from {SSH_CIDR}" in text
    assert "every node terminates itself at" in text and "$0.86/hour" in text
    assert any(line.startswith("  dry run    EC2 would allow every call") for line in lines)
    # moto has no EC2 quotas in Service Quotas: said so, never passed (the twin answers them).
    assert "  unchecked  spot vCPU quota L-34B43A08 (Service Quotas answered NoSuchResourceException)" in lines
    assert "  checked    key pair alice exists" in lines and "  checked    m5.large runs x86_64 like" in text
    # Without an instance of the cluster, EC2 answers GetConsoleOutput's check with NotFound.
    assert "  unchecked  GetConsoleOutput (EC2 needs an existing resource to answer)" in lines
    # Every action of the policy was asked about (destroy's too), but the placement group's (none here).
    dry = {a for a, p in inject.calls if p.get("DryRun") == "true"}
    assert dry == set(ec2_permissions.EC2_ACTIONS) - {"DescribePlacementGroups", "CreatePlacementGroup",
                                                       "DeletePlacementGroup"}
    assert [p.get("DryRun") for a, p in inject.calls if a in ("RunInstances", "CreateSecurityGroup")] == ["true"] * 3
    assert live(client, "t1") == [] and cluster_groups(client, "t1") == []

    inject.on("before-send.ec2.CreateSecurityGroup",
              lambda request, **_: ms.error_response(request, "UnauthorizedOperation", "not allowed"))
    assert lib.plan(cfg, settings=settings).denied == ("CreateSecurityGroup",)


def test_ssh_readiness_names_the_nodes_that_never_answer(aws, make_cfg, settings):
    """moto's addresses are public, so point the nodes at loopback addresses where nothing listens."""
    client, _ = aws
    cfg = make_cfg(nworkers=2)
    info = lib.launch(cfg, settings=settings, wait=False).info
    dead = replace(info, nodes=[replace(n, host=f"127.0.254.{k}") for k, n in enumerate(info.nodes, 1)])
    with pytest.raises(HostsFailed) as never:
        hosts.wait_ssh(dead, dead.nodes, timeout=0.5, probe_timeout=0.3)
    assert sorted(never.value.failures) == ["127.0.254.1", "127.0.254.2", "127.0.254.3"]
    with pytest.raises(ProviderError) as failed:
        ec2_launch.abandon(cfg, never.value, settings=settings, ids=[n.id for n in info.nodes])
    lines = str(failed.value).splitlines()
    assert lines[0].startswith("[127.0.254.1] connection refused")
    assert lines[-1] == "launch of ec2 cluster 't1' failed; terminated the 3 instances it created"
    assert live(client, "t1") == []


# -- AMIs --------------------------------------------------------------------------------


@pytest.fixture
def cleaned(monkeypatch):
    """moto's instances have no sshd: record the dev instance's cleaning instead (the twin tests do it for real)."""
    calls: list[str] = []
    monkeypatch.setattr(Ec2Images, "clean_dev", lambda store: calls.append(store.cfg.ami_instance_ip))
    return calls


def test_ami_create_list_prune(aws, make_cfg, settings, cleaned):
    client, inject = aws
    snapshot_tags: list[dict[str, str]] = []
    inject.on("before-send.ec2.CreateImage", ms.snapshot_tags_handler(snapshot_tags))
    dev = client.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="t3.large", MinCount=1, MaxCount=1)
    dev = dev["Instances"][0]
    by_dns = make_cfg(ami="latest", ami_tag="alice-clamor", ami_instance_ip=dev["PublicDnsName"])
    first = images.create(by_dns, settings=settings)
    assert first.name.startswith("alice-clamor-") and len(first.name) == len("alice-clamor-yyyymmdd-hhmm")
    assert first.state == "available" and first.snapshots
    by_ip = make_cfg(ami="latest", ami_tag="alice-clamor", ami_instance_ip=dev["PublicIpAddress"])
    time.sleep(1.1)
    second = images.create(by_ip, settings=settings, name="alice-clamor-second")
    assert cleaned == [dev["PublicDnsName"], dev["PublicIpAddress"]]
    created = [p for a, p in inject.calls if a == "CreateImage"]
    assert {p["InstanceId"] for p in created} == {dev["InstanceId"]}
    assert len(snapshot_tags) == 2 and "alice-clamor" in snapshot_tags[0].values()
    assert [i.id for i in images.list_images(by_dns, settings=settings)] == [second.id, first.id]

    doomed = images.prunable(by_dns, settings=settings, keep=1)
    assert doomed == [first]
    (message,) = images.delete(by_dns, settings=settings, doomed=doomed)
    assert message.startswith(f"deregistered {first.name} ({first.id}) and deleted snap-")
    assert [i.id for i in images.list_images(by_dns, settings=settings)] == [second.id]
    left = {s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert not set(first.snapshots) & left and set(second.snapshots) <= left

    nowhere = make_cfg(ami_tag="alice-clamor", ami_instance_ip="203.0.113.99")
    with pytest.raises(ProviderError, match="no instance with address 203.0.113.99"):
        images.create(nowhere, settings=settings)


def test_legacy_config_launches_unchanged(aws, tmp_path, settings, monkeypatch):
    client, _ = aws
    ms.seed(client, key_name="alice-keypair")
    make_image(client, "alice-clamor-20240101-0000")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "alice-keypair.pem").write_text("key\n")
    (home / ".ssh" / "alice-keypair.pem").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    cfg = load_config(REPO / "tests" / "data" / "configs" / "legacy.json", defaults={"ssh_cidr": SSH_CIDR})
    assert any("identity_file" in n for n in cfg.notices)
    info = lib.launch(cfg, settings=settings, wait=False).info
    found = live(client, "alice-clamor-test")
    assert len(info.workers) == 8 and len(found) == 9
    assert {i["KeyName"] for i in found} == {"alice-keypair"}
    assert next(i for i in found if tags(i)["cloister:role"] == "master")["InstanceType"] == "r5.4xlarge"


# -- the command line ------------------------------------------------------------------------


def inv_env(moto_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = ms.aws_env(moto_url)
    env.update(INVOKE_CLOISTER_SERVERS_DIR=str(tmp_path / "servers"),
               INVOKE_CLOISTER_STATE_DIR=str(tmp_path / "state"), **extra)
    return env


def test_cli_lifecycle(aws, make_cfg, tmp_path, moto):
    client, _ = aws
    config = str(make_cfg(nworkers=2).source)
    env = inv_env(moto.url, tmp_path, INVOKE_CLOISTER_CONFIG=config)
    dry = run_inv("cluster.launch", "--dry-run", env=env)
    assert dry.returncode == 0 and "dry run: nothing was created" in dry.stdout and live(client) == []
    up = run_inv("cluster.launch", "--no-wait", "--name", "cli", "--ttl", "0", "--yes", env=env)
    assert up.returncode == 0, up.stderr
    assert "launched ec2 cluster 'cli': 1 master, 2 workers" in up.stdout
    assert "ttl 0: the instances of 'cli' never terminate themselves" in up.stderr
    assert "cloister:ttl-expires" not in tags(live(client, "cli")[0])
    listed = run_inv("cluster.list", env=env)
    assert listed.returncode == 0 and "cli" in listed.stdout and "3 running" in listed.stdout
    cli_config = tmp_path / "cli.json"
    cli_config.write_text(json.dumps({**json.loads(Path(config).read_text()), "cluster_name": "cli"}))
    down = run_inv("cluster.destroy", "--config", str(cli_config), env=env)
    assert down.returncode == 1 and down.stderr.strip() == "not confirmed; pass --yes to destroy without asking"
    down = run_inv("cluster.destroy", "--config", str(cli_config), "--yes", env=env)
    assert down.returncode == 0 and "terminated 3 instances" in down.stdout and live(client, "cli") == []


def test_cli_errors_are_one_line(aws, make_cfg, tmp_path, moto):
    env = inv_env(moto.url, tmp_path, INVOKE_CLOISTER_CONFIG=str(make_cfg(ami="ami-12345678").source))
    bad_ami = run_inv("cluster.launch", "--no-wait", env=env)
    assert bad_ami.returncode == 1 and "Traceback" not in bad_ami.stderr
    assert bad_ami.stderr.strip().startswith("the AMI is not available in us-west-2 (InvalidAMIID.NotFound")
    assert len(bad_ami.stderr.strip().splitlines()) == 1

    no_credentials = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    status = run_inv("cluster.status", env=no_credentials)
    assert status.returncode == 1 and status.stderr.strip().startswith("no AWS credentials found: run `aws configure`")



def test_inv_list_does_not_import_boto3():
    probe = subprocess.run([sys.executable, "-c", "import sys, tasks; print('boto3' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr


@pytest.mark.parametrize("output, armed, pending, reason", [
    ("armed\n", True, False, ""),
    ("booting\n", False, True, ""),
    ("missing no-cloud-init\n", False, False, "the image has no cloud-init"),
    ("missing done\n", False, False, "after cloud-init finished (status: done)"),
    ("missing error\n", False, False, "(status: error)"),
    ("", False, False, "(status: no answer)"),
    ("garbage here\n", False, False, "(status: garbage here)"),
])
def test_ttl_check_answers_are_read_strictly(output, armed, pending, reason):
    state = ec2_ttl.parse_check(output)
    assert (state.armed, state.pending) == (armed, pending) and reason in state.reason


def test_prune_outlasts_a_snapshot_still_in_use_and_sweeps_orphans(aws, make_cfg, settings, cleaned):
    """Right after DeregisterImage, real EC2 often answers InvalidSnapshot.InUse: the snapshot must still go.
    A snapshot that an earlier prune left behind (tagged by cloister, used by no image) goes too."""
    client, inject = aws
    inject.on("before-send.ec2.CreateImage", ms.snapshot_tags_handler([]))
    dev = client.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="t3.large", MinCount=1, MaxCount=1)
    cfg = make_cfg(ami="latest", ami_tag="alice-clamor", ami_instance_ip=dev["Instances"][0]["InstanceId"])
    image = images.create(cfg, settings=settings)
    volume = client.create_volume(AvailabilityZone=f"{ms.REGION}a", Size=8)["VolumeId"]
    orphan = client.create_snapshot(VolumeId=volume, TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
        {"Key": "cloister:ami-tag", "Value": "alice-clamor"}]}])["SnapshotId"]
    someone_elses = client.create_snapshot(VolumeId=volume)["SnapshotId"]
    refusals = []

    def in_use(request, **_):
        if len(refusals) < 2:
            refusals.append(ms.params(request)["SnapshotId"])
            return ms.error_response(request, "InvalidSnapshot.InUse", "The snapshot is currently in use by an AMI")

    inject.on("before-send.ec2.DeleteSnapshot", in_use)
    messages = images.delete(cfg, settings=settings, doomed=[image])
    assert refusals == [image.snapshots[0]] * 2
    assert messages[0].startswith(f"deregistered {image.name}") and orphan in messages[-1]
    left = {s["SnapshotId"] for s in client.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert not (set(image.snapshots) | {orphan}) & left and someone_elses in left


# -- one zone, owners, the launch lock ----------------------------------------------------------


def test_every_node_in_one_default_subnet_or_the_one_asked_for(aws, make_cfg, settings):
    client, inject = aws
    lib.launch(make_cfg(nworkers=3), settings=settings, wait=False)
    zones = {i["Placement"]["AvailabilityZone"] for i in live(client, "t1")}
    subnets = {i["SubnetId"] for i in live(client, "t1")}
    assert len(zones) == 1 and len(subnets) == 1
    assert {p["SubnetId"] for a, p in inject.calls if a == "RunInstances"} == subnets
    lib.destroy(make_cfg(), settings=settings)

    zone_b = f"{ms.REGION}b"
    lib.launch(make_cfg(availability_zone=zone_b), settings=settings, wait=False)
    assert {i["Placement"]["AvailabilityZone"] for i in live(client, "t1")} == {zone_b}
    lib.destroy(make_cfg(), settings=settings)

    vpc = client.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    own = client.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone=f"{ms.REGION}c")["Subnet"]
    lib.launch(make_cfg(subnet_id=own["SubnetId"]), settings=settings, wait=False)
    assert {i["SubnetId"] for i in live(client, "t1")} == {own["SubnetId"]}
    (group,) = cluster_groups(client, "t1")
    assert group["VpcId"] == vpc
    with pytest.raises(ProviderError, match=f"is in {ms.REGION}c, not in availability_zone {zone_b}"):
        lib.launch(make_cfg(cluster_name="t9", subnet_id=own["SubnetId"], availability_zone=zone_b),
                   settings=settings, wait=False)


def test_no_default_vpc_is_one_clear_error(aws, make_cfg, settings):
    client, _ = aws
    for subnet in client.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]:
        client.delete_subnet(SubnetId=subnet["SubnetId"])
    with pytest.raises(ProviderError, match=f"no default subnet in {ms.REGION} .*set subnet_id"):
        lib.launch(make_cfg(), settings=settings, wait=False)
    assert live(client, "t1") == [] and cluster_groups(client, "t1") == []


def test_a_launch_that_created_no_instance_leaves_no_group(aws, make_cfg, settings):
    client, inject = aws
    inject.on("before-send.ec2.RunInstances",
              lambda request, **_: ms.error_response(request, "VcpuLimitExceeded", "You have requested more vCPU"))
    with pytest.raises(AwsError, match="no instances were created; deleted the security group it created"):
        lib.launch(make_cfg(), settings=settings, wait=False)
    assert cluster_groups(client, "t1") == []


def test_a_relaunch_replaces_the_old_ssh_source(aws, make_cfg, settings):
    client, _ = aws
    lib.launch(make_cfg(ssh_cidr="198.51.100.7/32"), settings=settings, wait=False)
    client.terminate_instances(InstanceIds=[i["InstanceId"] for i in live(client, "t1")])
    lib.launch(make_cfg(ssh_cidr="198.51.100.99/32"), settings=settings, wait=False)
    (group,) = cluster_groups(client, "t1")
    ssh = next(p for p in group["IpPermissions"] if p.get("FromPort") == 22)
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == ["198.51.100.99/32"]


def test_two_owners_of_one_name_never_touch_each_others_instances(aws, make_cfg, settings, tmp_path):
    """Both launch 't1' in one account (group names are unique per VPC: each owner's has its own), each
    sees and destroys only their own."""
    client, _ = aws
    alice = make_cfg(owner="alice", nworkers=1)
    lib.launch(alice, settings=settings, wait=False)
    bob = make_cfg(owner="bob", nworkers=1)
    bobs = replace(settings, servers_dir=str(tmp_path / "bob" / "servers"), state_dir=str(tmp_path / "bob" / "state"))
    assert lib.status(bob, settings=bobs) == []
    assert lib.destroy(bob, settings=bobs)[0].startswith("no instances tagged")
    assert len(live(client, "t1")) == 2
    lib.launch(bob, settings=bobs, wait=False)
    by_owner = {o: sorted(i["InstanceId"] for i in live(client, "t1") if tags(i)["cloister:owner"] == o)
                for o in ("alice", "bob")}
    assert [len(ids) for ids in by_owner.values()] == [2, 2]
    assert sorted(r.id for r in lib.status(bob, settings=bobs)) == by_owner["bob"]
    assert [g["GroupName"] for g in cluster_groups(client, "t1")].count("cloister-t1") == 0
    assert len(cluster_groups(client, "t1")) == 2
    assert [r.cluster for r in lib.list_clusters(alice, settings=settings)] == ["t1"]
    # bob given alice's servers/ (a copied folder, or alice's identity named differently since her launch):
    # destroy refuses, ends nothing, keeps servers/; a launch refuses to make a second cluster beside them.
    borrowed = replace(bobs, servers_dir=settings.servers_dir)
    with pytest.raises(ProviderError, match=r"servers/ records 2 running instances of ec2 cluster 't1' .* tagged "
                                            r"cloister:owner=alice, not bob; nothing was terminated, servers/ and "
                                            r"the cluster key are kept. If they are yours, set \"owner\": \"alice\""):
        lib.destroy(bob, settings=borrowed)
    assert (Path(settings.servers_dir) / "cluster.json").exists()
    with pytest.raises(ProviderError, match=r"not bob; nothing was launched"):
        lib.launch(make_cfg(owner="bob", nworkers=1, cluster_name="t1"), settings=borrowed, wait=False)
    assert (Path(settings.servers_dir) / "cluster.json").exists()
    assert lib.destroy(bob, settings=bobs)[0].startswith("terminated 2 instances of ec2 cluster 't1'")
    assert sorted(i["InstanceId"] for i in live(client, "t1")) == by_owner["alice"]
    assert [tags(g)["cloister:owner"] for g in cluster_groups(client, "t1")] == ["alice"]


def test_a_second_concurrent_launch_refuses_instead_of_making_a_second_master(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=1)
    second: list[BaseException] = []

    def meanwhile(request, **_):
        # The first launch holds its lock (the group exists, no instance yet) when the second one starts.
        if not second:
            try:
                lib.launch(cfg, settings=settings, wait=False)
            except ProviderError as refused:
                second.append(refused)

    inject.on("before-send.ec2.RunInstances", meanwhile)
    lib.launch(cfg, settings=settings, wait=False)
    assert second and "another launch of ec2 cluster 't1' started at" in str(second[0])
    assert [tags(i)["cloister:role"] for i in live(client, "t1")].count("master") == 1
    (group,) = cluster_groups(client, "t1")
    assert "cloister:launching" not in {t["Key"] for t in group.get("Tags", [])}


def test_state_is_kept_per_region(aws, make_cfg, settings, tmp_path):
    client, _ = aws
    here = lib.launch(make_cfg(), settings=settings, wait=False).info
    other = Path(settings.state_dir) / "ec2" / "eu-west-1" / "t1"
    other.mkdir(parents=True)
    (other / "known_hosts").write_text("x ssh-ed25519 AAAA\n")
    assert Path(here.known_hosts).parent.name == "t1" and Path(here.known_hosts).parent.parent.name == ms.REGION
    lib.destroy(make_cfg(), settings=settings)
    assert (other / "known_hosts").exists()


def test_a_stopped_cluster_past_its_ttl_is_terminated_when_next_touched(aws, make_cfg, settings):
    client, _ = aws
    cfg = make_cfg(nworkers=1)
    lib.launch(cfg, settings=settings, wait=False)
    lib.stop(cfg, settings=settings)
    ids = [i["InstanceId"] for i in live(client, "t1")]
    client.create_tags(Resources=ids, Tags=[{"Key": "cloister:ttl-expires", "Value": "2020-01-01T00:00:00Z"}])
    other = make_cfg(cluster_name="t2", nworkers=1)
    lib.launch(other, settings=settings, wait=False)
    lib.stop(other, settings=settings)
    client.create_tags(Resources=[i["InstanceId"] for i in live(client, "t2")],
                       Tags=[{"Key": "cloister:ttl-expires", "Value": "2020-01-01T00:00:00Z"}])

    rows = lib.status(cfg, settings=settings)
    assert {r.state for r in rows} == {"shutting-down"}
    with pytest.raises(ProviderError, match="passed while they were stopped; terminated them"):
        lib.start(other, settings=settings)
    assert live(client, "t1") == [] and live(client, "t2") == []


def test_list_reap_terminates_every_stopped_cluster_past_its_ttl(aws, make_cfg, settings):
    client, _ = aws
    cfg = make_cfg(nworkers=1)
    lib.launch(cfg, settings=settings, wait=False)
    lib.stop(cfg, settings=settings)
    (master, worker) = [i["InstanceId"] for i in live(client, "t1")]
    client.create_tags(Resources=[master], Tags=[{"Key": "cloister:ttl-expires", "Value": "2020-01-01T00:00:00Z"}])
    assert lib.reap(cfg, settings=settings) == [f"terminated {master} of ec2 cluster 't1': stopped past its TTL"]
    assert [i["InstanceId"] for i in live(client, "t1")] == [worker]


def test_extend_refuses_a_stopped_cluster_and_a_bad_ttl(aws, make_cfg, settings):
    cfg = make_cfg(nworkers=1)
    lib.launch(cfg, settings=settings, wait=False)
    with pytest.raises(CloisterError, match="--ttl 'soon': expected a duration"):
        lib.extend(cfg, settings=settings, ttl="soon")
    lib.stop(cfg, settings=settings)
    with pytest.raises(ProviderError, match="their timers cannot be moved: inv cluster.start first"):
        lib.extend(cfg, settings=settings, ttl="2h")


def test_every_volume_ends_with_its_instance_and_imdsv2_is_required(aws, make_cfg, settings):
    client, inject = aws
    dev = run_instance(client)
    image = client.create_image(InstanceId=dev, Name="alice-clamor-data", BlockDeviceMappings=[
        {"DeviceName": "/dev/sdb", "Ebs": {"VolumeSize": 20, "DeleteOnTermination": False}}])["ImageId"]
    lib.launch(make_cfg(ami=image, nworkers=1, root_size=None), settings=settings, wait=False)
    for run in (p for a, p in inject.calls if a == "RunInstances"):
        assert run["MetadataOptions.HttpTokens"] == "required"
        volumes = {v for k, v in run.items() if k.startswith("BlockDeviceMapping.") and k.endswith(".DeviceName")}
        flags = {v for k, v in run.items() if k.endswith(".Ebs.DeleteOnTermination")}
        assert volumes and flags == {"true"} and len([k for k in run if k.endswith(".Ebs.DeleteOnTermination")]) \
            == len(volumes)


def test_ssh_timing_out_everywhere_with_an_auto_source_says_the_address_may_be_wrong(aws, make_cfg, settings):
    info = lib.launch(make_cfg(ssh_cidr="198.51.100.7/32"), settings=settings, wait=False).info
    timeouts = HostsFailed({n.host: "connection timed out" for n in info.nodes}, total=len(info.nodes))
    auto = lib.provider(make_cfg(ssh_cidr="auto"), settings=settings)
    hint = auto.ssh_hint(info, timeouts)
    assert "lets in only 198.51.100.7/32 (ssh_cidr auto)" in hint and "set ssh_cidr" in hint
    refused = HostsFailed({n.host: "connection refused (is sshd running?)" for n in info.nodes}, total=3)
    assert auto.ssh_hint(info, refused) == ""
    assert lib.provider(make_cfg(), settings=settings).ssh_hint(info, timeouts) == ""


def test_cost_counts_spot_prices_disks_addresses_and_time_before_a_stop(aws, make_cfg, settings):
    client, inject = aws
    cfg = make_cfg(nworkers=1, spot=True, root_size=100, budget=0.000001)
    lib.launch(cfg, settings=settings, wait=False)
    master, worker = lib.status(cfg, settings=settings)
    assert master.cost_usd > 0 and worker.type == "m5.large (spot)"
    history = client.describe_spot_price_history(
        InstanceTypes=["m5.large"], ProductDescriptions=["Linux/UNIX"], MaxResults=1,
        AvailabilityZone=live(client, "t1")[0]["Placement"]["AvailabilityZone"])["SpotPriceHistory"][0]
    disk = 100 * 0.08 / 730
    assert master.hourly_usd == pytest.approx(0.096 + 0.005 + disk)
    assert worker.hourly_usd == pytest.approx(float(history["SpotPrice"]) + 0.005 + disk)
    assert budget.warning(cfg, [master, worker]).startswith("'t1' has spent $")
    assert budget.warning(make_cfg(budget=1000), [master, worker]) is None


def test_time_before_a_stop_is_kept_and_a_stopped_cluster_still_pays_for_disks(aws, make_cfg, settings):
    client, _ = aws
    cfg = make_cfg(nworkers=1, instance_type="t2.nano", master_instance_type="m5.large")
    lib.launch(cfg, settings=settings, wait=False)
    master = live(client, "t1")[0]["InstanceId"]
    # As if the master had run for an hour before this stop.
    client.create_tags(Resources=[master], Tags=[{"Key": "cloister:run-seconds", "Value": "3600"}])
    lib.stop(cfg, settings=settings)
    rows = {r.role: r for r in lib.status(cfg, settings=settings)}
    assert rows["master"].cost_usd >= 0.096 and rows["master"].hourly_usd == pytest.approx(50 * 0.08 / 730)
    assert rows["worker"].cost == "unknown" and rows["worker"].cost_usd is None
    caption = lib.provider(cfg, settings=settings).status_caption(list(rows.values()))
    assert "plus 1 nodes of unknown price" in caption


def test_the_readme_lists_exactly_the_policy_the_code_needs():
    text = (REPO / "README.md").read_text()
    block = text.split("The minimal IAM policy", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(block) == ec2_permissions.policy()
    shared = text.split("An account several people share", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(shared) == ec2_permissions.shared_policy()
    # Both allow exactly the actions the code calls.
    wanted = {f"ec2:{a}" for a in ec2_permissions.EC2_ACTIONS} | {"iam:CreateServiceLinkedRole",
                                                                   "servicequotas:GetServiceQuota"}
    assert ec2_permissions.policy_actions(ec2_permissions.policy()) == wanted
    assert ec2_permissions.policy_actions(ec2_permissions.shared_policy()) == wanted


def test_a_console_that_stops_moving_is_a_hanging_boot(aws):
    client, inject = aws
    instance = run_instance(client)
    console = ["[    1.0] cloud-init[82]: Cloud-init v. 22.4.2 running 'init' at Sun, 29 Nov 2026\n"
               "[    1.1] cloud-init[82]: ci-info: +------+------+\n"]

    def answer(request, **_):
        body = ("<GetConsoleOutputResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">"
                f"<instanceId>{instance}</instanceId><timestamp>2026-11-29T00:00:00Z</timestamp>"
                f"<output>{base64.b64encode(console[0].encode()).decode()}</output></GetConsoleOutputResponse>")
        return ms.ok_response(request, body)

    inject.on("before-send.ec2.GetConsoleOutput", answer)
    now = [100.0]
    watch = ec2_console.BootWatch(stall=60, clock=lambda: now[0])
    cloisters = ec2_aws.client_for(ms.REGION)
    assert watch.stalled(cloisters, instance) is None
    now[0] += 59
    assert watch.stalled(cloisters, instance) is None
    console[0] += "[    2.0] systemd[1]: Reached target cloud-init.target\n"
    assert watch.stalled(cloisters, instance) is None
    now[0] += 61
    reason = watch.stalled(cloisters, instance)
    assert reason.startswith("boot hangs: no SSH, and its console has not moved for 61s")
    assert reason.endswith("last: systemd[1]: Reached target cloud-init.target")

    # A console that stops once boot has ended well: booted, and SSH cannot get in.
    console[0] += "[    3.0] cloud-init[90]: Cloud-init v. 22.4.2 finished at Sun, 29 Nov 2026. Up 3.00 seconds\n"
    assert watch.stalled(cloisters, instance) is None
    now[0] += 61
    reason = watch.stalled(cloisters, instance)
    assert reason.startswith("booted (its console shows 'Cloud-init v. 22.4.2 finished at'), but SSH does not get "
                             "in: check that ssh_cidr lets this machine in"), reason
    assert "ssh_key is the private key of key pair" in reason


def test_swap_for_the_master_is_a_volume_that_ends_with_it(aws, make_cfg, settings):
    client, inject = aws
    lib.launch(make_cfg(nworkers=1, swap_size=16), settings=settings, wait=False)
    master, worker = [p for a, p in inject.calls if a == "RunInstances"]
    swap_keys = [k for k, v in master.items() if k.endswith(".DeviceName") and v == "/dev/sdf"]
    assert len(swap_keys) == 1
    prefix = swap_keys[0].removesuffix("DeviceName")
    assert (master[prefix + "Ebs.VolumeSize"], master[prefix + "Ebs.DeleteOnTermination"]) == ("16", "true")
    assert "/dev/sdf" not in worker.values()
    user_data = base64.b64decode(master["UserData"]).decode()
    assert "mkswap -L cloister-swap" in user_data and "17179869184" in user_data
    assert "mkswap" not in base64.b64decode(worker["UserData"]).decode()
    rows = {r.role: r for r in lib.status(make_cfg(nworkers=1, swap_size=16), settings=settings)}
    assert "swap 16 GiB" in rows["master"].type and "swap" not in rows["worker"].type


def test_a_sweep_stops_before_a_run_that_would_cross_the_budget(aws, make_cfg, settings, tmp_path):
    from cloister.runs import sweep as sweeplib

    cfg = make_cfg(nworkers=1, budget=0.01)
    lib.launch(cfg, settings=settings, wait=False)
    rows = lib.status(cfg, settings=settings)
    assert budget.would_cross(cfg, rows, seconds=60) is None
    reason = budget.would_cross(cfg, rows, seconds=3600)
    assert reason.startswith("budget: 't1' has spent $") and "would take it past its $0.01 budget" in reason

    state = sweeplib.SweepState(tmp_path / "sweep", {"benchmark": "b", "k": [1], "p": [1], "grid": {}})
    combos = sweeplib.combos(ks=[1], ps=[1, 2], grid={}, repeat=1)
    with pytest.raises(ExperimentError, match=r"would take it past .* stopped before k=1 p=1 .*0/2 runs"):
        sweeplib.run_sweep(state=state, all_combos=combos, run_one=lambda c, r: pytest.fail("must not run"),
                           cleanup_interrupted=lambda r: None, fail_fast=False,
                           refuse=lambda seconds: budget.would_cross(cfg, rows, seconds=seconds + 3600))


@pytest.mark.parametrize("arn, owner", [
    ("arn:aws:sts::123456789012:assumed-role/researcher/botocore-session-1796587196",
     "arn:aws:iam::123456789012:role/researcher"),
    ("arn:aws:sts::123456789012:assumed-role/researcher/1796587196123456789",  # aws-vault
     "arn:aws:iam::123456789012:role/researcher"),
    # A session that names a person stays that person's: two people sharing one role are two owners.
    ("arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_Lab_0a1b/alice@lab.example",
     "arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_Lab_0a1b/alice@lab.example"),
    ("arn:aws:iam::123456789012:user/alice", "arn:aws:iam::123456789012:user/alice"),
    ("arn:aws-cn:sts::123456789012:assumed-role/r/botocore-session-1", "arn:aws-cn:iam::123456789012:role/r"),
])
def test_an_assumed_roles_per_process_session_name_is_not_part_of_the_owner(arn, owner):
    assert ec2_aws.stable_owner(arn) == owner


def test_spot_workers_terminate_on_shutdown_even_without_a_ttl(aws, make_cfg, settings):
    """A one-time spot instance cannot be started again: one that powers off must not stay stopped (its
    disk billing), ttl 0 or not."""
    client, _ = aws
    lib.launch(make_cfg(spot=True, ttl=0, nworkers=1), settings=settings, wait=False)
    behaviour = {tags(i)["cloister:role"]: client.describe_instance_attribute(
        InstanceId=i["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")[
        "InstanceInitiatedShutdownBehavior"]["Value"] for i in live(client, "t1")}
    assert behaviour == {"master": "stop", "worker": "terminate"}
