"""The EC2 twin (tests/twin, issue 10 items 1 and 4): instances behind moto's API really boot.

Every test boots real machines (systemd, cloud-init, sshd on loopback) and talks to them over SSH as
``ubuntu`` with the key pair's private key, as one would on EC2.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import paramiko
import pytest

import moto_server as ms  # before anything imports moto
from twin import Twin
from twin.addresses import is_loopback
from twin.machine import BOOT_SH

from conftest import REPO

BOOT_TIMEOUT = 60.0  # generous: the suite shares 2 cores; a boot alone takes ~3 s

# The TTL user data cloister sent until the providers split (commit f9a0a11, cloister/ec2.py): the
# timer keeps systemd's default dependencies, so systemd-run waits in cloud-init's init stage for
# sysinit.target, which waits for that stage.
DEADLOCKING_TTL = """\
#cloud-config
bootcmd:
  - |
    left=$(( {epoch} - $(date +%s) ))
    [ "$left" -gt 60 ] || left=60
    systemd-run --unit=cloister-ttl --on-active="$left" /bin/systemctl poweroff
"""
# The fix: the timer leaves boot's ordering alone, and fires on the second.
FIXED_TTL = """\
#cloud-config
bootcmd:
  - |
    systemd-run --unit=cloister-ttl --timer-property=DefaultDependencies=no \\
      --timer-property=AccuracySec=1s --on-active={seconds} /bin/systemctl poweroff
"""


@dataclass(frozen=True)
class Key:
    public: str
    private: paramiko.PKey


@pytest.fixture(scope="module")
def key() -> Key:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    generated = Ed25519PrivateKey.generate()
    pem = generated.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    public = generated.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return Key(public=f"{public} twin-test", private=paramiko.Ed25519Key.from_private_key(io.StringIO(pem)))


@pytest.fixture(scope="module")
def twin(key):
    with Twin() as running:
        running.client().import_key_pair(KeyName="twin", PublicKeyMaterial=key.public.encode())
        yield running


@pytest.fixture(scope="module")
def ec2(twin):
    return twin.client()


def launch(ec2, user_data: str = "", count: int = 1, **kwargs) -> list[str]:
    answer = ec2.run_instances(ImageId=kwargs.pop("ImageId", ms.UBUNTU_AMI), MinCount=count, MaxCount=count,
                               KeyName="twin", InstanceType="t3.micro", UserData=user_data, **kwargs)
    return [i["InstanceId"] for i in answer["Instances"]]


def describe(ec2, instance_id: str) -> dict:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def wait_state(ec2, instance_id: str, state: str, timeout: float = 40.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        found = describe(ec2, instance_id)
        if found["State"]["Name"] == state or time.monotonic() > end:
            assert found["State"]["Name"] == state, found["State"]
            return found
        time.sleep(0.3)


def ssh(host: str, key: Key, command: str) -> tuple[int, str, paramiko.PKey]:
    """Run ``command`` as ubuntu on ``host``: exit status, output, the host's key."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(host, username="ubuntu", pkey=key.private, timeout=15, allow_agent=False, look_for_keys=False)
    try:
        host_key = client.get_transport().get_remote_server_key()
        _, out, _ = client.exec_command(command, timeout=60)
        status = out.channel.recv_exit_status()
        return status, out.read().decode(), host_key
    finally:
        client.close()


def addresses_in(value, key: str = ""):
    """Every (field, value) of a DescribeInstances item that is an IP address or DNS name."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from addresses_in(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from addresses_in(v, key)
    elif isinstance(value, str) and key.endswith(("IpAddress", "PublicIp", "DnsName")):
        yield key, value


def assert_loopback_only(found: dict) -> None:
    fields = list(addresses_in(found))
    assert any(k == "PrivateIpAddress" for k, _ in fields), fields
    assert all(is_loopback(v) for _, v in fields), fields


def test_twin_cleans_up_after_a_failing_test(key):
    """A twin whose block raises still ends its machines and leaves no process, mount, cgroup, claim or
    file behind (run in a process of its own, as only one twin may run per process)."""
    script = f"""
