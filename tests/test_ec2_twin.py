"""provider: ec2 end to end through `inv` subprocesses on the EC2 twin (issue 10 item 2).

The twin (tests/twin) serves moto's EC2 API on 127.0.0.1 in this process, and every instance that
RunInstances creates really boots (systemd, cloud-init with cloister's user data, sshd on a loopback
address). Each task runs as a user would run it: `inv ...` in a subprocess of its own, with the twin's
endpoint in the environment and servers/, state, config and runs/ in temporary directories.

One cluster (a master and 2 workers, plus a dev instance launched beside it) lives through the tests
of this module in order: launch, status, run, copy-dns (then plain ssh and mpirun from the master),
redeploy, ami.create (an instance of the image must carry none of the cluster's keys or state), exp.run,
stop, start, extend, destroy. Two more launches run in the background meanwhile, so their waiting overlaps the main
cluster's life: a cluster with a 90 s TTL (its instance must power itself off and be terminated) and
one whose user data deadlocks boot (the launch must fail with the console's reason, not wait blind).

Every address cloister writes into servers/ (after each task) must be in 127.0.0.0/8.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import io
import ipaddress
import json
import os
import re
import shlex
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import moto_server as ms  # before anything imports moto
import paramiko
import pytest
from conftest import INV, REPO, no_traceback
from twin import Twin

from cloister.providers.ec2 import prices
from cloister.cluster.servers import ClusterInfo

BOOT_TIMEOUT = 90.0  # generous: 2 shared cores, several machines booting at once; a boot alone is ~3 s
KEY_NAME = "twin-e2e"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
SSH_CIDR = "127.0.0.1/32"
DSUM = REPO / "examples" / "dsum"
BENCH_DIR = "clamor/experiments/cpp/dsum"
N = 2000000  # dsum's default N
# Names are unique per test process: the twin's moto is fresh, but state dirs and claims are shared.
SUFFIX = f"{os.getpid() % 100000}"
TTL_SECONDS = 90
STUCK_LIMIT = 120.0  # the deadlocked launch must fail within this
BOOT_STALL = 30  # cloister.boot_stall for that launch
AMI_TAG = f"clamor-e2e-{SUFFIX}"  # the main cluster's ami_tag: ami.create names its images after it

# The TTL user data cloister sent until commit f9a0a11 (cloister/ec2.py): the timer keeps systemd's
# default dependencies, so systemd-run waits in cloud-init's init stage for sysinit.target, which
# waits for that stage; boot never finishes and sshd never starts (as tests/test_twin.py shows).
DEADLOCKING_TTL = """\
#cloud-config
bootcmd:
  - |
    left=$(( {epoch} - $(date +%s) ))
    [ "$left" -gt 60 ] || left=60
    systemd-run --unit=cloister-ttl --on-active="$left" /bin/systemctl poweroff
"""


# -- keys, the twin, clusters ---------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    path: Path  # the private key file (0600), the config's ssh_key
    public: str
    pkey: paramiko.PKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Keys:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    generated = Ed25519PrivateKey.generate()
    pem = generated.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()).decode()
    public = generated.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    path = tmp_path_factory.mktemp("keys") / f"{KEY_NAME}.pem"
    path.write_text(pem)
    path.chmod(0o600)
    return Keys(path=path, public=f"{public} {KEY_NAME}", pkey=paramiko.Ed25519Key.from_private_key(io.StringIO(pem)))


@pytest.fixture(scope="module")
def twin(keys):
    with Twin() as running:
        running.client().import_key_pair(KeyName=KEY_NAME, PublicKeyMaterial=keys.public.encode())
        yield running


@pytest.fixture(scope="module")
def ec2(twin):
    return twin.client()


def loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in LOOPBACK
    except ValueError:
        return False


def describe(ec2, *filters: dict) -> list[dict]:
    pages = ec2.get_paginator("describe_instances").paginate(Filters=list(filters))
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def ssh(host: str, keys: Keys, command: str, *, stdin: bytes | None = None) -> tuple[int, str]:
    """Run ``command`` as ubuntu on ``host`` (this test's own check, not cloister's): status, output."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(host, username="ubuntu", pkey=keys.pkey, timeout=15, allow_agent=False, look_for_keys=False)
    try:
        chan = client.get_transport().open_session(timeout=15)
        chan.settimeout(60)
        chan.set_combine_stderr(True)
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
        chan.shutdown_write()
        out = b""
        while chunk := chan.recv(65536):
            out += chunk
        return chan.recv_exit_status(), out.decode(errors="replace")
    finally:
        client.close()


def host_keys(twin: Twin, instance_id: str) -> set[tuple[str, str]]:
    """The instance's own host keys (type, base64), read from its disk."""
    found = set()
    for pub in (twin.machine(instance_id).upper / "etc" / "ssh").glob("ssh_host_*_key.pub"):
        kind, blob = pub.read_text().split()[:2]
        found.add((kind, blob))
    return found


def ttl_timer_left(host: str, keys: Keys) -> float:
    """Seconds until the node's cloister-ttl.timer fires, as its systemd sees it (fails if not armed)."""
    status, out = ssh(host, keys, "systemctl is-active --quiet cloister-ttl.timer && "
                      "systemctl list-timers --all -o json cloister-ttl.timer && date +%s")
    assert status == 0, out
    timers, now = out.strip().splitlines()
    (timer,) = json.loads(timers)
    return timer["next"] / 1e6 - int(now)


