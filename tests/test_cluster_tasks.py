"""cluster.* tasks through `inv` subprocesses, against real sshd hosts."""

from __future__ import annotations

import json
import shlex
import shutil
import re
from pathlib import Path

import pytest

from cloister.transport import hosts
from cloister.providers.local.machines import LocalCluster
from cloister.cluster.servers import TEXT_FILES
from conftest import no_traceback, one_line_error, run_inv

RULE = "-" * 15


def blocks(stdout: str) -> dict[frozenset[str], tuple[str, str]]:
    """Parse folded `cluster.run` output: {hosts: (header suffix such as 'exit 3', body)}."""
    lines = stdout.splitlines()
    found: dict[frozenset[str], tuple[str, str]] = {}
    index = 0
    while index < len(lines):
        assert lines[index] == RULE and lines[index + 2] == RULE, f"not a block header at line {index}: {stdout}"
        match = re.fullmatch(r"(\S+) \((\d+)\)\s*(.*)", lines[index + 1])
        assert match, lines[index + 1]
        names = match.group(1).split(",")
        assert len(names) == int(match.group(2))
        end = index + 3
        while end < len(lines) and not (lines[end] == RULE and end + 2 < len(lines) and lines[end + 2] == RULE):
            end += 1
        found[frozenset(names)] = (match.group(3), "".join(line + "\n" for line in lines[index + 3:end]))
        index = end
    return found


def addresses(nodes) -> frozenset[str]:
    return frozenset(node.host for node in nodes)


def sh(info, node, command: str):
    with hosts.connection(info, node, connect_timeout=5) as cxn:
        return cxn.run(command, timeout=20)


# ---------------------------------------------------------------- cluster.run


def test_identical_outputs_fold_into_one_block(local_cluster):
    proc = local_cluster.inv("cluster.run", "echo same")
    assert proc.returncode == 0, proc.stderr
    # The dev host is no cluster member: `all` means the master and the workers.
    assert blocks(proc.stdout) == {addresses(local_cluster.info.cluster_nodes): ("", "same\n")}


def test_differing_outputs_are_shown_per_group(local_cluster):
    info = local_cluster.info
    first_two = info.workers[:2]
    pattern = "|".join(node.name for node in first_two)
    proc = local_cluster.inv("cluster.run", f"case $(hostname) in {pattern}) echo A;; *) echo B;; esac")
    assert proc.returncode == 0, proc.stderr
    assert blocks(proc.stdout) == {
        addresses(first_two): ("", "A\n"),
        addresses(info.cluster_nodes) - addresses(first_two): ("", "B\n"),
    }


def test_every_host_under_its_own_header(local_cluster):
    proc = local_cluster.inv("cluster.run", "hostname")
    assert proc.returncode == 0, proc.stderr
    assert blocks(proc.stdout) == {frozenset([n.host]): ("", n.name + "\n") for n in local_cluster.info.cluster_nodes}


@pytest.mark.parametrize("role", ["master", "workers", "dev"])
def test_role_selects_hosts(local_cluster, role):
    info = local_cluster.info
    expected = {"master": [info.master], "workers": info.workers, "dev": [info.dev]}[role]
    proc = local_cluster.inv("cluster.run", "--role", role, "hostname")
    assert proc.returncode == 0, proc.stderr
    assert blocks(proc.stdout) == {frozenset([n.host]): ("", n.name + "\n") for n in expected}


def test_hosts_by_name_or_address(local_cluster):
    info = local_cluster.info
    by_name, by_address = info.workers[-1], info.master
    proc = local_cluster.inv("cluster.run", "--hosts", f"{by_name.name},{by_address.host}", "hostname")
    assert proc.returncode == 0, proc.stderr
    assert blocks(proc.stdout) == {frozenset([by_name.host]): ("", by_name.name + "\n"),
                                   frozenset([by_address.host]): ("", by_address.name + "\n")}


@pytest.mark.parametrize("flags, message", [
    (["--hosts", "nowhere,also-nowhere"], "--hosts: nowhere, also-nowhere not in cluster"),
    (["--role", "everyone"], "role 'everyone': expected one of"),
    (["--timeout", "soon"], "--timeout 'soon': expected a positive number"),
])
def test_bad_selection_is_a_one_line_error(local_cluster, flags, message):
    assert message in one_line_error(local_cluster.inv("cluster.run", *flags, "hostname"))


