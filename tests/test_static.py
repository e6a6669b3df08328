"""The static provider: existing machines listed in the config (here, the hosts of a local cluster)."""

from __future__ import annotations

import json

from cloister.cluster.servers import read_servers
from conftest import run_inv


def test_static_cluster_of_existing_machines(local_cluster, tmp_path):
    info = local_cluster.info
    hosts = [info.master.host] + [w.host for w in info.workers]
    config = tmp_path / "static.json"
    config.write_text(json.dumps({"cluster_name": "lab", "provider": "static", "hosts": hosts,
                                  "ssh_key": info.ssh_key, "user": info.user}))
    env = {**local_cluster.env(), "INVOKE_CLOISTER_CONFIG": str(config),
           "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers"),
           "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state")}

    launched = run_inv("cluster.launch", env=env)
    assert launched.returncode == 0, launched.stderr
    recorded = read_servers(tmp_path / "servers", cluster_name="lab")
    assert recorded.provider == "static"
    assert [n.host for n in recorded.cluster_nodes] == hosts
    assert (tmp_path / "servers" / "servers.txt").read_text().split() == hosts[1:]
    # Host keys seen on first contact were recorded, and they are the hosts' real keys.
    known = (tmp_path / "state" / "static" / "lab" / "known_hosts").read_text()
    real = {line.split()[0]: line.split()[2] for line in open(info.known_hosts)}
    assert {line.split()[0]: line.split()[2] for line in known.splitlines()} == {h: real[h] for h in hosts}

    ran = run_inv("cluster.run", "hostname", env=env)
    assert ran.returncode == 0, ran.stderr
    for node in info.cluster_nodes:
        assert node.name in ran.stdout

    status = run_inv("cluster.status", env=env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("reachable") == len(hosts)

    # Destroying a static cluster forgets it and leaves the machines alone.
    gone = run_inv("cluster.destroy", "--yes", env=env)
    assert gone.returncode == 0, gone.stderr
    assert not (tmp_path / "servers" / "cluster.json").exists()
    still = local_cluster.inv("cluster.run", "true")
    assert still.returncode == 0, still.stderr


def test_static_launch_names_an_unreachable_machine(local_cluster, tmp_path):
    info = local_cluster.info
    hosts = [info.master.host, info.workers[0].host, "127.0.254.9"]  # nothing listens on the last one
    config = tmp_path / "static.json"
    config.write_text(json.dumps({"cluster_name": "lab", "provider": "static", "hosts": hosts,
                                  "ssh_key": info.ssh_key, "user": info.user}))
    env = {**local_cluster.env(), "INVOKE_CLOISTER_CONFIG": str(config), "INVOKE_CLOISTER_SSH_TIMEOUT": "2",
           "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers"),
           "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state")}
    proc = run_inv("cluster.launch", env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == ["[127.0.254.9] connection refused (is sshd running?)",
                                                "no SSH after 2s: 1/3 hosts failed"]