import json
from twin import Twin
with Twin() as twin:
    ec2 = twin.client()
    ec2.import_key_pair(KeyName="k", PublicKeyMaterial={key.public!r}.encode())
    answer = ec2.run_instances(ImageId="{ms.UBUNTU_AMI}", MinCount=1, MaxCount=1, KeyName="k")
    iid = answer["Instances"][0]["InstanceId"]
    machine = twin.machine(iid)
    assert machine.wait_ssh({BOOT_TIMEOUT})
    print(json.dumps({{"id": iid, "pid": machine.init_pid, "dir": str(twin.dir), "address": machine.address,
                      "subnets": twin.pool.subnets}}), flush=True)
    raise RuntimeError("the test failed")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", check=False, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode != 0 and "the test failed" in proc.stderr, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert not Path(f"/proc/{seen['pid']}").exists()
    assert not Path(seen["dir"]).exists()
    assert seen["dir"] not in Path("/proc/self/mountinfo").read_text()
    claims = Path("/tmp/cloister-local-claims")
    assert not any((claims / str(s)).exists() and (claims / str(s)).read_text() == seen["dir"]
                   for s in seen["subnets"])
    assert not [path for path, dirs, _ in os.walk("/sys/fs/cgroup") if seen["id"] in dirs]
    with socket.socket() as probe:
        assert probe.connect_ex((seen["address"], 22)) != 0


def test_boot_refuses_without_its_own_pid_namespace_or_with_cap_sys_boot(tmp_path):
    """The last stage before systemd checks what keeps the machine safe; here it must refuse (and so
    never reach chroot/systemd): first in the machine's PID namespace, then in a new one but with
    the full bounding set."""
    boot = ["/bin/sh", str(BOOT_SH), "exec", str(tmp_path), os.readlink("/proc/self/ns/pid")]
    here = subprocess.run(boot, check=False, capture_output=True, text=True, timeout=30)
    assert here.returncode == 1 and "refusing to boot: not PID 1" in here.stderr, here.stderr
    own = subprocess.run(["unshare", "--pid", "--fork", *boot], check=False, capture_output=True, text=True,
                         timeout=30)
    assert own.returncode == 1 and "refusing to boot: capability sys_boot" in own.stderr, own.stderr


def test_twin_runs_as_a_server_of_its_own(tmp_path, key):
    """`python -m twin` (for a demo): exports for the endpoint in an env file, the key pair imported;
    SIGTERM ends it cleanly."""
    (tmp_path / "key.pub").write_text(key.public)
    env_file = tmp_path / "twin.env"
    server = subprocess.Popen([sys.executable, "-m", "twin", "--import-key", "demo", str(tmp_path / "key.pub"),
                               "--env-file", str(env_file)], cwd=REPO / "tests", stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 60
        while not env_file.exists() and server.poll() is None and time.monotonic() < end:
            time.sleep(0.1)
        exports = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                       for line in env_file.read_text().splitlines())
        ec2 = boto3.session.Session().client(
            "ec2", region_name=exports["AWS_DEFAULT_REGION"], endpoint_url=exports["AWS_ENDPOINT_URL_EC2"],
            aws_access_key_id=exports["AWS_ACCESS_KEY_ID"], aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        assert [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]] == ["demo"]
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=60)
    assert server.returncode == 0, errors
    assert not env_file.exists()