def test_stream_prefixes_every_line_with_its_host(local_cluster):
    proc = local_cluster.inv("cluster.run", "--stream", "echo one; echo two; hostname")
    assert proc.returncode == 0, proc.stderr
    assert RULE not in proc.stdout
    seen: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        match = re.fullmatch(r"\[(\S+)\] (.*)", line)
        assert match, f"unprefixed line {line!r}"
        seen.setdefault(match.group(1), []).append(match.group(2))
    assert seen == {n.host: ["one", "two", n.name] for n in local_cluster.info.cluster_nodes}


def test_a_command_failing_on_one_host(local_cluster):
    info = local_cluster.info
    bad = info.workers[1]
    proc = local_cluster.inv("cluster.run", f'[ "$(hostname)" = {bad.name} ] && exit 3; echo fine')
    assert proc.returncode != 0
    no_traceback(proc)
    assert blocks(proc.stdout) == {addresses(info.cluster_nodes) - {bad.host}: ("", "fine\n"),
                                   frozenset([bad.host]): ("exit 3", "")}
    assert proc.stderr.splitlines() == [f"[{bad.host}] exit 3", f"1/{len(info.cluster_nodes)} hosts failed"]


def test_timeout_abandons_the_command(local_cluster):
    # The timeout covers the SSH handshake too, so leave room for a loaded machine.
    proc = local_cluster.inv("cluster.run", "--role", "master", "--timeout", "3", "sleep 30; echo late")
    assert proc.returncode != 0
    no_traceback(proc)
    assert "late" not in proc.stdout
    assert proc.stderr.splitlines() == [f"[{local_cluster.info.master.host}] timed out after 3s",
                                        "1/1 hosts failed"]
    # The remote side ended the command too: nothing is left behind on the host.
    left = local_cluster.inv("cluster.run", "--role", "master", "pgrep -fx 'sleep 30' || echo none")
    assert left.stdout.strip().endswith("none"), left.stdout


def test_a_dead_host_is_named_and_the_others_still_run(own_cluster):
    env = own_cluster("dead", nworkers=3)
    info = env.info
    dead = info.workers[1]
    assert LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name).kill_host(dead.name)
    alive = [n for n in info.cluster_nodes if n != dead]

    proc = env.inv("cluster.run", "hostname")
    assert proc.returncode != 0
    no_traceback(proc)
    found = blocks(proc.stdout)
    assert {names: body for names, (_, body) in found.items() if names != {dead.host}} == \
        {frozenset([n.host]): n.name + "\n" for n in alive}
    # A dead host answers nothing, as on a real network: no refusal, the connection cannot be made.
    assert re.match(r"error: (connection timed out|No route to host)", found[frozenset([dead.host])][1])
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and errors[1] == f"1/{len(info.cluster_nodes)} hosts failed"
    assert re.match(rf"\[{re.escape(dead.host)}\] (connection timed out|No route to host)", errors[0])

    streamed = env.inv("cluster.run", "--stream", "hostname")
    assert streamed.returncode != 0
    assert sorted(streamed.stdout.splitlines()) == sorted(f"[{n.host}] {n.name}" for n in alive)
    assert streamed.stderr.splitlines() == errors

    status = env.inv("cluster.status")
    assert status.returncode != 0
    no_traceback(status)
    assert status.stderr.strip() == f"1/{len(info.nodes)} nodes not running: {dead.name}"


# ---------------------------------------------------------------- copy-dns, status, destroy, login


