"""EC2 as it fails, on a moto EC2 server over HTTP with the twin's faults (tests/twin/faults.py) installed:
eventual consistency, zones without capacity, quotas, refusals, throttling, and the details that cost
money. Each fault is met through `inv` as a user meets it (or the library where counting requests), and
after each the account is checked for what is left: instances, security groups, volumes, snapshots.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

import moto_server as ms  # before anything imports moto
from twin.faults import DEFAULT_QUOTA, Faults, installed

from cloister.cluster import budget
from cloister.cluster import lifecycle as lib
from cloister.config import load_config
from cloister.providers.base import NodeStatus
from cloister.providers.ec2 import cost as ec2_cost
from cloister.providers.ec2 import images as ec2_images
from cloister.providers.ec2.instances import Scope
from cloister.settings import Settings

from conftest import no_traceback, run_inv

SSH_CIDR = "198.51.100.7/32"
LIVE = ["pending", "running", "stopping", "stopped"]


@pytest.fixture(scope="module")
def moto():
    server = ms.MotoEc2()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(ms.aws_env(server.url))
    try:
        yield server
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


@pytest.fixture
def faults(moto):
    """A fresh account with key pair 'alice', and the faults moto answers with (none until a test sets one)."""
    moto.reset()
    ms.seed(ms.client())
    with installed(Faults()) as injected:
        yield injected


@pytest.fixture
def ec2(moto):
    return ms.client()


@pytest.fixture
def make_config(tmp_path):
    key = tmp_path / "alice.pem"
    key.write_text("not a real key\n")
    key.chmod(0o600)

    def make(**overrides) -> Path:
        data = {"cluster_name": "fb1", "provider": "ec2", "region": ms.REGION, "ami": ms.UBUNTU_AMI,
                "key_name": "alice", "ssh_key": str(key), "nworkers": 2, "instance_type": "m5.large",
                "ssh_cidr": SSH_CIDR, "ttl": "2h", **overrides}
        path = tmp_path / f"{data['cluster_name']}.json"
        path.write_text(json.dumps(data))
        return path

    return make


@pytest.fixture
def inv(moto, tmp_path):
    def run(config: Path, *args: str):
        env = ms.aws_env(moto.url)
        env.update(INVOKE_CLOISTER_SERVERS_DIR=str(tmp_path / "servers"),
                   INVOKE_CLOISTER_STATE_DIR=str(tmp_path / "state"), INVOKE_CLOISTER_CONFIG=str(config))
        proc = run_inv(*args, env=env, timeout=300)
        no_traceback(proc)
        return proc

    return run


def account(ec2) -> dict[str, list[str]]:
    """What bills or lingers in the account: live instances, non-default groups, volumes, own snapshots."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-state-name", "Values": LIVE}])
    return {
        "instances": sorted(i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]),
        "groups": sorted(g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]
                         if g["GroupName"] != "default"),
        "volumes": sorted(v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]),
        "snapshots": sorted(s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]),
    }


@pytest.fixture
def nothing_left(faults, ec2):
    """Check that the account holds what it held before the test (moto's own AMIs come with snapshots)."""
    before = account(ec2)
    assert before["instances"] == before["groups"] == before["volumes"] == []

    def check() -> None:
        assert account(ec2) == before

    return check


def instances(ec2, *filters) -> list[dict]:
    pages = ec2.get_paginator("describe_instances").paginate(Filters=list(filters))
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


def one_line(proc) -> str:
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- 4. eventual consistency ----------------------------------------------------------------------


def test_new_ids_unknown_for_a_while_are_retried_at_launch_destroy_and_rollback(faults, nothing_left, ec2,
                                                                                 make_config, inv):
    faults.hide_new = 6.0  # longer than an `inv` takes to start, so destroy meets it too
    up = inv(make_config(), "cluster.launch", "--no-wait", "--yes")
    assert up.returncode == 0, up.stderr
    # The group's rules and its lock's release named the new group; each was retried until EC2 knew it.
    assert ("AuthorizeSecurityGroupIngress", "InvalidGroup.NotFound") in faults.injected
    down = inv(make_config(), "cluster.destroy", "--yes")
    assert down.returncode == 0, down.stderr
    assert ("TerminateInstances", "InvalidInstanceID.NotFound") in faults.injected
    assert "terminated 3 instances" in down.stdout
    nothing_left()

    # A failed launch terminates its just-launched master, which EC2 may not know yet either.
    faults.injected.clear()
    faults.hide_new, faults.no_capacity = 5.0, ("m5.large@us-west-2b",)
    failed = inv(make_config(availability_zone="us-west-2b", master_instance_type="m5.xlarge"), "cluster.launch",
                 "--no-wait", "--yes")
    assert one_line(failed).endswith("terminated the 1 instances it created")
    assert ("TerminateInstances", "InvalidInstanceID.NotFound") in faults.injected
    nothing_left()