def test_four_instances_boot_with_cloud_init_and_ssh(twin, ec2, key):
    user_data = "#cloud-config\nruncmd:\n  - echo ran > /home/ubuntu/runcmd\n"
    ids = launch(ec2, user_data, count=4)
    assert all(twin.machine(i).wait_ssh(BOOT_TIMEOUT) for i in ids), [twin.console(i)[-3000:] for i in ids]
    found = [describe(ec2, i) for i in ids]
    for item in found:
        assert_loopback_only(item)
    host_keys, hostnames = set(), set()
    for item in found:
        status, out, host_key = ssh(item["PublicDnsName"], key, "cloud-init status --wait >/dev/null; "
                                    "hostname; cat ~/runcmd; sudo -n systemctl is-system-running --wait")
        assert status == 0, out
        hostname, runcmd, system = out.split()
        assert (runcmd, system) == ("ran", "running")
        hostnames.add(hostname)
        host_keys.add(host_key.asbytes())
    assert len(hostnames) == 4 and socket.gethostname() not in hostnames
    assert len(host_keys) == 4  # cloud-init made each instance its own host keys
    console = ec2.get_console_output(InstanceId=ids[0])["Output"]
    assert "Cloud-init v." in console and "Started ssh.service" in console
    ec2.terminate_instances(InstanceIds=ids)


def test_instances_are_isolated_from_the_machine(twin, ec2, key):
    """systemd is PID 1 of its own PID namespace without CAP_SYS_BOOT (nor the capabilities that reach the
    shared kernel); /proc/sys and /sys are read-only; /dev holds no disk of the machine."""
    (instance_id,) = launch(ec2)
    assert twin.machine(instance_id).wait_ssh(BOOT_TIMEOUT)
    status, out, _ = ssh(twin.machine(instance_id).address, key,
                         "cat /proc/1/comm; sed -n 's/^CapBnd:\\s*//p' /proc/1/status; "
                         "findmnt -no OPTIONS /proc/sys; findmnt -no OPTIONS /sys; ls /dev")
    assert status == 0, out
    comm, bounding, proc_sys, sys_fs, *devices = out.split()
    assert comm == "systemd"
    for bit in (22, 16, 25, 12):  # sys_boot, sys_module, sys_time, net_admin
        assert not int(bounding, 16) >> bit & 1, bit
    assert proc_sys.startswith("ro,") and sys_fs.startswith("ro,")
    assert not [d for d in devices if d.startswith(("vd", "sd", "nvme", "loop", "kmsg", "mem"))], devices
    # The network namespace is the machine's: root inside may not configure it (a no-op, were it allowed).
    status, out, _ = ssh(twin.machine(instance_id).address, key, "sudo -n ip link set lo up 2>&1")
    assert status != 0 and "Operation not permitted" in out, out
    ec2.terminate_instances(InstanceIds=[instance_id])


def test_stop_and_start_keep_the_disk_and_rerun_per_boot_parts(twin, ec2, key):
    user_data = ("#cloud-config\nbootcmd:\n  - echo boot >> /var/lib/boots\n"
                 "runcmd:\n  - echo once >> /var/lib/once\n")
    (instance_id,) = launch(ec2, user_data)
    machine = twin.machine(instance_id)
    assert machine.wait_ssh(BOOT_TIMEOUT)
    before = describe(ec2, instance_id)
    status, out, _ = ssh(before["PublicDnsName"], key, "cloud-init status --wait >/dev/null; echo kept > ~/file")
    assert status == 0, out

    ec2.stop_instances(InstanceIds=[instance_id])
    wait_state(ec2, instance_id, "stopped")
    assert not machine.running

    ec2.start_instances(InstanceIds=[instance_id])
    after = wait_state(ec2, instance_id, "running")
    assert after["PrivateIpAddress"] == before["PrivateIpAddress"]
    assert after["PublicIpAddress"] != before["PublicIpAddress"]  # as on EC2
    assert_loopback_only(after)
    assert machine.wait_ssh(BOOT_TIMEOUT), machine.console()[-3000:]
    status, out, _ = ssh(after["PublicDnsName"], key, "cloud-init status --wait >/dev/null; cat ~/file; "
                         "wc -l < /var/lib/boots; wc -l < /var/lib/once")
    assert status == 0 and out.split() == ["kept", "2", "1"], out
    ec2.terminate_instances(InstanceIds=[instance_id])
    wait_state(ec2, instance_id, "terminated")
    assert not machine.dir.exists()