def test_copy_dns_puts_servers_on_every_node_and_the_key_on_the_master(local_cluster):
    info = local_cluster.info
    for node in info.nodes:
        sh(info, node, "rm -rf ~/cloister ~/.ssh/cloister_key")
    proc = local_cluster.inv("cluster.copy-dns")
    assert proc.returncode == 0, proc.stderr
    servers = Path(local_cluster.settings.servers_dir)
    local_nodes = json.loads((servers / "cluster.json").read_text())["nodes"]
    for node in info.nodes:
        # One connection per node: read everything over its SFTP channel (relative paths are in the home).
        with hosts.connection(info, node, connect_timeout=5) as cxn:
            sftp = cxn.sftp()

            def read(path: str) -> str:
                with sftp.open(path) as remote_file:
                    return remote_file.read().decode()

            for name in TEXT_FILES:
                assert read(f"cloister/servers/{name}") == (servers / name).read_text(), (node.name, name)
            remote = json.loads(read("cloister/servers/cluster.json"))
            assert remote["ssh_key"] == "~/.ssh/cloister_key"
            assert remote["known_hosts"] == "~/cloister/known_hosts"
            assert remote["cluster_name"] == info.cluster_name
            assert remote["nodes"] == local_nodes
            assert read("cloister/known_hosts") == Path(info.known_hosts).read_text()
            # The cluster's own key, authorized everywhere; the user's key never leaves this machine.
            cluster_key = Path(json.loads((servers / "cluster.json").read_text())["extra"]["cluster_key"])
            public = cluster_key.with_name(cluster_key.name + ".pub").read_text().strip()
            assert read(".ssh/authorized_keys").count(public) == 1
            if node == info.master:
                assert read(".ssh/cloister_key") == cluster_key.read_text() != Path(info.ssh_key).read_text()
                key = sftp.stat(".ssh/cloister_key")
                assert (key.st_mode & 0o777, key.st_uid) == (0o600, sftp.stat(".").st_uid)
            else:
                with pytest.raises(FileNotFoundError):
                    sftp.stat(".ssh/cloister_key")


def test_the_master_can_reach_a_worker_with_what_copy_dns_left(local_cluster):
    """The copied key and known_hosts are usable: strict host-key checking from the master to a worker."""
    info = local_cluster.info
    worker = info.workers[0]
    hop = sh(info, info.master, f"ssh -i ~/.ssh/cloister_key -o UserKnownHostsFile=~/cloister/known_hosts "
                                f"-o StrictHostKeyChecking=yes -o BatchMode=yes {worker.host} hostname")
    assert (hop.exited, hop.stdout) == (0, worker.name + "\n"), hop.stderr


def test_status_lists_every_node(local_cluster):
    proc = local_cluster.inv("cluster.status")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "running" in line]
    assert len(rows) == len(local_cluster.info.nodes)
    for node in local_cluster.info.nodes:
        assert any(node.name in row and node.host in row and node.role in row for row in rows), node


def test_login_opens_a_shell_on_the_chosen_host(local_cluster):
    info = local_cluster.info
    master = local_cluster.inv("cluster.login", input="hostname\n", timeout=30)
    assert (master.returncode, master.stdout) == (0, info.master.name + "\n"), master.stderr
    worker = local_cluster.inv("cluster.login", "--worker", "2", input="hostname\n", timeout=30)
    assert (worker.returncode, worker.stdout) == (0, info.workers[1].name + "\n"), worker.stderr
    assert "--worker 99: the cluster has workers 1.." in one_line_error(
        local_cluster.inv("cluster.login", "--worker", "99"))
    assert "--worker 'two': expected an integer" in one_line_error(
        local_cluster.inv("cluster.login", "--worker", "two"))