@dataclass
class Ec2Cluster:
    """A cluster config on the twin with its own servers/, state and runs/ directories."""

    twin: Twin
    keys: Keys
    root: Path
    name: str
    config: dict
    extra_env: dict[str, str] = field(default_factory=dict)
    seen_addresses: set[str] = field(default_factory=set)  # every address servers/ ever held

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / f"{self.name}.json"
        self.config_path.write_text(json.dumps({
            "cluster_name": self.name, "provider": "ec2", "region": ms.REGION, "ami": ms.UBUNTU_AMI,
            "key_name": KEY_NAME, "ssh_key": str(self.keys.path), "user": "ubuntu", "instance_type": "m5.large",
            "ssh_cidr": SSH_CIDR, **self.config}, indent=2))

    @property
    def servers_dir(self) -> Path:
        return self.root / "servers"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def known_hosts(self) -> Path:
        return self.root / "state" / "ec2" / ms.REGION / self.name / "known_hosts"

    def env(self) -> dict[str, str]:
        env = self.twin.env()
        env.update(INVOKE_CLOISTER_SERVERS_DIR=str(self.servers_dir), INVOKE_CLOISTER_STATE_DIR=str(self.root / "state"),
                   INVOKE_CLOISTER_CONFIG=str(self.config_path), INVOKE_CLOISTER_RUNS_DIR=str(self.runs_dir),
                   INVOKE_CLOISTER_EXPERIMENTS=str(REPO / "experiments.yaml"), COLUMNS="200", **self.extra_env)
        return env

    def inv(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([INV, *args], cwd=REPO, env=self.env(), capture_output=True, text=True, check=False,
                                  timeout=timeout)
        finally:
            self.note_servers()

    def background(self, *args: str) -> Background:
        return Background([INV, *args], env=self.env(), logs=self.root, on_end=self.note_servers)

    def note_servers(self) -> None:
        """Remember every address in servers/ now (the plain files and cluster.json)."""
        if not self.servers_dir.exists():
            return
        for path in self.servers_dir.glob("*.txt"):
            # One host a line; mpi_hosts.txt adds OpenMPI's "slots=N max-slots=N" after it.
            self.seen_addresses.update(line.split()[0] for line in path.read_text().splitlines() if line.strip())
        cluster = self.servers_dir / "cluster.json"
        if cluster.exists():
            for node in json.loads(cluster.read_text())["nodes"]:
                self.seen_addresses.update(v for v in (node["host"], node["private"], node["public"]) if v)

    def servers(self) -> ClusterInfo:
        return ClusterInfo.from_json(json.loads((self.servers_dir / "cluster.json").read_text()))

    def instances(self, ec2, *states: str) -> list[dict]:
        filters = [{"Name": "tag:cloister:cluster", "Values": [self.name]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        return describe(ec2, *filters)

    def known(self) -> dict[str, tuple[str, str]]:
        """known_hosts as recorded by cloister: host -> (type, base64)."""
        out = {}
        for line in self.known_hosts.read_text().splitlines():
            host, kind, blob = line.split()[:3]
            out[host] = (kind, blob)
        return out


class Background:
    """An `inv` run in the background (output to files, so no pipe fills); killed by PID if left running."""

    def __init__(self, argv: list[str], *, env: dict[str, str], logs: Path, on_end: Callable[[], None]):
        self.out, self.err = logs / "bg.out", logs / "bg.err"
        self.on_end = on_end
        self.started = time.monotonic()
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         text=True)
        self.elapsed: float | None = None

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait at most ``timeout`` seconds from now (TimeoutExpired if still running)."""
        code = self.proc.wait(timeout=timeout)
        if self.elapsed is None:
            self.elapsed = time.monotonic() - self.started
        self.on_end()
        return subprocess.CompletedProcess(self.proc.args, code, self.out.read_text(), self.err.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # Popen checks that it was not reaped: only the process this test started
            self.proc.wait(timeout=30)


def destroy(cluster: Ec2Cluster) -> None:
    """Teardown: whatever the test left of the cluster goes (the twin ends every machine anyway)."""
    cluster.inv("cluster.destroy", "--yes", timeout=180)


# -- the dev instance -------------------------------------------------------------------------


def seed_tar() -> bytes:
    """The sample benchmark as the dev instance's ~/clamor/experiments/cpp/dsum, plus a .bashrc."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name in ("dsum", "dsum.weld", "experiment_vars"):
            tar.add(DSUM / name, arcname=f"{BENCH_DIR}/{name}")
        bashrc = (REPO / "examples" / "image" / ".bashrc").read_bytes()
        info = tarfile.TarInfo(".bashrc")
        info.size, info.mode = len(bashrc), 0o644
        tar.addfile(info, io.BytesIO(bashrc))
    return data.getvalue()


@dataclass(frozen=True)
class Dev:
    id: str
    address: str  # what ami_instance_ip names


@pytest.fixture(scope="module")
def dev(twin, ec2, keys) -> Dev:
    """A dev instance launched by hand (as one would in the console), the sample code put in its home."""
    answer = ec2.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                               KeyName=KEY_NAME, TagSpecifications=[
                                   {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "dev"}]}])
    instance_id = answer["Instances"][0]["InstanceId"]
    machine = twin.machine(instance_id)
    assert machine.wait_ssh(BOOT_TIMEOUT), twin.console(instance_id)[-3000:]
    (found,) = describe(ec2, {"Name": "instance-id", "Values": [instance_id]})
    address = found.get("PublicDnsName") or found["PrivateIpAddress"]
    assert loopback(address), found
    status, out = ssh(address, keys, "cloud-init status --wait >/dev/null; tar -x -f - && find clamor -type f | sort",
                      stdin=seed_tar())
    assert status == 0 and out.split() == [f"{BENCH_DIR}/{n}" for n in ("dsum", "dsum.weld", "experiment_vars")], out
    return Dev(id=instance_id, address=address)


