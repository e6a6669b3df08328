"""Local hosts are network hosts: a namespace, an address, lo and a bridge of their own, no way out;
links shaped as configured; nothing left behind by a destroy or a crashed launch."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from pathlib import Path

import pytest

from cloister.config import load_config
from cloister.errors import ConfigError, ProviderError
from cloister.providers.local import links
from cloister.providers.local.machines import LocalCluster
from cloister.netspec import NetworkSpec, parse_network
from cloister.providers.local.subnets import CLAIMS_DIR, Block
from cloister.transport import hosts
from conftest import REPO, one_line_error, run_inv
from netprobe import round_trip, throughput

NETNS_RANGE = ipaddress.ip_network("198.18.0.0/15")


def sh(info, node, command: str):
    with hosts.connection(info, node, connect_timeout=5) as cxn:
        return cxn.run(command, timeout=30, hide=True, warn=True)


def state(env) -> dict:
    lc = LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name)
    return json.loads((lc.dir / "cluster-state.json").read_text())


def claims_of(folder: Path) -> list[str]:
    return sorted(c.name for c in CLAIMS_DIR.iterdir()
                  if not c.name.startswith(".") and c.read_text().strip() == str(folder))


def test_each_host_has_its_own_network_and_no_way_out(local_cluster):
    info = local_cluster.info
    namespaces = set()
    network = None
    for node in info.nodes:
        assert ipaddress.ip_address(node.host) in NETNS_RANGE
        out = sh(info, node, "readlink /proc/self/ns/net; ip -4 -o address show; echo --; ip -4 route show; "
                             "echo --; ip -o link show lo; ip route get 192.0.2.1 2>&1").stdout
        netns, rest = out.split("\n", 1)
        addresses, routes, links_and_way_out = rest.split("--\n")
        namespaces.add(netns)
        shown = {line.split()[1]: line.split()[3] for line in addresses.splitlines()}
        assert set(shown) == {"lo", "eth0"} and shown["lo"] == "127.0.0.1/8" and shown["eth0"].startswith(node.host + "/")
        host_network = ipaddress.ip_network(shown["eth0"], strict=False)
        network = network or host_network
        assert host_network == network
        # One route, the cluster's own network; no default route, so nothing else can be reached.
        assert [line.split()[0] for line in routes.splitlines()] == [str(network)]
        assert "default" not in routes
        assert "state UNKNOWN" in links_and_way_out or ",UP" in links_and_way_out
        assert "Network is unreachable" in links_and_way_out
    assert os.readlink("/proc/self/ns/net") not in namespaces
    assert len(namespaces) == len(info.nodes)
    assert network.subnet_of(NETNS_RANGE)


def test_the_bridge_holds_only_the_hosts(local_cluster):
    bridge = state(local_cluster)["bridge"]
    ports = sorted(os.listdir(f"/sys/class/net/{bridge}/brif"))
    assert len(ports) == len(local_cluster.info.nodes)
    assert all(port.startswith("clv") and Path(f"/sys/class/net/{port}/device").exists() is False for port in ports)
    # This machine's only address on it lies in the cluster's network; it forwards nothing.
    routes = json.loads(os.popen(f"ip -j -4 address show dev {bridge}").read())
    addresses = [a["local"] for entry in routes for a in entry["addr_info"]]
    assert len(addresses) == 1 and ipaddress.ip_address(addresses[0]) in NETNS_RANGE
    assert Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").read_text().strip() == "0"


def test_every_host_can_serve_the_same_port(local_cluster):
    """A server binding 0.0.0.0:50000 runs once per host (Ray's raylet did not), reached at each address."""
    info = local_cluster.info
    serve = ("import socket; s = socket.socket(); s.bind(('0.0.0.0', 50000)); s.listen(8); "
             "c, _ = s.accept(); c.sendall(socket.gethostname().encode()); c.close()")
    started = {}
    for node in info.workers:
        out = sh(info, node, f"cd /tmp; nohup python3 -c \"{serve}\" > /tmp/serve.log 2>&1 < /dev/null & echo $!")
        started[node.name] = out.stdout.strip()
    try:
        for node in info.workers:
            got = sh(info, info.master, f"python3 -c \"import socket, time\nfor _ in range(200):\n    try:\n"
                                        f"        c = socket.create_connection(('{node.host}', 50000)); break\n"
                                        f"    except OSError: time.sleep(0.02)\nprint(c.recv(100).decode())\"")
            assert got.stdout.strip() == node.name, got.stderr
    finally:
        for node in info.workers:
            sh(info, node, f"kill {started[node.name]} 2>/dev/null")


def test_a_shaped_link_carries_the_configured_rate(own_cluster):
    env = own_cluster("shaped", nworkers=2, network={"rate": "100mbit"})
    one, two = env.info.workers
    rate = throughput(env.info, one, two, seconds=3)
    assert 80e6 <= rate <= 120e6, f"{rate / 1e6:.1f} Mbit/s"
    back = throughput(env.info, two, one, seconds=3)
    assert 80e6 <= back <= 120e6, f"{back / 1e6:.1f} Mbit/s"


def test_latency_is_applied_or_refused_naming_netem(tmp_path, own_cluster):
    network = {"latency": "20ms"}
    try:
        env = own_cluster("delayed", nworkers=2, network=network)
    except ProviderError as err:
        # The kernel's own answer is in the message: refused only where netem is really missing.
        assert "network.latency" in str(err) and "netem" in str(err) and "qdisc kind is unknown" in str(err)
    else:
        rtt = round_trip(env.info, *env.info.workers, count=20)
        assert 0.036 <= rtt <= 0.06, rtt
        return
    config = tmp_path / "delayed.json"
    config.write_text(json.dumps({"cluster_name": "nadelayed", "provider": "local", "nworkers": 1, "dev_host": False,
                                  "image": str(REPO / "examples" / "image"), "ttl": 0, "network": network}))
    env = {**os.environ, "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state"),
           "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers")}
    line = one_line_error(run_inv("cluster.launch", "--config", str(config), env=env))
    assert "network.latency" in line and "sch_netem" in line
    # Nothing was left: no hosts, no state, no claim (and so no bridge).
    assert not (tmp_path / "state" / "local" / "nadelayed").exists()
    assert claims_of((tmp_path / "state" / "local" / "nadelayed").resolve()) == []


