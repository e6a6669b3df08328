"""cloister.cluster.servers: the servers/ folder, its atomic writes and its errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cloister.cluster import servers
from cloister.errors import CloisterError, ServersError
from cloister.transport.hosts import select_nodes
from cloister.cluster.servers import TEXT_FILES, ClusterInfo, Node, read_servers, write_servers
from conftest import one_line_error as one_line
from conftest import run_inv


def make_info(name: str = "alpha", nworkers: int = 3, *, dev: bool = True) -> ClusterInfo:
    """An EC2-like cluster: private and public addresses differ, so the text files can be told apart."""
    nodes = [Node(role="master", id="i-m", host="54.0.0.1", private="10.0.0.1", public="ec2-m.example",
                  name=f"{name}-master")]
    nodes += [Node(role="worker", id=f"i-w{i}", host=f"54.0.1.{i}", private=f"10.0.1.{i}",
                   public=f"ec2-w{i}.example", name=f"{name}-worker-{i}") for i in range(1, nworkers + 1)]
    if dev:
        nodes.append(Node(role="dev", id="i-d", host="54.0.2.1", private="10.0.2.1", public="ec2-d.example",
                          name=f"{name}-dev"))
    return ClusterInfo(provider="ec2", cluster_name=name, user="ubuntu", ssh_key="/keys/alpha.pem",
                       nodes=nodes, known_hosts="/state/known_hosts", region="us-west-2",
                       extra={"launched": 1700000000.0})


def one_line_error(directory: Path, **kwargs) -> str:
    with pytest.raises(ServersError) as info:
        read_servers(directory, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, CloisterError)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_round_trip(tmp_path):
    info = make_info()
    write_servers(tmp_path / "servers", info)
    assert read_servers(tmp_path / "servers") == info
    assert read_servers(tmp_path / "servers", cluster_name="alpha") == info


def test_text_files_use_the_old_names_one_host_a_line(tmp_path):
    folder = write_servers(tmp_path / "servers", make_info(nworkers=2))
    read = {name: (folder / name).read_text() for name in TEXT_FILES}
    assert read == {
        "manager.txt": "ec2-m.example\n",
        "master.txt": "ec2-m.example\n",
        "servers.txt": "ec2-w1.example\nec2-w2.example\n",
        "servers_private.txt": "10.0.1.1\n10.0.1.2\n",
        "servers_public.txt": "ec2-w1.example\nec2-w2.example\n",
        "mpi_hosts.txt": "10.0.1.1 slots=1 max-slots=1\n10.0.1.2 slots=1 max-slots=1\n",
    }
    # The dev host is no cluster member: it is in cluster.json only.
    assert "ec2-d.example" not in "".join(read.values())
    assert json.loads((folder / "cluster.json").read_text())["nodes"][-1]["role"] == "dev"


def test_write_leaves_only_the_final_files(tmp_path):
    folder = tmp_path / "servers"
    write_servers(folder, make_info(nworkers=2))
    write_servers(folder, make_info(nworkers=5))
    assert sorted(p.name for p in folder.iterdir()) == sorted([*TEXT_FILES, "cluster.json"])
    assert len(read_servers(folder).workers) == 5


# 3: among the text files; 6: the rename of cluster.json itself, after its temp file was fully written.
@pytest.mark.parametrize("crash_at", [3, 6])
def test_crash_mid_write_keeps_the_previous_cluster_json(tmp_path, monkeypatch, crash_at):
    folder = tmp_path / "servers"
    before = make_info("alpha", nworkers=2)
    write_servers(folder, before)
    previous_json = (folder / "cluster.json").read_text()

    real_replace = os.replace
    calls = []

    def crash(src, dst):
        calls.append(dst)
        if len(calls) == crash_at:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_servers(folder, make_info("alpha", nworkers=7))
    monkeypatch.undo()

    assert len(calls) == crash_at, "the crash was not injected mid-write"
    assert (folder / "cluster.json").read_text() == previous_json
    if crash_at == 6:
        # servers.txt already lists the 7 workers, cluster.json still 2: the mix is refused, never guessed.
        assert "cluster.json disagrees" in one_line_error(folder, cluster_name="alpha")
    else:
        assert read_servers(folder, cluster_name="alpha") == before
    # The failed temp file is cleaned up, not left beside the real ones.
    assert sorted(p.name for p in folder.iterdir()) == sorted([*TEXT_FILES, "cluster.json"])


def test_other_cluster_is_refused_naming_both(tmp_path):
    write_servers(tmp_path, make_info("alpha"))
    message = one_line_error(tmp_path, cluster_name="beta")
    assert "'alpha'" in message and "'beta'" in message
    assert str(tmp_path / "cluster.json") in message


def test_missing_servers_says_launch_first(tmp_path):
    message = one_line_error(tmp_path / "servers")
    assert "run inv cluster.launch first" in message
    assert str(tmp_path / "servers" / "cluster.json") in message


def test_clear_removes_only_servers_files(tmp_path):
    write_servers(tmp_path, make_info())
    (tmp_path / "notes.txt").write_text("mine\n")
    servers.clear_servers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert "run inv cluster.launch first" in one_line_error(tmp_path)


CORRUPT = {
    "empty": b"",
    "truncated": b'{"provider": "ec2", "cluster_name": "alpha", "nodes": [',
    "not an object": b"[1, 2, 3]",
    "no nodes": b'{"provider": "ec2", "cluster_name": "alpha", "user": "u", "ssh_key": "k"}',
    "nodes not a list": b'{"provider": "ec2", "cluster_name": "alpha", "user": "u", "ssh_key": "k", "nodes": 5}',
    "unknown node field": (b'{"provider": "ec2", "cluster_name": "alpha", "user": "u", "ssh_key": "k",'
                           b' "nodes": [{"role": "master", "id": "i", "host": "h", "colour": "red"}]}'),
    "binary": b"\xff\xfe\x00garbage\x89PNG",
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_cluster_json_is_a_one_line_error(tmp_path, content):
    (tmp_path / "cluster.json").write_bytes(content)
    message = one_line_error(tmp_path, cluster_name="alpha")
    assert message.startswith(str(tmp_path / "cluster.json"))
    assert "run inv cluster.launch" in message


def test_cluster_json_that_is_a_directory(tmp_path):
    (tmp_path / "cluster.json").mkdir()
    message = one_line_error(tmp_path)
    assert "is a directory" in message


# ---------------------------------------------------------------- servers.txt edited by hand


def test_servers_txt_reordered_or_shortened_by_hand_sets_the_workers(tmp_path):
    folder = write_servers(tmp_path / "servers", make_info(nworkers=4))
    # Any name of a worker will do (the file holds public names); blank lines and comments are skipped.
    (folder / "servers.txt").write_text("# the fast ones first\nec2-w3.example\n\n54.0.1.1\nalpha-worker-4\n")
    info = read_servers(folder, cluster_name="alpha")
    assert [w.id for w in info.workers] == ["i-w3", "i-w1", "i-w4"]
    assert [n.role for n in info.nodes] == ["master", "worker", "worker", "worker", "dev"]
    # -k takes the first K of servers.txt.
    assert [n.id for n in select_nodes(info, role="workers", k=2)] == ["i-w3", "i-w1"]
    assert [n.id for n in select_nodes(info, k=1)] == ["i-m", "i-w3"]


@pytest.mark.parametrize("text, fragment", [
    ("ec2-w1.example\nec2-w9.example\n", "lists ec2-w9.example, but cluster.json disagrees: not a worker of "
                                         "cluster 'alpha'"),
    ("ec2-m.example\n", "lists ec2-m.example, but cluster.json disagrees"),
    ("ec2-w1.example\nalpha-worker-1\n", "lists alpha-worker-1 more times than cluster.json has workers there (1)"),
])
def test_servers_txt_naming_hosts_cluster_json_does_not_know_is_refused(tmp_path, text, fragment):
    folder = write_servers(tmp_path / "servers", make_info(nworkers=2))
    (folder / "servers.txt").write_text(text)
    message = one_line_error(folder, cluster_name="alpha")
    assert message.startswith(str(folder / "servers.txt")) and fragment in message, message


def test_inv_honours_servers_txt_and_refuses_what_it_cannot(local_cluster, tmp_path):
    folder = tmp_path / "servers"
    shutil.copytree(local_cluster.settings.servers_dir, folder)
    env = {**local_cluster.env(), "INVOKE_CLOISTER_SERVERS_DIR": str(folder)}
    workers = local_cluster.info.workers
    chosen = [workers[2], workers[0]]
    (folder / "servers.txt").write_text("".join(w.host + "\n" for w in chosen))
    proc = run_inv("cluster.run", "--stream", "--role", "workers", "hostname", env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(f"[{w.host}] {w.name}" for w in chosen)

    (folder / "servers.txt").write_text(workers[0].host + "\n10.99.99.99\n")
    line = one_line(run_inv("cluster.run", "hostname", env=env))
    assert line.startswith(f"{folder / 'servers.txt'} lists 10.99.99.99, but cluster.json disagrees"), line


def test_a_host_carrying_several_workers_may_be_listed_once_per_worker(tmp_path):
    nodes = [Node(role="master", id="m", host="10.0.0.1")]
    nodes += [Node(role="worker", id=f"w{i}", host="10.0.0.2", name=f"w{i}") for i in range(3)]
    folder = write_servers(tmp_path / "servers", ClusterInfo(provider="static", cluster_name="lab", user="u",
                                                             ssh_key="k", nodes=nodes))
    assert [w.id for w in read_servers(folder).workers] == ["w0", "w1", "w2"]
    (folder / "servers.txt").write_text("w2\n10.0.0.2\n")
    assert [w.id for w in read_servers(folder).workers] == ["w2", "w0"]
    (folder / "servers.txt").write_text("10.0.0.2\n" * 4)
    assert "lists 10.0.0.2 more times than cluster.json has workers there (3)" in one_line_error(folder)