# -- the clusters -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ttl_cluster(twin, keys, tmp_path_factory):
    """A master alone with a 90 s TTL, launched in the background (its wait overlaps the other tests)."""
    cluster = Ec2Cluster(twin, keys, tmp_path_factory.mktemp("ttl"), f"ttl-{SUFFIX}",
                         {"nworkers": 0, "ttl": f"{TTL_SECONDS}s"})
    launch = cluster.background("cluster.launch")
    try:
        yield cluster, launch
    finally:
        launch.kill()
        destroy(cluster)


@pytest.fixture(scope="module")
def stuck_cluster(twin, keys, tmp_path_factory):
    """A master alone whose RunInstances user data is replaced, in the twin, by the old deadlocking TTL
    (as an AMI or a bad user-data change would break boot); launched in the background."""
    # A console still for BOOT_STALL seconds is a hung boot (the default, 120 s, allows slow real AMIs).
    cluster = Ec2Cluster(twin, keys, tmp_path_factory.mktemp("stuck"), f"stuck-{SUFFIX}", {"nworkers": 0, "ttl": "1h"},
                         extra_env={"INVOKE_CLOISTER_BOOT_STALL": str(BOOT_STALL)})
    from moto.core.types import Base64EncodedString

    created = twin.created

    def deadlocked(instance) -> None:
        # cloister's ClientToken is "{cluster}-{m|w}-{token}": only this cluster's instances are changed.
        if (instance.client_token or "").startswith(f"{cluster.name}-"):
            broken = DEADLOCKING_TTL.format(epoch=int(time.time()) + 3600)
            instance.user_data = Base64EncodedString.from_raw_string(broken)
        created(instance)

    twin.created = deadlocked
    launch = cluster.background("cluster.launch", "--yes")
    try:
        yield cluster, launch
    finally:
        launch.kill()
        destroy(cluster)
        twin.created = created


@pytest.fixture(scope="module")
def cluster(twin, keys, ttl_cluster, stuck_cluster, dev, tmp_path_factory):
    """The main cluster: a master and 2 workers; the launch itself is the first test's to check.
    (It asks for the background clusters so that they launch first and wait while this one works.)"""
    made = Ec2Cluster(twin, keys, tmp_path_factory.mktemp("main"), f"main-{SUFFIX}",
                      {"nworkers": 2, "ttl": "1h", "ami_instance_ip": dev.address, "ami_tag": AMI_TAG})
    started = time.monotonic()
    made.launch = made.inv("cluster.launch", timeout=300)
    made.launch_s = time.monotonic() - started
    try:
        yield made
    finally:
        destroy(made)


def assert_servers_loopback(cluster: Ec2Cluster) -> None:
    assert cluster.seen_addresses, "servers/ was never written"
    assert all(loopback(a) for a in cluster.seen_addresses), sorted(cluster.seen_addresses)


def node_ids(info: ClusterInfo) -> list[str]:
    return [n.id for n in info.nodes]


# -- the main cluster's life, in order ----------------------------------------------------------


