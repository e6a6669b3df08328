"""A whole `inv cluster.launch` (SSH wait, TTL check, copy-dns) on the booting EC2 twin while EC2 fails as it
does every day: new ids unknown for a while, no capacity in the first zone, throttling. The cluster must
come up whole in the next zone, run a command, and go away leaving nothing in the account.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import moto_server as ms  # before anything imports moto
import pytest
from conftest import INV, REPO, no_traceback
from twin import Twin
from twin.faults import Faults

KEY_NAME = "fb-faults"
NAME = f"fb-faults-{os.getpid() % 100000}"


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", KEY_NAME, "-f", str(folder / "key")],
                   check=True)
    return folder / "key", (folder / "key.pub").read_text()


def test_a_cluster_comes_up_whole_in_the_next_zone_through_every_fault(key, tmp_path):
    faults = Faults(hide_new=3.0, no_capacity=("m5.large@us-west-2a",), throttle=(4, 4.0))
    private, public = key
    with Twin(faults=faults) as twin:
        ec2 = twin.client()
        ec2.import_key_pair(KeyName=KEY_NAME, PublicKeyMaterial=public.encode())
        config = tmp_path / f"{NAME}.json"
        config.write_text(json.dumps({
            "cluster_name": NAME, "provider": "ec2", "region": ms.REGION, "ami": ms.UBUNTU_AMI, "key_name": KEY_NAME,
            "ssh_key": str(private), "user": "ubuntu", "instance_type": "m5.large",
            "master_instance_type": "m5.xlarge", "nworkers": 2, "ssh_cidr": "127.0.0.1/32", "ttl": "1h"}))
        env = twin.env()
        env.update(INVOKE_CLOISTER_SERVERS_DIR=str(tmp_path / "servers"),
                   INVOKE_CLOISTER_STATE_DIR=str(tmp_path / "st"), INVOKE_CLOISTER_CONFIG=str(config))

        def inv(*args: str) -> subprocess.CompletedProcess:
            proc = subprocess.run([INV, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            no_traceback(proc)
            return proc

        up = inv("cluster.launch", "--yes")
        assert up.returncode == 0, up.stderr
        assert (f"{NAME}: no capacity in us-west-2a (InsufficientInstanceCapacity); terminated the 1 instances "
                f"launched there and launching the whole cluster in us-west-2b") in up.stderr
        live = [i for r in ec2.describe_instances(Filters=[{"Name": "instance-state-name",
                                                            "Values": ["pending", "running"]}])["Reservations"]
                for i in r["Instances"]]
        assert len(live) == 3 and {i["Placement"]["AvailabilityZone"] for i in live} == {"us-west-2b"}
        ran = inv("cluster.run", "hostname")
        assert ran.returncode == 0 and ran.stdout.count("ip-127-0-") >= 1, ran.stdout + ran.stderr
        down = inv("cluster.destroy", "--yes")
        assert down.returncode == 0 and "terminated 3 instances" in down.stdout, down.stderr
        injected = {code for _, code in faults.injected}
        assert {"InvalidGroup.NotFound", "InsufficientInstanceCapacity", "RequestLimitExceeded"} <= injected, \
            faults.injected
        faults.throttle = None
        left = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
                if i["State"]["Name"] != "terminated"]
        groups = [g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"]
        volumes = ec2.describe_volumes()["Volumes"]
        assert (left, groups, volumes) == ([], [], [])
        assert not [m for m in twin.machines.values() if m.running]
