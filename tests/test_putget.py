"""cluster.put / cluster.get: real rsync over real SSH between this machine and every node.

Uses the session's shared cluster under a unique directory that is removed afterwards.
"""

from __future__ import annotations

import re
import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from cloister.providers.local.machines import LocalCluster

from test_redeploy import home, no_traceback


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def unique(local_cluster):
    """A fresh directory name in every node's home, removed from every node at the end."""
    name = f"pg-{uuid.uuid4().hex[:8]}"
    yield name
    for node in local_cluster.info.nodes:
        shutil.rmtree(home(local_cluster, node) / name, ignore_errors=True)


def make_payload(base: Path) -> Path:
    payload = base / "payload"
    (payload / "sub").mkdir(parents=True)
    (payload / "a.txt").write_text("alpha\n")
    (payload / "sub" / "b.bin").write_bytes(os.urandom(200_000))
    (payload / "sub" / "c d.txt").write_text("spaced\n")
    return payload


def test_put_and_get_round_trip(local_cluster, unique, tmp_path):
    env = local_cluster
    nodes = env.info.cluster_nodes
    payload = make_payload(tmp_path)
    want = digest_tree(payload)

    # a directory into a directory that does not exist yet (parents are created)
    proc = env.inv("cluster.put", str(payload), f"{unique}/deep/")
    assert proc.returncode == 0, proc.stderr
    for node in nodes:
        assert f"[{node.host}] 3 files, " in proc.stdout
        assert digest_tree(home(env, node) / unique / "deep" / "payload") == want
    assert f"on {len(nodes)}/{len(nodes)} nodes" in proc.stdout
    assert not (home(env, env.info.dev) / unique).exists()  # the dev host is not a cluster node

    # a single file to an exact name
    proc = env.inv("cluster.put", str(payload / "a.txt"), f"~/{unique}/renamed.txt")
    assert proc.returncode == 0, proc.stderr
    assert all((home(env, n) / unique / "renamed.txt").read_text() == "alpha\n" for n in nodes)

    # and back: every node's copy in LOCALDIR/{host}/
    out = tmp_path / "got"
    proc = env.inv("cluster.get", f"{unique}/deep/payload", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(n.host for n in nodes)
    for node in nodes:
        assert f"[{node.host}] 3 files, " in proc.stdout
        assert digest_tree(out / node.host / "payload") == want


def test_put_by_role(local_cluster, unique, tmp_path):
    env = local_cluster
    src = tmp_path / "only-workers.txt"
    src.write_text("w\n")
    proc = env.inv("cluster.put", str(src), f"{unique}/", "--role", "workers")
    assert proc.returncode == 0, proc.stderr
    for node in env.info.workers:
        assert (home(env, node) / unique / "only-workers.txt").exists()
    assert not (home(env, env.info.master) / unique).exists()


def test_get_names_the_node_that_lacks_the_file(local_cluster, unique, tmp_path):
    env = local_cluster
    nodes = env.info.cluster_nodes
    for node in nodes:
        (home(env, node) / unique).mkdir()
        (home(env, node) / unique / "result.log").write_text(f"from {node.name}\n")
    lacking = nodes[-1]
    (home(env, lacking) / unique / "result.log").unlink()
    out = tmp_path / "logs"
    proc = env.inv("cluster.get", f"{unique}/result.log", str(out))
    assert proc.returncode == 1
    no_traceback(proc)
    err = proc.stderr.strip().splitlines()
    assert err[-1] == f"get: 1/{len(nodes)} hosts failed"
    assert len(err) == 2 and err[0].startswith(f"[{lacking.host}] rsync exit 23") and "No such file" in err[0]
    for node in nodes[:-1]:
        assert (out / node.host / "result.log").read_text() == f"from {node.name}\n"


def test_put_to_a_dead_node_names_it(own_cluster, tmp_path):
    env = own_cluster("pgkill", nworkers=2)
    victim = env.info.workers[0]
    assert LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name).kill_host(victim.name)
    src = tmp_path / "x.txt"
    src.write_text("x\n")
    proc = env.inv("cluster.put", str(src), "x.txt")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    # Found when its warm connection is opened, before rsync: worded as cluster.run words it.
    assert len(err) == 2 and err[1] == "put: 1/3 hosts failed"
    assert re.fullmatch(rf"\[{re.escape(victim.host)}\] (connection timed out|No route to host)", err[0]), err
    for node in env.info.cluster_nodes:
        if node.host != victim.host:
            assert (home(env, node) / "x.txt").read_text() == "x\n"


@pytest.mark.parametrize("args, message", [
    (("cluster.put", "/no/such/file", "x"), "LOCAL '/no/such/file': no such file or directory"),
    (("cluster.put", "pyproject.toml", "x", "--role", "bosses"), "role 'bosses': expected one of"),
    (("cluster.put", "pyproject.toml", "~bob/x"), "'~user' paths are not supported"),
    (("cluster.get", "x", "pyproject.toml"), "LOCALDIR 'pyproject.toml': exists and is not a directory"),
    (("cluster.get", "", "out"), "REMOTE '': expected a path on the nodes"),
])
def test_bad_input_is_one_line(local_cluster, args, message):
    proc = local_cluster.inv(*args)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    no_traceback(proc)