# -- 5. capacity and quotas ------------------------------------------------------------------------


def test_a_zone_without_capacity_moves_the_whole_cluster_to_the_next(faults, nothing_left, ec2, make_config, inv):
    faults.no_capacity = ("m5.large@us-west-2a",)  # the master (m5.xlarge) fits there, the workers do not
    config = make_config(master_instance_type="m5.xlarge", nworkers=3)
    # A DryRun checks permissions and parameters, not capacity: the plan stands.
    dry = inv(config, "cluster.launch", "--dry-run")
    assert dry.returncode == 0 and "without capacity there, the whole cluster in us-west-2b" in dry.stdout
    up = inv(config, "cluster.launch", "--no-wait", "--yes")
    assert up.returncode == 0, up.stderr
    assert ("fb1: no capacity in us-west-2a (InsufficientInstanceCapacity); terminated the 1 instances launched "
            "there and launching the whole cluster in us-west-2b") in up.stderr
    running = instances(ec2, {"Name": "instance-state-name", "Values": LIVE})
    assert len(running) == 4 and {i["Placement"]["AvailabilityZone"] for i in running} == {"us-west-2b"}
    # The refusal was answered at once: one RunInstances per zone and role, no retries of an HTTP 500.
    assert faults.injected == [("RunInstances", "InsufficientInstanceCapacity")]
    assert inv(config, "cluster.destroy", "--yes").returncode == 0
    nothing_left()


def test_a_zone_the_config_names_has_no_fallback(faults, nothing_left, ec2, make_config, inv):
    faults.no_capacity = ("us-west-2c",)
    failed = inv(make_config(availability_zone="us-west-2c"), "cluster.launch", "--no-wait", "--yes")
    line = one_line(failed)
    assert line.startswith("launch of ec2 cluster 'fb1' failed: no capacity for the cluster in us-west-2c, the "
                           "zone availability_zone names (InsufficientInstanceCapacity: We currently do not have "
                           "sufficient m5.large capacity in the Availability Zone you requested (us-west-2c).")
    assert "retry later, or drop availability_zone from" in line
    assert re.search(r"; no instances were created; deleted the security group it created \(sg-[0-9a-f]+\)$", line)
    nothing_left()
    # A type the named zone does not offer is refused before anything is created.
    offered_not = inv(make_config(availability_zone="us-west-2d", instance_type="t2.nano"), "cluster.launch",
                      "--no-wait", "--yes")
    assert one_line(offered_not).endswith("availability_zone: t2.nano is not offered in us-west-2d; zones that offer "
                                          "t2.nano: us-west-2a, us-west-2b, us-west-2c")
    nothing_left()


@pytest.mark.parametrize("code, says", [
    ("VcpuLimitExceeded", "your on-demand vCPU quota in us-west-2 is too small for this launch"),
    ("MaxSpotInstanceCountExceeded", "or launch the workers on demand (spot: false)"),
    ("PendingVerification", "AWS is still verifying your account for us-west-2 and launches nothing until it is "
                            "done"),
    ("OptInRequired", "accept the AMI's terms in AWS Marketplace or opt in to us-west-2"),
    ("InsufficientReservedInstanceCapacity", "no capacity for the cluster in any zone that offers the types"),
    ("UnfulfillableCapacity", "no capacity for the cluster in any zone that offers the types"),
])
def test_each_launch_refusal_is_one_line_saying_what_to_do(faults, nothing_left, ec2, make_config, inv, code, says):
    faults.refuse["RunInstances"] = code
    failed = inv(make_config(spot=True), "cluster.launch", "--no-wait", "--yes")
    assert failed.returncode == 1
    *moves, line = failed.stderr.strip().splitlines()
    assert says in line and f"({code}: " in line and "no instances were created" in line
    # A capacity answer is about a zone: the cluster was tried in each zone that offers the types, saying so.
    zones = 4 if code in ("InsufficientReservedInstanceCapacity", "UnfulfillableCapacity") else 1
    assert moves == [f"fb1: no capacity in us-west-2{a} ({code}); launching the whole cluster in us-west-2{b}"
                     for a, b in ("ab", "bc", "cd")][:zones - 1]
    # Never retried in the same zone (botocore would retry EC2's HTTP 500 for a minute).
    assert faults.injected == [("RunInstances", code)] * zones
    nothing_left()