@pytest.mark.parametrize("network, key, says", [
    ({"rate": "fast"}, "network.rate", "'1gbit'"),
    ({"rate": "1gbit; reboot"}, "network.rate", "'1gbit'"),
    ({"rate": "1bit"}, "network.rate", "at least 8kbit"),
    ({"latency": "2ms $(reboot)"}, "network.latency", "'2ms'"),
    ({"rate": "1gbit", "latency": 2}, "network.latency", "'2ms'"),
    ({"loss": "2"}, "network.loss", "'0.5%'"),
    ({"lossy": "1%"}, "network.lossy", "unknown key"),
    ({"mode": "bridge"}, "network.mode", "netns, loopback"),
    ({"mode": "loopback", "rate": "1gbit"}, "network.mode", "cannot be shaped"),
    ("1gbit", "network", "a mapping"),
])
def test_a_bad_network_value_names_its_key(tmp_path, network, key, says):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"cluster_name": "nabad", "provider": "local", "network": network}))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert f"key '{key}'" in str(err.value) and says in str(err.value) and "\n" not in str(err.value)


def test_network_is_refused_outside_the_local_provider(tmp_path):
    config = tmp_path / "static.json"
    config.write_text(json.dumps({"cluster_name": "nastatic", "provider": "static", "hosts": ["a"],
                                  "network": {"rate": "1gbit"}}))
    with pytest.raises(ConfigError, match="local provider only"):
        load_config(config)