def test_destroy_asks_then_tasks_on_the_destroyed_cluster_fail_cleanly(own_cluster):
    env = own_cluster("bye", nworkers=1)
    refused = env.inv("cluster.destroy", input="")
    assert "pass --yes" in one_line_error(refused)
    assert env.inv("cluster.run", "true").returncode == 0

    proc = env.inv("cluster.destroy", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"destroyed local cluster '{env.cfg.cluster_name}'" in proc.stdout
    assert not (Path(env.settings.servers_dir) / "cluster.json").exists()

    status = one_line_error(env.inv("cluster.status"))
    assert status == f"no local cluster '{env.cfg.cluster_name}' is running; run inv cluster.launch"
    assert "run inv cluster.launch first" in one_line_error(env.inv("cluster.run", "hostname"))


# ---------------------------------------------------------------- inv --list and --help


def cluster_tasks() -> dict[str, object]:
    from tasks import ns

    collection = ns.collections["cluster"]
    return {f"cluster.{name}": collection[name] for name in collection.task_names}


def test_list_shows_every_cluster_task_with_a_docstring():
    proc = run_inv("--list")
    assert proc.returncode == 0, proc.stderr
    listed = dict(re.findall(r"^  (cluster\.\S+)[ \t]*(.*)$", proc.stdout, flags=re.MULTILINE))
    expected = cluster_tasks()
    assert set(listed) == set(expected)
    assert {"cluster.launch", "cluster.destroy", "cluster.status", "cluster.login", "cluster.copy-dns",
            "cluster.run"} <= set(listed)
    assert [name for name, doc in listed.items() if not doc.strip()] == []


def test_every_flag_of_every_cluster_task_has_help():
    missing = [f"{name} --{arg.name}" for name, task in cluster_tasks().items()
               for arg in task.get_arguments() if not (arg.help or "").strip()]
    assert missing == []


def test_help_of_cluster_run_documents_every_flag():
    proc = run_inv("--help", "cluster.run")
    assert proc.returncode == 0, proc.stderr
    options = proc.stdout.split("Options:", 1)[1]
    documented = dict(re.findall(r"^\s+(?:-\w(?: \w+)?, )?--(?:\[no-\])?([\w-]+)(?:=\w+)?\s{2,}(\S.*)$", options,
                                 flags=re.MULTILINE))
    expected = {arg.name.replace("_", "-") for arg in cluster_tasks()["cluster.run"].get_arguments()}
    assert set(documented) == expected
    assert {"command", "config", "role", "hosts", "stream", "timeout"} <= expected


def test_plain_ssh_from_the_master_reaches_every_worker_with_no_flags(local_cluster):
    """copy-dns leaves an ssh config (cluster key, recorded host keys, user) that ~/.ssh/config includes."""
    info = local_cluster.info
    assert local_cluster.inv("cluster.copy-dns").returncode == 0
    for worker in info.workers:
        for name in (worker.host, worker.name):
            hop = sh(info, info.master, f"ssh {name} hostname")
            assert (hop.exited, hop.stdout) == (0, worker.name + "\n"), hop.stderr
    again = local_cluster.inv("cluster.copy-dns")
    assert again.returncode == 0
    config = sh(info, info.master, "cat ~/.ssh/config").stdout
    assert config.count("Include ~/.ssh/cloister_config") == 1


def test_mpirun_from_the_master_runs_across_the_workers(local_cluster):
    if not shutil.which("mpirun"):
        pytest.skip("openmpi-bin is not installed (make test installs it)")
    info = local_cluster.info
    assert local_cluster.inv("cluster.copy-dns").returncode == 0
    hosts_file = sh(info, info.master, "cat ~/cloister/servers/mpi_hosts.txt").stdout
    assert hosts_file.splitlines() == [f"{w.private or w.host} slots=1 max-slots=1" for w in info.workers]
    # Each host is a network host of its own: no interface flags, as on a real cluster.
    run = sh(info, info.master, "mpirun --hostfile ~/cloister/servers/mpi_hosts.txt -n %d hostname" % len(info.workers))
    assert run.exited == 0, run.stderr
    # mpirun's launcher may warn of a harmless setpgid race under load ("[host:pid] plm:rsh: Warning: ...").
    ranks = [line for line in run.stdout.splitlines() if not re.match(r"\[\S+:\d+\] plm:", line)]
    assert sorted(ranks) == sorted(w.name for w in info.workers)
    if not shutil.which("mpicc"):
        return
    # Messages between ranks go over the TCP BTL, which must pick each host's eth0 (and never lo).
    ring = sh(info, info.master, f"printf %s {shlex.quote(MPI_RING)} | mpicc -x c -o /tmp/ring - && "
                                 + " && ".join(f"scp -q /tmp/ring {w.name}:/tmp/ring" for w in info.workers)
                                 + f" && mpirun --hostfile ~/cloister/servers/mpi_hosts.txt -n {len(info.workers)} "
                                   "--mca btl tcp,self --mca btl_base_verbose 30 /tmp/ring")
    assert ring.exited == 0, ring.stderr
    assert f"ring {len(info.workers)}" in ring.stdout.splitlines()
    used = re.findall(r"btl:tcp: examining interface (\S+)", ring.stdout + ring.stderr)
    assert used and set(used) == {"eth0"}


MPI_RING = r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank, size, token = 0;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (rank == 0) {
        token = 1;
        MPI_Send(&token, 1, MPI_INT, 1 % size, 0, MPI_COMM_WORLD);
        MPI_Recv(&token, 1, MPI_INT, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        printf("ring %d\n", token);
    } else {
        MPI_Recv(&token, 1, MPI_INT, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        token++;
        MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD);
    }
    MPI_Finalize();
    return 0;
}
"""
