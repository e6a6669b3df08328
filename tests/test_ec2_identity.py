"""EC2 as it fails, on the twin, through `inv`: who the caller is, who else shares the account, what the
policy must allow, a launch nobody watches, a node that booted but SSH cannot reach, a spot worker EC2
takes back.

The twin (tests/twin) answers STS too: a config whose profile assumes a role (identity.py) gets a new
session name in every process, as boto3 and the AWS CLI do. Every request moto answers is recorded, so
the last test compares what the code sent with the IAM policy it documents. After each fault the
account is checked for leftovers (instances, security groups, volumes, snapshots).
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import moto_server as ms  # before anything imports moto
import paramiko
import pytest
from conftest import no_traceback, slow
from test_ec2_twin import KEY_NAME, SUFFIX, Ec2Cluster, Keys, describe, table_rows, tags
from twin import Twin, firewall
from twin.identity import ACCOUNT, SOURCE_KEY, sessions

from cloister.providers.ec2 import permissions

NAME = f"ia-{SUFFIX}"  # one cluster name, two owners
RESEARCHER = f"arn:aws:iam::{ACCOUNT}:role/researcher"
VISITOR = f"arn:aws:iam::{ACCOUNT}:role/visitor"
DSUM = Path(__file__).resolve().parent.parent / "examples" / "dsum"
BOOT_STALL = 30  # seconds of a still console before the watcher judges (the default, 120, allows slow real AMIs)
# Never called for real here: moto answers placement-group calls with HTTP 500 (test_ec2.py covers them),
# and a relaunch revokes an SSH source only when ssh_cidr changed.
NOT_EXERCISED = {"CreatePlacementGroup", "DeletePlacementGroup", "DescribePlacementGroups",
                 "RevokeSecurityGroupIngress"}

pytestmark = slow


def make_keys(directory: Path, comment: str) -> Keys:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    generated = Ed25519PrivateKey.generate()
    pem = generated.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    public = generated.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    path = directory / f"{comment}.pem"
    path.write_text(pem)
    path.chmod(0o600)
    return Keys(path=path, public=f"{public} {comment}", pkey=paramiko.Ed25519Key.from_private_key(io.StringIO(pem)))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"), KEY_NAME)


@pytest.fixture(scope="module")
def twin(keys):
    with Twin() as running:
        running.client().import_key_pair(KeyName=KEY_NAME, PublicKeyMaterial=keys.public.encode())
        yield running


@pytest.fixture(scope="module")
def ec2(twin):
    return twin.client()


@dataclass
class RoleCluster(Ec2Cluster):
    """A cluster whose `inv` reaches AWS through a profile that assumes ``role`` (no fixed keys)."""

    role: str = ""

    def env(self) -> dict[str, str]:
        env = super().env()
        return self.twin.profile_env(self.root / "aws", role=self.role) | {
            k: v for k, v in env.items() if not k.startswith("AWS_")} if self.role else env

    def set_config(self, **values) -> None:
        self.config_path.write_text(json.dumps({**json.loads(self.config_path.read_text()), **values}, indent=2))


def destroy(cluster: Ec2Cluster) -> None:
    cluster.inv("cluster.destroy", "--yes", timeout=180)


def account_leftovers(ec2, twin: Twin, *names: str) -> dict[str, list[str]]:
    """What the clusters ``names`` left in the account: live instances, groups, volumes, snapshots,
    images, and machines still running."""
    tagged = [{"Name": "tag:cloister:cluster", "Values": list(names)}]
    instances = [i for i in describe(ec2, *tagged) if i["State"]["Name"] != "terminated"]
    every = [i["InstanceId"] for i in describe(ec2, *tagged)]
    return {
        "instances": [f"{i['InstanceId']} {i['State']['Name']}" for i in instances],
        "groups": [g["GroupName"] for g in ec2.describe_security_groups(Filters=tagged)["SecurityGroups"]],
        "volumes": [v["VolumeId"] for v in ec2.describe_volumes(Filters=tagged)["Volumes"]],
        "snapshots": [s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "tag-key", "Values": ["cloister:ami-tag"]}])["Snapshots"]],
        "images": [i["Name"] for i in ec2.describe_images(Owners=["self"])["Images"]],
        "machines": [i for i in every if i in twin.machines and twin.machine(i).running],
    }


def assert_nothing_left(ec2, twin: Twin, *names: str) -> None:
    left = account_leftovers(ec2, twin, *names)
    assert not any(left.values()), left


# -- the clusters -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unwatched(twin, keys, tmp_path_factory):
    """Launches nobody watches (stdin is no terminal) of nodes that boot but SSH cannot get in: with
    ssh_key the private key of another key pair than key_name, as cron would run it ("cron") and with
    --keep-on-failure ("kept"); and behind a security group that refuses this machine ("fenced"). In the
    background from the start, so their waits overlap the other tests."""
    root = tmp_path_factory.mktemp("unwatched")
    wrong = make_keys(root, "not-the-key-pair")
    env = {"INVOKE_CLOISTER_BOOT_STALL": str(BOOT_STALL)}
    made = {}
    undo = firewall.refuse_public_ssh(twin, cluster=f"ia-fenced-{SUFFIX}")
    for label, key, flags in (("cron", wrong, ()), ("kept", wrong, ("--keep-on-failure",)), ("fenced", keys, ())):
        cluster = RoleCluster(twin, key, root / label, f"ia-{label}-{SUFFIX}", {"nworkers": 0, "ttl": "1h"},
                              extra_env=env, role="researcher")
        made[label] = (cluster, cluster.background("cluster.launch", *flags))
    try:
        yield made
    finally:
        undo()
        for cluster, launch in made.values():
            launch.kill()
            destroy(cluster)


@pytest.fixture(scope="module")
def researcher(twin, keys, unwatched, tmp_path_factory):
    """A master and a spot worker, launched through a profile that assumes the role 'researcher'."""
    cluster = RoleCluster(twin, keys, tmp_path_factory.mktemp("researcher"), NAME,
                          {"nworkers": 1, "spot": True, "ttl": "1h"}, role="researcher")
    cluster.launch = cluster.inv("cluster.launch", timeout=300)
    try:
        yield cluster
    finally:
        destroy(cluster)


@pytest.fixture(scope="module")
def visitor(twin, keys, researcher, tmp_path_factory):
    """Someone else of the account (role 'visitor') who names a cluster the same; launched by its test."""
    cluster = RoleCluster(twin, keys, tmp_path_factory.mktemp("visitor"), NAME,
                          {"nworkers": 0, "ttl": "1h", "ami_tag": f"ia-img-{SUFFIX}"}, role="visitor")
    try:
        yield cluster
    finally:
        destroy(cluster)


# -- 1. an identity that stays put --------------------------------------------------------------


def test_an_assumed_roles_owner_stays_put_from_one_process_to_the_next(researcher, twin, ec2):
    proc = researcher.launch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    live = researcher.instances(ec2, "running")
    assert len(live) == 2 and {tags(i)["cloister:owner"] for i in live} == {RESEARCHER}
    assert json.loads((researcher.servers_dir / "cluster.json").read_text())["region"] == ms.REGION

    proc = researcher.inv("cluster.status")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    assert sorted(r["id"] for r in table_rows(proc.stdout)) == sorted(i["InstanceId"] for i in live)
    # Every process had a session of its own (the launch, the status, the unwatched launches beside them):
    # the owner stayed the role's.
    named = sessions("researcher")
    assert len(set(named)) == len(named) >= 3, named
    assert all(re.fullmatch(rf"arn:aws:sts::{ACCOUNT}:assumed-role/researcher/botocore-session-\d+", s) for s in named)

    proc = researcher.inv("cluster.list")
    assert proc.returncode == 0 and NAME in proc.stdout, proc.stdout + proc.stderr
    proc = researcher.inv("cluster.launch", timeout=120)
    assert proc.returncode == 0 and f"found running ec2 cluster '{NAME}'" in proc.stdout, proc.stdout + proc.stderr


# -- 2. two owners, one cluster name ------------------------------------------------------------


def test_two_owners_of_one_account_both_launch_the_same_name_and_see_only_their_own(researcher, visitor, twin, ec2):
    proc = visitor.inv("cluster.launch", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mine = {o: sorted(i["InstanceId"] for i in researcher.instances(ec2, "running") if tags(i)["cloister:owner"] == o)
            for o in (RESEARCHER, VISITOR)}
    assert [len(v) for v in mine.values()] == [2, 1]
    for cluster, owner in ((researcher, RESEARCHER), (visitor, VISITOR)):
        proc = cluster.inv("cluster.status")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert sorted(r["id"] for r in table_rows(proc.stdout)) == mine[owner]
    groups = ec2.describe_security_groups(Filters=[{"Name": "tag:cloister:cluster", "Values": [NAME]}])
    assert sorted(tags(g)["cloister:owner"] for g in groups["SecurityGroups"]) == [RESEARCHER, VISITOR]


# -- 8 and 7. booted but unreachable, and nobody to ask -------------------------------------------


def test_a_node_that_booted_but_ssh_cannot_reach_is_named_so_and_an_unwatched_launch_ends_it(unwatched, twin, ec2):
    results = {label: (cluster, launch.result(timeout=240)) for label, (cluster, launch) in unwatched.items()}
    for label, (cluster, proc) in results.items():
        assert proc.returncode == 1, (label, proc.stdout + proc.stderr)
        no_traceback(proc)
        text = " ".join(proc.stderr.split())
        assert "booted (its console shows" in text and "SSH does not get in: check that ssh_cidr" in text, text
        assert f"ssh_key is the private key of key pair {KEY_NAME}" in text, text
        # What SSH said last: a refused key, or (an sshd busy with the retries) a dropped connection.
        said = "SSH said: connection refused" if label == "fenced" else "SSH said: "
        assert said in text and "boot hangs" not in text, text
    for label, (_, proc) in results.items():
        print(f"\n[{label}] {proc.stderr}")
    for label in ("cron", "fenced"):
        cluster, proc = results[label]
        assert "terminated the 1 instances it created" in proc.stderr, proc.stderr
        assert not cluster.instances(ec2, "pending", "running", "stopping", "stopped")
        assert not (cluster.servers_dir / "cluster.json").exists()
        assert_nothing_left(ec2, twin, cluster.name)

    kept, proc = results["kept"]
    assert "left 1 instances running" in proc.stderr, proc.stderr
    assert len(kept.instances(ec2, "running")) == 1
    proc = kept.inv("cluster.destroy", "--yes", timeout=180)
    assert proc.returncode == 0 and proc.stdout.startswith("terminated 1 instances"), proc.stdout + proc.stderr
    assert_nothing_left(ec2, twin, kept.name)


# -- 9. spot reclaimed -----------------------------------------------------------------------------


def test_a_reclaimed_spot_worker_is_named_by_status_and_by_the_run_that_lost_it(researcher, twin, ec2):
    proc = researcher.inv("cluster.put", f"{DSUM}/", "clamor/experiments/cpp/dsum/", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = researcher.servers()
    (worker,) = info.workers
    twin.reclaim(worker.id)
    deadline = time.monotonic() + 60
    while describe(ec2, {"Name": "instance-id", "Values": [worker.id]})[0]["State"]["Name"] != "terminated":
        assert time.monotonic() < deadline, "the reclaimed worker never became terminated"
        time.sleep(0.2)
    assert not twin.machine(worker.id).running and not twin.machine(worker.id).dir.exists()

    proc = researcher.inv("cluster.status")
    print(f"\n[status after reclaim] {proc.stdout}{proc.stderr}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    rows = {r["id"]: r for r in table_rows(proc.stdout)}
    assert rows[worker.id]["state"] == "gone" and rows[info.master.id]["state"] == "running", proc.stdout
    said = " ".join(proc.stderr.split())
    assert said.startswith(f"1/2 nodes gone: {worker.name} ({worker.id}) terminated "
                           f"(Server.SpotInstanceTermination): EC2 reclaimed the spot instance"), said

    proc = researcher.inv("exp.run", "--benchmark", "dsum", "-k", "1", "-p", "1", timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    (run_dir,) = (researcher.runs_dir / "dsum").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    print(f"\n[exp.run after reclaim] {proc.stderr}\nrun.json failures: {record['failures']}")
    assert record["status"] == "failed", record
    assert "node gone: terminated (Server.SpotInstanceTermination)" in record["failures"][worker.host], record
    assert "Server.SpotInstanceTermination" in proc.stderr, proc.stderr

    proc = researcher.inv("cluster.destroy", "--yes", timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"terminated 1 instances of ec2 cluster '{NAME}': 1 master"), proc.stdout
    assert not (researcher.servers_dir / "cluster.json").exists()
    # The visitor's cluster of the same name is untouched.
    assert [tags(i)["cloister:owner"] for i in researcher.instances(ec2, "running")] == [VISITOR]


# -- 3. IAM that matches the calls ------------------------------------------------------------------


def test_the_policy_allows_exactly_what_the_code_sends(visitor, twin, ec2):
    """The visitor's cluster lives a whole life (dry run, status, extend, stop, start, images, reap, destroy);
    every EC2 operation the twin received in this module must be in the policy, and every action of the
    policy must have been sent."""
    steps = [("cluster.launch", "--dry-run"), ("cluster.status",), ("cluster.extend", "--ttl", "2h"),
             ("cluster.stop",), ("cluster.start",)]
    for step in steps:
        proc = visitor.inv(*step, timeout=300)
        assert proc.returncode == 0, (step, proc.stdout + proc.stderr)
    visitor.set_config(ami_instance_ip=visitor.servers().master.host)
    for step in [("ami.create", "--no-reboot"), ("ami.list",), ("ami.latest",), ("ami.prune", "--keep", "0", "--yes"),
                 ("cluster.list", "--reap"), ("cluster.destroy", "--yes")]:
        proc = visitor.inv(*step, timeout=300)
        assert proc.returncode == 0, (step, proc.stdout + proc.stderr)
    assert_nothing_left(ec2, twin, NAME)

    # cloister's requests: those made with a role's session keys (ASIA...) or the profile's source key
    # (AssumeRole), not with this test's own client's.
    ours = [r for r in twin.requests.seen if r.access_key.startswith("ASIA") or r.access_key == SOURCE_KEY]
    sent = {r.action for r in ours if r.service == "ec2"}
    real = {r.action for r in ours if r.service == "ec2" and not r.dry_run}
    policy = set(permissions.EC2_ACTIONS)
    assert sent <= policy, sorted(sent - policy)  # nothing the policy would refuse
    assert policy - real <= NOT_EXERCISED, sorted(policy - real - NOT_EXERCISED)
    assert policy - sent <= NOT_EXERCISED - {"RevokeSecurityGroupIngress"}  # the dry run asked about it
    # STS: the profile's AssumeRole and the owner's GetCallerIdentity, which no policy can deny.
    assert {r.action for r in ours if r.service == "sts"} == {"AssumeRole", "GetCallerIdentity"}