def test_launch_waits_for_ssh_checks_the_ttl_and_writes_servers(cluster, twin, ec2):
    proc = cluster.launch
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    assert re.search(rf"^launched ec2 cluster '{cluster.name}': 1 master, 2 workers in [0-9.]+s$", proc.stdout, re.MULTILINE), \
        proc.stdout
    info = cluster.servers()
    assert f"master {info.master.host}; servers/ written to {cluster.servers_dir}/" in proc.stdout
    assert (info.provider, info.cluster_name, info.user, info.region) == ("ec2", cluster.name, "ubuntu", ms.REGION)
    assert [n.role for n in info.nodes] == ["master", "worker", "worker"]
    assert [n.name for n in info.nodes] == [f"{cluster.name}-master", f"{cluster.name}-worker-1",
                                            f"{cluster.name}-worker-2"]
    live = {i["InstanceId"]: i for i in cluster.instances(ec2)}
    assert set(live) == set(node_ids(info)) and all(i["State"]["Name"] == "running" for i in live.values())
    for node in info.nodes:
        found = live[node.id]
        assert (node.public, node.private, node.host) == (found["PublicIpAddress"], found["PrivateIpAddress"],
                                                          found["PublicDnsName"])
        assert twin.machine(node.id).running
    # The old plain files, as the old scripts read them.
    files = {p.name: p.read_text() for p in cluster.servers_dir.glob("*.txt")}
    assert files["master.txt"] == files["manager.txt"] == info.master.public + "\n"
    assert files["servers.txt"] == files["servers_public.txt"] == "".join(w.public + "\n" for w in info.workers)
    assert files["servers_private.txt"] == "".join(w.private + "\n" for w in info.workers)
    assert_servers_loopback(cluster)
    # Host keys: learned on first contact, each one the instance's own (cloud-init made them).
    known = cluster.known()
    assert set(known) == {n.host for n in info.nodes}
    for node in info.nodes:
        assert known[node.host] in host_keys(twin, node.id), node
    # The TTL: tagged, and armed on every node (cloister checked it; so does the test).
    (expires,) = {tags(i)["cloister:ttl-expires"] for i in live.values()}
    left = calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ")) - time.time()
    assert 3600 - cluster.launch_s - 5 <= left <= 3600, left
    for node in info.nodes:
        assert abs(ttl_timer_left(node.host, cluster.keys) - left) < 5, node
        # The user data ran cleanly: the timer started, and its shell said nothing on the console.
        console = twin.console(node.id)
        assert "Started cloister-ttl.timer" in console and "cannot open" not in console, console[-3000:]


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of a table `inv` printed (rich's box characters), by column header."""
    lines = [[cell.strip() for cell in line.strip().strip("│┃").split("│" if "│" in line else "┃")]
             for line in text.splitlines() if line.lstrip().startswith(("│", "┃"))]
    header, *rows = lines
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture(scope="module")
def status(cluster) -> subprocess.CompletedProcess:
    """`inv cluster.status` of the running cluster, run once for the tests that read it."""
    return cluster.inv("cluster.status")


def test_status_shows_every_node_running_with_its_ttl(cluster, status):
    proc = status
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    info = cluster.servers()
    rows = {row["id"]: row for row in table_rows(proc.stdout)}
    assert set(rows) == set(node_ids(info)), proc.stdout
    for node in info.nodes:
        row = rows[node.id]
        assert (row["role"], row["host"], row["type"], row["state"]) == (node.role, node.host, "m5.large", "running")
        left = re.fullmatch(r"(\d+)m(\d\d)s", row["ttl left"])
        assert left and 50 <= int(left.group(1)) < 60, row  # ttl 1h, less the time since launch
        assert row["cost"].startswith("$"), row
    assert "cost so far" in proc.stdout


def test_status_shows_what_each_node_costs_and_the_rate_per_hour_now(cluster, status):
    proc = status
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert len(rows) == 3 and all(re.fullmatch(r"\$\d+\.\d\d", row["cost"]) for row in rows), proc.stdout
    # The caption (rich may wrap it): what the cluster cost so far and what it costs per hour now.
    text = " ".join(proc.stdout.split())
    found = re.search(r"cost so far \$(\d+\.\d\d); \$(\d+\.\d\d)/hour now; estimated from EC2 list prices", text)
    assert found, proc.stdout
    so_far, per_hour = float(found.group(1)), float(found.group(2))
    assert abs(so_far - sum(float(row["cost"][1:]) for row in rows)) <= 0.005 * len(rows) + 1e-9, proc.stdout
    # Three m5.large on demand, plus their public IPv4 addresses and root volumes (cents, not dollars).
    node = prices.hourly("m5.large", ms.REGION)
    assert 3 * node - 0.005 <= per_hour <= 3 * node + 0.06, (per_hour, node)


def test_run_hostname_on_every_node(cluster, twin):
    proc = cluster.inv("cluster.run", "hostname")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    info = cluster.servers()
    for node in info.nodes:
        expected = twin.machine(node.id).hostname  # ip-127-0-2xx-y, the instance's own
        assert re.search(rf"\b{re.escape(expected)}\b", proc.stdout), (expected, proc.stdout)
    assert len({twin.machine(n.id).hostname for n in info.nodes}) == 3


def test_copy_dns_puts_servers_and_known_hosts_on_every_node_and_the_key_on_the_master(cluster):
    proc = cluster.inv("cluster.copy-dns")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "copied servers/ to ~/cloister/servers on 3 nodes; key on the master", proc.stdout
    info = cluster.servers()
    local = {p.name: p.read_text() for p in cluster.servers_dir.glob("*.txt")}
    for node in info.nodes:
        status, out = ssh(node.host, cluster.keys, "cd ~/cloister && for f in servers/*.txt; do echo \"== $f\"; "
                          "cat $f; done; echo '== known'; cat known_hosts; echo '== key'; "
                          "stat -c %a ~/.ssh/cloister_key 2>/dev/null; python3 -c 'import json; print(json.load(open("
                          "\"servers/cluster.json\"))[\"ssh_key\"])'")
        assert status == 0, out
        for name, text in local.items():
            assert f"== servers/{name}\n{text}" in out, (node, name, out)
        assert set(out.split("== known", 1)[1].split("== key")[0].strip().splitlines()) == \
            set(cluster.known_hosts.read_text().splitlines()), out
        key_part = out.split("== key", 1)[1].split()
        # The key only on the master (0600), and the master's cluster.json names it where it is.
        assert key_part == (["600", "~/.ssh/cloister_key"] if node.role == "master" else ["~/.ssh/cloister_key"]), out


def master_output(proc: subprocess.CompletedProcess, info: ClusterInfo) -> list[str]:
    """The lines `inv cluster.run --role master ...` printed for the master, below its header."""
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["-" * 15, f"{info.master.host} (1)"] and lines[2] == "-" * 15, proc.stdout
    return lines[3:]


def assert_plain_ssh_from_the_master(cluster: Ec2Cluster, twin: Twin, names: list[str]) -> None:
    """`ssh NAME hostname` on the master, with no flags, for each worker's NAME: each worker answers."""
    info = cluster.servers()
    proc = cluster.inv("cluster.run", "--role", "master", " && ".join(f"ssh {shlex.quote(n)} hostname" for n in names))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    assert master_output(proc, info) == [twin.machine(w.id).hostname for w in info.workers], proc.stdout


def test_plain_ssh_from_the_master_reaches_every_worker_by_private_address(cluster, twin):
    """After copy-dns, `ssh WORKER` on the master needs no flags (the private addresses are what the
    nodes use among themselves, and what mpi_hosts.txt lists)."""
    assert_plain_ssh_from_the_master(cluster, twin, [w.private for w in cluster.servers().workers])


def test_plain_ssh_from_the_master_reaches_every_worker_by_its_name(cluster, twin):
    """The workers' names in servers/cluster.json work too. No DNS knows them (EC2's VPC DNS resolves
    only ip-... names), so the ssh config copy-dns writes must say which address each name is."""
    assert_plain_ssh_from_the_master(cluster, twin, [w.name for w in cluster.servers().workers])


def test_mpirun_from_the_master_with_the_hostfile_copy_dns_placed(cluster, twin):
    info = cluster.servers()
    # The hostfile lists the workers' private addresses with their slots (vCPUs where EC2 says, else 1).
    lines = (cluster.servers_dir / "mpi_hosts.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == [w.private for w in info.workers], lines
    assert all(re.fullmatch(r"\S+ slots=[1-9]\d* max-slots=[1-9]\d*", line) for line in lines), lines
    status, out = ssh(info.master.host, cluster.keys, "command -v mpirun")
    if status != 0:
        pytest.skip("mpirun is not installed (make test installs openmpi-bin)")
    # On the twin every instance shares this machine's network namespace: all their addresses are on
    # lo, and OpenMPI would pick the machine's other interfaces (where no instance listens) for its
    # own traffic unless told to use lo. On EC2 no flag is needed. --map-by node: one rank per worker,
    # so that both are reached whatever their slots.
    proc = cluster.inv("cluster.run", "--role", "master", "--timeout", "90",
                       "mpirun --hostfile ~/cloister/servers/mpi_hosts.txt --mca btl_tcp_if_include lo "
                       "--mca oob_tcp_if_include lo --map-by node -n 2 hostname")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    # mpirun's own launcher warns when a child it forks has exec'ed before setpgid (a harmless race under
    # load: "[host:pid] plm:rsh: Warning: setpgid(...) failed"); only the ranks' output is under test.
    ranks = [line for line in master_output(proc, info) if not re.match(r"\[\S+:\d+\] plm:", line)]
    assert sorted(ranks) == sorted(twin.machine(w.id).hostname for w in info.workers), proc.stdout


def test_redeploy_pushes_the_dev_instances_code_to_every_node(cluster, dev):
    proc = cluster.inv("cluster.redeploy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    info = cluster.servers()
    # weld/ and cloister/ (default redeploy_paths) are not on the dev instance: skipped with a warning.
    assert proc.stderr.splitlines() == ["warning: skipped weld/: not in the dev instance's home",
                                        "warning: skipped cloister/: not in the dev instance's home"], proc.stderr
    lines = proc.stdout.splitlines()
    for node in info.nodes:
        assert any(re.fullmatch(rf"\[{re.escape(node.host)}\] 4 files, .* in [0-9.]+s", line) for line in lines), lines
    assert re.search(rf"^redeployed clamor/ \.bashrc from {re.escape(dev.address)} to 3/3 nodes in ", proc.stdout, re.MULTILINE), \
        proc.stdout
    # The dev instance's host key was learned on first contact: its own key.
    recorded = [line.split() for path in (cluster.known_hosts, dev_known_hosts(cluster)) if path.exists()
                for line in path.read_text().splitlines() if line.split()[0] == dev.address]
    assert len(recorded) == 1 and tuple(recorded[0][1:3]) in host_keys(cluster.twin, dev.id), recorded
    want = {name: (DSUM / name).read_bytes() for name in ("dsum", "dsum.weld", "experiment_vars")}
    for node in info.nodes:
        status, out = ssh(node.host, cluster.keys, f"cd {BENCH_DIR} && sha256sum dsum dsum.weld experiment_vars && "
                          "stat -c %a dsum")
        assert status == 0, out
        for name, data in want.items():
            assert f"{hashlib.sha256(data).hexdigest()}  {name}" in out, (node, out)
        assert out.split()[-1] == "755", out


def dev_known_hosts(cluster: Ec2Cluster) -> Path:
    """Where the ec2 provider keeps the dev instance's host key (dev_info: it outlives clusters)."""
    return cluster.root / "state" / "ec2" / "dev_known_hosts"


def test_redeploy_keeps_the_dev_instances_host_key_apart_from_the_clusters(cluster, dev):
    """The dev instance outlives clusters: its key belongs with ami.login's, not in the cluster's file
    that every launch and start forgets (so each new cluster would trust the dev instance anew)."""
    assert dev.address not in cluster.known(), cluster.known_hosts.read_text()
    assert dev_known_hosts(cluster).exists()


def home_files(host: str, keys: Keys, *dirs: str) -> dict[str, bytes]:
    """Every regular file under ``dirs`` of ubuntu's home on ``host``: path (from the home) -> content."""
    status, out = ssh(host, keys, f"cd ~ && tar -cf - $(ls -d {' '.join(dirs)} 2>/dev/null) 2>/dev/null | base64 -w0")
    assert status == 0 and out, out
    found = {}
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(out)), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                found[member.name] = tar.extractfile(member).read()
    return found


def test_the_users_own_key_is_on_no_node_and_not_on_the_dev_instance(cluster, dev):
    """Nodes and the dev instance reach each other with the cluster key; the user's own key (ssh_key)
    never leaves this machine, not even after copy-dns and redeploy."""
    info = cluster.servers()
    own = cluster.keys.path.read_bytes()
    body = re.sub(rb"\s", b"", b"".join(line for line in own.splitlines() if not line.startswith(b"-----")))
    from cryptography.hazmat.primitives import serialization as ser

    seed = ser.load_ssh_private_key(own, None).private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw,
                                                              ser.NoEncryption())
    for host in [n.host for n in info.nodes] + [dev.address]:
        files = home_files(host, cluster.keys, ".ssh", "cloister")
        assert ".ssh/authorized_keys" in files, (host, sorted(files))
        for path, content in files.items():
            assert own.strip() not in content, (host, path)
            assert body not in re.sub(rb"\s", b"", content) and seed not in content, (host, path)
    # The key the master and the dev instance hold is the cluster's, not the user's.
    cluster_key = Path(info.extra["cluster_key"]).read_bytes()
    assert cluster_key != own
    for host in (info.master.host, dev.address):
        assert home_files(host, cluster.keys, ".ssh")[".ssh/cloister_key"] == cluster_key, host


# What copy-dns and redeploy leave in a home that an image must never carry (as ami.create's note names it).
NOT_IN_IMAGES = (".ssh/cloister_key", ".ssh/cloister_known_hosts", ".ssh/cloister_config", "cloister/servers",
                 "cloister/known_hosts", "cloister/runs")
RESTART_WARNING = "warning: EC2 restarts the dev instance to image it (a consistent disk); --no-reboot images it running"


def assert_image_created(proc: subprocess.CompletedProcess, name: str) -> str:
    """ami.create's output: the image's id, after checking the note of what was left out."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    found = re.search(rf"^created (ami-[0-9a-f]+)  ({name})  created \S+ \S+ UTC$", proc.stdout, re.MULTILINE)
    assert found, proc.stdout
    (left_out,) = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert left_out.startswith("note: removed from the dev instance before imaging: the cluster keys copy-dns "
                               "authorized, SSH control sockets and "), left_out
    for path in NOT_IN_IMAGES:
        assert f"~/{path}" in left_out, (path, left_out)
    return found.group(1)


def test_ami_create_images_the_dev_instance_without_the_cluster_key_or_cloisters_state(cluster, dev, twin, ec2):
    info = cluster.servers()
    keys = cluster.keys
    # The dev instance before imaging: redeploy left the cluster key, the nodes' host keys and a shared
    # connection there. Give it also everything copy-dns leaves on a node (as if it had been one, or the
    # user had copied servers/ there) and a line of the user's own in ~/.ssh/config.
    status, out = ssh(info.master.host, keys, "cd ~ && tar -cf - cloister .ssh/cloister_config .ssh/config | "
                      "base64 -w0 && echo && grep -F cloister-cluster: .ssh/authorized_keys")
    assert status == 0, out
    archive, marked = out.split("\n", 1)
    status, out = ssh(dev.address, keys, "tar -xf - && mkdir -p cloister/runs/dsum/r1 && echo ok > "
                      f"cloister/runs/dsum/r1/master.log && echo {shlex.quote(marked.strip())} >> .ssh/authorized_keys && "
                      "printf 'Host github.com\\n    User git\\n' >> .ssh/config && ls -A .ssh",
                      stdin=base64.b64decode(archive))
    assert status == 0 and re.search(r"^cloister-cm-", out, re.MULTILINE), out  # redeploy's shared connection
    before = home_files(dev.address, keys, ".ssh", "cloister")
    assert before[".ssh/cloister_key"] == Path(info.extra["cluster_key"]).read_bytes()
    assert all(any(f == p or f.startswith(p + "/") for f in before) for p in NOT_IN_IMAGES), sorted(before)
    assert b"cloister-cluster:" in before[".ssh/authorized_keys"]
    assert b"Include ~/.ssh/cloister_config" in before[".ssh/config"]

    proc = cluster.inv("ami.create", timeout=240)
    image_id = assert_image_created(proc, rf"{re.escape(AMI_TAG)}-\d{{8}}-\d{{4}}")
    assert RESTART_WARNING in proc.stderr.splitlines(), proc.stderr

    answer = ec2.run_instances(ImageId=image_id, InstanceType="t3.micro", MinCount=1, MaxCount=1, KeyName=KEY_NAME,
                               TagSpecifications=[{"ResourceType": "instance",
                                                   "Tags": [{"Key": "Name", "Value": "from-image"}]}])
    instance_id = answer["Instances"][0]["InstanceId"]
    try:
        # While it boots: --no-reboot images the dev instance without the warning, and cleans it the same way.
        name = f"{AMI_TAG}-no-reboot"
        proc = cluster.inv("ami.create", "--no-reboot", "--name", name, timeout=240)
        assert_image_created(proc, re.escape(name))
        assert "warning:" not in proc.stderr, proc.stderr

        assert twin.machine(instance_id).wait_ssh(BOOT_TIMEOUT), twin.console(instance_id)[-3000:]
        (found,) = describe(ec2, {"Name": "instance-id", "Values": [instance_id]})
        address = found.get("PublicDnsName") or found["PrivateIpAddress"]
        check = "; ".join(f"[ ! -e {p} ] || echo present: {p}" for p in NOT_IN_IMAGES)
        status, out = ssh(address, keys, f"cloud-init status --wait >/dev/null; cd ~ && {{ {check}; ls -A .ssh; }}")
        assert status == 0, out
        assert "present:" not in out and "cloister-cm-" not in out, out
        after = home_files(address, keys, ".ssh", "cloister", "clamor")
        assert not [f for f in after if f.startswith(("cloister/", ".ssh/cloister"))], sorted(after)
        authorized = after[".ssh/authorized_keys"].decode()
        assert "cloister-cluster:" not in authorized and keys.public.split()[1] in authorized, authorized
        config = after[".ssh/config"].decode()
        assert "cloister" not in config and "Include" not in config, config
        assert "Host github.com\n    User git\n" in config, config  # the user's own lines stay
        for name in ("dsum", "dsum.weld", "experiment_vars"):
            assert after[f"{BENCH_DIR}/{name}"] == (DSUM / name).read_bytes(), name
    finally:
        ec2.terminate_instances(InstanceIds=[instance_id])


def test_exp_run_of_the_sample_benchmark(cluster):
    proc = cluster.inv("exp.run", "--benchmark", "dsum", "-k", "2", "-p", "2", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    s = N * (N + 1) // 2
    assert f"[master] dsum: N={N} partitions=4 workers=4 sum={s} expected={s} ok" in proc.stdout, proc.stdout
    (run_dir,) = (cluster.runs_dir / "dsum").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    info = cluster.servers()
    assert (record["status"], record["error"], record["k"], record["p"]) == ("ok", None, 2, 2), record
    assert record["cluster"] == cluster.name and record["config"] == str(cluster.config_path)
    assert record["hosts"] == {"master": info.master.host, "workers": [w.host for w in info.workers]}
    assert record["exit_codes"]["master"] == 0 and record["failures"] == {}
    assert isinstance(record["metric"], float)
    assert {d.name for d in run_dir.iterdir() if d.is_dir()} == {n.host for n in info.nodes}
    # The nodes run on this machine's kernel: a sysctl there would change the machine, and must not run.
    steps = [step for host in record["preparation"]["hosts"].values() for step in host]
    assert not [s for s in steps if s["item"].startswith("sysctl") and s["status"] != "skipped"], steps


def test_stop_then_start_rewrites_servers_and_relearns_host_keys(cluster, twin, ec2):
    before = cluster.servers()
    known_before = cluster.known()
    proc = cluster.inv("cluster.stop", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"stopped 3 instances of ec2 cluster '{cluster.name}'", proc.stdout
    assert {i["State"]["Name"] for i in cluster.instances(ec2)} == {"stopped"}
    assert not any(twin.machine(n.id).running for n in before.nodes)

    proc = cluster.inv("cluster.start", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    after = cluster.servers()
    assert f"started ec2 cluster '{cluster.name}': 3 nodes; master {after.master.host}; servers/ rewritten" \
        in proc.stdout, proc.stdout
    assert node_ids(after) == node_ids(before)
    # As on EC2: the same private addresses, new public ones; servers/ says so.
    assert [n.private for n in after.nodes] == [n.private for n in before.nodes]
    assert not {n.public for n in after.nodes} & {n.public for n in before.nodes}
    assert (cluster.servers_dir / "master.txt").read_text() == after.master.public + "\n"
    assert (cluster.servers_dir / "servers.txt").read_text() == "".join(w.public + "\n" for w in after.workers)
    assert_servers_loopback(cluster)
    # Host keys: the old addresses forgotten, the new ones learned; the keys are the same instances'.
    known = cluster.known()
    assert set(known) == {n.host for n in after.nodes}
    for old, new in zip(before.nodes, after.nodes):
        assert known[new.host] == known_before[old.host]
    proc = cluster.inv("cluster.run", "cat ~/cloister/servers/master.txt")
    assert proc.returncode == 0 and after.master.public in proc.stdout, proc.stdout + proc.stderr


def test_extend_moves_the_tag_and_the_timer(cluster, ec2):
    proc = cluster.inv("cluster.extend", "--ttl", "2h")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.fullmatch(rf"TTL of ec2 cluster '{cluster.name}' moved to \S+ \S+ UTC on 3 instances \(tag and timer\)\n",
                        proc.stdout), proc.stdout
    (expires,) = {tags(i)["cloister:ttl-expires"] for i in cluster.instances(ec2)}
    epoch = calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ"))
    assert 7200 - 30 < epoch - time.time() <= 7200
    for node in cluster.servers().nodes:
        # The node's own record of its expiry (kept across stop/start) and its timer, both moved.
        status, out = ssh(node.host, cluster.keys, "cat /var/lib/cloister/ttl-expires")
        assert status == 0 and out.split() == [node.id, str(epoch)], out
        assert abs(ttl_timer_left(node.host, cluster.keys) - (epoch - time.time())) < 5, node


def test_destroy_terminates_everything_and_clears_servers(cluster, twin, ec2, dev):
    info = cluster.servers()
    proc = cluster.inv("cluster.destroy", "--yes", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    assert proc.stdout.startswith(f"terminated 3 instances of ec2 cluster '{cluster.name}': "), proc.stdout
    assert "deleted security group" in proc.stdout
    assert {i["State"]["Name"] for i in cluster.instances(ec2)} == {"terminated"}
    assert not any(twin.machine(n.id).running for n in info.nodes)
    assert not any(twin.machine(n.id).dir.exists() for n in info.nodes)
    assert not list(cluster.servers_dir.glob("*")), list(cluster.servers_dir.glob("*"))
    assert not ec2.describe_security_groups(
        Filters=[{"Name": "tag:cloister:cluster", "Values": [cluster.name]}])["SecurityGroups"]
    assert twin.machine(dev.id).running  # the dev instance is not the cluster's
    proc = cluster.inv("cluster.status")
    assert proc.returncode == 1 and proc.stderr.strip() == \
        f"no ec2 cluster '{cluster.name}' is running; run inv cluster.launch", proc.stderr
    assert_servers_loopback(cluster)


# -- the background launches ----------------------------------------------------------------------


def test_a_short_ttl_really_ends_the_instances(ttl_cluster, twin, ec2):
    cluster, launch = ttl_cluster
    proc = launch.result(timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"launched ec2 cluster '{cluster.name}': 1 master, 0 workers" in proc.stdout, proc.stdout
    assert_servers_loopback(cluster)
    (instance,) = cluster.instances(ec2)
    expires = calendar.timegm(time.strptime(tags(instance)["cloister:ttl-expires"], "%Y-%m-%dT%H:%M:%SZ"))
    # The node arms max(left, 60) s at boot: terminated by about then, plus a clean power-off.
    deadline = time.monotonic() + max(expires - time.time(), 0) + 60
    while True:
        (found,) = describe(ec2, {"Name": "instance-id", "Values": [instance["InstanceId"]]})
        if found["State"]["Name"] == "terminated" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert found["State"]["Name"] == "terminated", (found["State"], twin.console(instance["InstanceId"])[-3000:])
    assert found["StateReason"]["Code"] == "Client.InstanceInitiatedShutdown", found["StateReason"]
    console = twin.console(instance["InstanceId"])
    assert "Started cloister-ttl.timer" in console and "Exiting container." in console, console[-3000:]
    assert not twin.machine(instance["InstanceId"]).dir.exists()  # its disk went with it
    proc = cluster.inv("cluster.status")
    assert proc.returncode == 1 and "is running; run inv cluster.launch" in proc.stderr, proc.stderr


def test_a_launch_whose_boot_deadlocks_fails_with_the_consoles_reason(stuck_cluster, twin, ec2):
    cluster, launch = stuck_cluster
    left = STUCK_LIMIT - (time.monotonic() - launch.started)
    try:
        proc = launch.result(timeout=max(left, 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launch of a cluster whose boot deadlocks was still waiting after {STUCK_LIMIT:.0f}s")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    (instance,) = cluster.instances(ec2)
    console = twin.console(instance["InstanceId"])
    # Where boot stopped: cloud-init's init stage began (bootcmd runs there) and never ended; sshd never started.
    (stuck,) = [line.split("] ", 1)[-1].strip() for line in console.splitlines() if "running 'init'" in line]
    assert "Started ssh.service" not in console, console[-3000:]
    assert stuck[:100] in proc.stderr, (proc.stderr, stuck)  # the line, perhaps shortened
    assert instance["InstanceId"] in proc.stderr, proc.stderr
    # --yes: the failed launch terminated what it created and left no servers/ behind.
    assert "terminated the 1 instances it created" in proc.stderr, proc.stderr
    assert instance["State"]["Name"] in ("shutting-down", "terminated"), instance["State"]
    assert not (cluster.servers_dir / "cluster.json").exists()
    named = re.findall(r"^\[([^\]]+)\]", proc.stderr, re.M)
    assert named and all(loopback(host) for host in named), proc.stderr