def test_a_crashed_launch_leaves_nothing_the_next_launch_does_not_clean(own_cluster):
    env = own_cluster("crashed", nworkers=1)
    lc = LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name)
    bridge, folder = state(env)["bridge"], lc.dir
    assert claims_of(folder)
    # As after a crash of this machine's cloister and the loss of its state: hosts gone, bridge and claim left.
    for node in env.info.nodes:
        lc.kill_host(node.name)
    shutil.rmtree(folder)
    assert links.exists(bridge)
    again = own_cluster("after", nworkers=1)
    assert claims_of(folder) == []
    assert state(again)["bridge"] == bridge or not links.exists(bridge)


def test_destroy_removes_bridge_and_claims(own_cluster):
    env = own_cluster("tidy", nworkers=1)
    lc = LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name)
    bridge, folder = state(env)["bridge"], lc.dir
    assert links.exists(bridge) and claims_of(folder)
    assert env.inv("cluster.destroy", "--yes").returncode == 0
    assert not links.exists(bridge) and claims_of(folder) == []


def test_loopback_mode_still_runs_hosts_on_loopback(own_cluster):
    env = own_cluster("loop", nworkers=1, network={"mode": "loopback"})
    assert all(node.host.startswith("127.0.") for node in env.info.nodes)
    assert state(env)["bridge"] is None
    assert sh(env.info, env.info.workers[0], "hostname").stdout.strip() == env.info.workers[0].name


def test_no_network_namespaces_is_one_line_naming_the_fallback(tmp_path):
    """Where the kernel or a container refuses bridges (here: an `ip` that says so), the launch fails in
    one line that names the setting to fall back on, and leaves nothing behind."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ip").write_text("#!/bin/sh\ncase \"$*\" in *route*) echo '[]'; exit 0;; esac\n"
                             "cat > /dev/null; echo 'RTNETLINK answers: Operation not permitted' >&2; exit 2\n")
    (fake / "ip").chmod(0o755)
    config = tmp_path / "nonet.json"
    config.write_text(json.dumps({"cluster_name": "nanonet", "provider": "local", "nworkers": 1, "dev_host": False,
                                  "image": str(REPO / "examples" / "image"), "ttl": 0}))
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state"),
           "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers")}
    line = one_line_error(run_inv("cluster.launch", "--config", str(config), env=env))
    assert "Operation not permitted" in line and '"mode": "loopback"' in line
    assert not (tmp_path / "state" / "local" / "nanonet").exists()
    assert claims_of((tmp_path / "state" / "local" / "nanonet").resolve()) == []


def test_a_large_cluster_is_one_aligned_network():
    block = Block("netns", 2, 2)
    assert str(block.network) == "198.18.2.0/23" and block.prefix(1) == "198.18.3"
    assert block.gateway == "198.18.3.254" and block.bridge == "clb-2"
    assert Block("netns", 256, 1).prefix(0) == "198.19.0" and Block("netns", 511, 1).gateway == "198.19.255.254"
    assert Block("loopback", 5, 2).prefix(1) == "127.0.6"


def test_shaping_commands_split_latency_and_loss_between_the_two_ends():
    spec = parse_network({"rate": "1gbit", "latency": "2ms", "loss": "1%"}, file="x.json")
    assert (spec.rate_bit, spec.latency_us, spec.loss_pct) == (10**9, 2000, 1.0)
    root, child = links.qdisc_commands("clv0-1", spec)
    assert root.startswith("qdisc add dev clv0-1 root handle 1: netem limit 100000 delay 1000us loss 0.5012")
    assert child.startswith("qdisc add dev clv0-1 parent 1:1 handle 10: tbf rate 1000000000bit burst 500000 ")
    # Each end loses p with (1 - p)^2 = 0.99: both together lose the configured 1 %.
    each = float(root.split("loss ")[1].rstrip("%")) / 100
    assert abs((1 - each) ** 2 - 0.99) < 1e-6
    assert links.qdisc_commands("eth0", NetworkSpec()) == []
    assert links.qdisc_commands("eth0", parse_network({"rate": "10mbps"}, file="x")) == \
        ["qdisc add dev eth0 root handle 1: tbf rate 80000000bit burst 40000 latency 50ms"]