def test_poweroff_inside_ends_only_that_instance(twin, ec2, key):
    """Shutdown behaviour terminate -> terminated, stop (EC2's default) -> stopped; the machine and the
    other instance keep running."""
    (ending,) = launch(ec2, InstanceInitiatedShutdownBehavior="terminate")
    (staying,) = launch(ec2)
    assert twin.machine(ending).wait_ssh(BOOT_TIMEOUT) and twin.machine(staying).wait_ssh(BOOT_TIMEOUT)
    machine_pid1 = Path("/proc/1/stat").read_text().split()[:2]
    hostname = socket.gethostname()

    ssh(twin.machine(ending).address, key, "sudo -n systemctl poweroff")
    found = wait_state(ec2, ending, "terminated")
    assert found["StateReason"]["Code"] == "Client.InstanceInitiatedShutdown"
    assert "Exiting container" in twin.console(ending)
    assert Path("/proc/1/stat").read_text().split()[:2] == machine_pid1 and socket.gethostname() == hostname
    status, out, _ = ssh(twin.machine(staying).address, key, "sudo -n systemctl is-system-running --wait")
    assert (status, out.strip()) == (0, "running")

    ssh(twin.machine(staying).address, key, "sudo -n systemctl poweroff")
    wait_state(ec2, staying, "stopped")
    assert twin.machine(staying).dir.exists()  # a stopped instance keeps its disk
    ec2.terminate_instances(InstanceIds=[staying])


def test_ttl_user_data_deadlocks_boot_and_the_fixed_timer_powers_off(twin, ec2):
    """Today's TTL user data: sshd never comes up. The fixed timer: boots, powers off, terminated."""
    (stuck,) = launch(ec2, DEADLOCKING_TTL.format(epoch=int(time.time()) + 3600),
                      InstanceInitiatedShutdownBehavior="terminate")
    (fixed,) = launch(ec2, FIXED_TTL.format(seconds=10), InstanceInitiatedShutdownBehavior="terminate")
    started = time.monotonic()
    assert twin.machine(fixed).wait_ssh(BOOT_TIMEOUT), twin.console(fixed)[-3000:]
    assert not twin.machine(stuck).wait_ssh(20 - (time.monotonic() - started))
    assert twin.machine(stuck).running  # stuck, not dead
    assert "running 'init'" in twin.console(stuck) and "Started ssh.service" not in twin.console(stuck)
    found = wait_state(ec2, fixed, "terminated", timeout=60)
    assert found["StateReason"]["Code"] == "Client.InstanceInitiatedShutdown"
    ec2.terminate_instances(InstanceIds=[stuck])
    wait_state(ec2, stuck, "terminated")


def test_an_image_of_an_instance_carries_its_home(twin, ec2, key):
    (dev,) = launch(ec2)
    assert twin.machine(dev).wait_ssh(BOOT_TIMEOUT)
    status, out, dev_key = ssh(twin.machine(dev).address, key, "mkdir -p ~/code && echo built > ~/code/artifact")
    assert status == 0, out
    tags = [{"Key": "made-by", "Value": "twin-test"}]
    image = ec2.create_image(InstanceId=dev, Name="twin-dev", TagSpecifications=[
        {"ResourceType": "image", "Tags": tags}, {"ResourceType": "snapshot", "Tags": tags}])["ImageId"]
    snapshot = ec2.describe_images(ImageIds=[image])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    assert ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["Tags"] == tags  # as cloister asks
    (node,) = launch(ec2, ImageId=image)
    assert twin.machine(node).wait_ssh(BOOT_TIMEOUT), twin.console(node)[-3000:]
    status, out, node_key = ssh(twin.machine(node).address, key, "cat ~/code/artifact; hostname")
    assert status == 0 and out.split() == ["built", twin.machine(node).hostname], out
    assert node_key.asbytes() != dev_key.asbytes()  # cloud-init's per-instance keys, for the new id
    ec2.terminate_instances(InstanceIds=[dev, node])