def test_vcpu_quotas_fail_the_dry_run_and_the_launch_before_any_instance(faults, nothing_left, ec2, make_config, inv):
    faults.vcpu_quota = 8  # 1 + 4 m5.large = 10 vCPUs
    config = make_config(nworkers=4)
    dry = inv(config, "cluster.launch", "--dry-run")
    assert dry.returncode == 1 and dry.stderr.strip() == "dry run: 1 check(s) say the launch would fail (FAILS above)"
    assert ("  FAILS      on-demand vCPUs: the cluster needs 10, 0 of your 8 (L-1216C47A) are in use: ask for at "
            "least 10 in Service Quotas ('Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances'), or use "
            "fewer or smaller instances") in dry.stdout.splitlines()
    up = inv(config, "cluster.launch", "--no-wait", "--yes")
    assert one_line(up).startswith("launch of ec2 cluster 'fb1' would fail, nothing was created: on-demand vCPUs")
    nothing_left()

    # What others already run in the account counts; spot workers against the spot quota.
    faults.vcpu_quota, faults.spot_vcpu_quota = DEFAULT_QUOTA, 5
    ms.client().run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="c5.large", MinCount=1, MaxCount=1,
                              InstanceMarketOptions={"MarketType": "spot"})
    dry = inv(make_config(spot=True), "cluster.launch", "--dry-run")
    assert dry.returncode == 1
    assert ("  FAILS      spot vCPUs: the cluster needs 4, 2 of your 5 (L-34B43A08) are in use: ask for at least 6 "
            "in Service Quotas") in dry.stdout
    assert "  checked    on-demand vCPUs: the cluster needs 2, 0 of your 1152 (L-1216C47A) are in use" in dry.stdout


def test_the_twins_quota_is_enforced_by_runinstances(faults, nothing_left, ec2):
    faults.vcpu_quota = 4
    ec2.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="m5.large", MinCount=2, MaxCount=2)
    with pytest.raises(Exception, match="VcpuLimitExceeded"):
        ec2.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="m5.large", MinCount=1, MaxCount=1)


# -- 6. what the dry run checks ----------------------------------------------------------------------


def test_the_dry_run_fails_what_would_fail_the_launch(faults, nothing_left, ec2, make_config, inv):
    arm = inv(make_config(instance_type="m6g.large"), "cluster.launch", "--dry-run")
    assert arm.returncode == 1
    assert (f"  FAILS      {ms.UBUNTU_AMI} is an x86_64 image and m6g.large runs arm64: choose an x86_64 instance "
            f"type or an image built for arm64") in arm.stdout.splitlines()
    assert "  checked    m5.large" not in arm.stdout  # the master is m6g.large too

    no_key = inv(make_config(key_name="nobody"), "cluster.launch", "--dry-run")
    assert no_key.returncode == 1 and "  FAILS      key pair 'nobody' does not exist in us-west-2" in no_key.stdout

    # EC2 validates a DryRun's parameters before its permissions: an invalid launch is a failure, not unchecked.
    faults.refuse["RunInstances"] = "InvalidParameterCombination"
    invalid = inv(make_config(), "cluster.launch", "--dry-run")
    assert invalid.returncode == 1 and "dry run: 2 check(s)" in invalid.stderr
    assert "  FAILS      RunInstances (master): EC2 RunInstances failed in us-west-2 (InvalidParameterCombination" \
        in invalid.stdout
    faults.refuse.clear()

    fine = inv(make_config(), "cluster.launch", "--dry-run")
    assert fine.returncode == 0, fine.stdout + fine.stderr
    lines = fine.stdout.splitlines()
    assert "  checked    key pair alice exists" in lines
    assert f"  checked    m5.large runs x86_64 like {ms.UBUNTU_AMI}" in lines
    assert "  checked    on-demand vCPUs: the cluster needs 6, 0 of your 1152 (L-1216C47A) are in use" in lines
    assert any(line.startswith("  subnet     subnet-") and "in us-west-2a" in line and "the whole cluster in "
               "us-west-2b, us-west-2c, us-west-2d, in this order" in line for line in lines)
    # GetConsoleOutput needs an instance of the cluster to be asked about: before a launch there is none.
    assert not [line for line in lines if ("FAILS" in line or "unchecked" in line) and "GetConsoleOutput" not in line]
    nothing_left()


# -- 10. throttling --------------------------------------------------------------------------------


def lifecycle_requests(cfg, settings) -> int:
    """EC2 requests (retries included) of launch --no-wait, status and destroy."""
    counter = ms.Injector()
    try:
        assert len(lib.launch(cfg, settings=settings, wait=False).info.workers) == cfg.nworkers
        assert len(lib.status(cfg, settings=settings)) == 1 + cfg.nworkers
        lib.destroy(cfg, settings=settings)
    finally:
        counter.close()
    return counter.count()


def test_a_throttled_1_plus_63_lifecycle_succeeds(faults, nothing_left, ec2, make_config, tmp_path):
    cfg = load_config(make_config(nworkers=63, instance_type="c5.xlarge"))
    settings = Settings(servers_dir=str(tmp_path / "servers"), state_dir=str(tmp_path / "state"))
    calm = lifecycle_requests(cfg, settings)
    faults.throttle = (4, 4.0)  # a burst of 4, then 4 requests a second
    try:
        throttled = lifecycle_requests(cfg, settings)
    finally:
        faults.throttle = None
    assert faults.injected and {code for _, code in faults.injected} == {"RequestLimitExceeded"}
    # Every throttled request was retried until it went through; nothing else changed.
    assert throttled == calm + len(faults.injected)
    nothing_left()


# -- 11. money ----------------------------------------------------------------------------------


def test_burstable_types_launch_with_standard_credits_unless_the_config_says(faults, nothing_left, ec2, make_config,
                                                                            tmp_path):
    settings = Settings(servers_dir=str(tmp_path / "servers"), state_dir=str(tmp_path / "state"))
    counter = ms.Injector()
    try:
        lib.launch(load_config(make_config(instance_type="t3.micro", master_instance_type="m5.large", nworkers=1)),
                   settings=settings, wait=False)
        lib.launch(load_config(make_config(cluster_name="fb2", instance_type="t3.micro", cpu_credits="unlimited",
                                           nworkers=1, spot=True)), settings=settings, wait=False)
        lib.status(load_config(make_config(cluster_name="fb2", spot=True)), settings=settings)
    finally:
        counter.close()
    runs = [p for a, p in counter.calls if a == "RunInstances"]
    assert [(p["InstanceType"], p.get("CreditSpecification.CpuCredits")) for p in runs] == [
        ("m5.large", None), ("t3.micro", "standard"), ("t3.micro", "unlimited"), ("t3.micro", "unlimited")]
    (history,) = [p for a, p in counter.calls if a == "DescribeSpotPriceHistory"]
    assert history["StartTime"].startswith(f"{datetime.now(timezone.utc):%Y-%m-%dT}")
    for name in ("fb1", "fb2"):
        lib.destroy(load_config(make_config(cluster_name=name)), settings=settings)
    nothing_left()
    with pytest.raises(Exception, match="key 'cpu_credits': expected 'standard' or 'unlimited'"):
        load_config(make_config(cpu_credits="surplus"))


def test_the_dry_run_prices_the_configs_region(faults, nothing_left, make_config, inv):
    ms.seed(ms.client("us-west-1"))
    dry = inv(make_config(region="us-west-1", nworkers=3), "cluster.launch", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    # 4 x m5.large at the us-west-1 list price (1.17 x us-east-1's $0.096).
    assert f"  cost       ${4 * 0.096 * 1.17:,.2f}/hour on demand in us-west-1" in dry.stdout


def test_a_node_of_unknown_price_makes_the_budget_unenforceable(make_config):
    cfg = load_config(make_config(budget=10))
    rows = [NodeStatus(role="master", id="i-1", name="m", host="h", type="m5.large", state="running", uptime_s=1.0,
                       ttl_left_s=None, cost="$9.00", cost_usd=9.0, hourly_usd=1.0),
            NodeStatus(role="worker", id="i-2", name="w", host="h", type="x9.huge", state="running", uptime_s=1.0,
                       ttl_left_s=None, cost="unknown", cost_usd=None, hourly_usd=None)]
    said = ("the $10.00 budget of 'fb1' cannot be enforced: 1 of its 2 nodes are of unknown price (x9.huge); "
            "launch listed types or drop `budget`")
    assert budget.warning(cfg, rows) == said and budget.would_cross(cfg, rows, seconds=1) == said
    assert budget.warning(cfg, rows[:1]) is not None  # $9 of $10: past 80 %
    assert budget.warning(replace(cfg, budget=None), rows) is None


class Pages:
    """A client whose paginators answer two pages, as EC2 does past 1000 items (or MaxResults)."""

    def __init__(self, key: str):
        self.key = key
        self.asked: list[tuple[str, dict]] = []

    def get_paginator(self, name: str):
        outer = self

        class Paginator:
            def paginate(self, **kwargs):
                outer.asked.append((name, kwargs))
                return [{outer.key: [{"n": 1}]}, {outer.key: [{"n": 2}]}]

        return Paginator()


def test_describes_of_volumes_images_and_snapshots_read_every_page():
    volumes = Pages("Volumes")
    assert ec2_cost.describe_volumes(volumes, Scope(cluster="c", owner="o")) == [{"n": 1}, {"n": 2}]
    images = Pages("Images")
    assert ec2_images.describe_images(images, Owners=["self"]) == [{"n": 1}, {"n": 2}]
    assert images.asked == [("describe_images", {"Owners": ["self"]})]
