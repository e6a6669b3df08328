"""cluster.redeploy: real rsync over real SSH from the dev host to the sshd hosts of a local cluster.

Files are written straight into the dev host's home (a directory on this machine) and every node's
copy is checked by reading the node's home the same way: sha256 of every file, the type and mode
of every entry, symlink targets.
"""

from __future__ import annotations

import re
import hashlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cloister.transport import broadcast, transfer
from cloister import deploy
from cloister.layout import NODE_STATE
from cloister.providers.local.machines import LocalCluster
from cloister.cluster.servers import Node

from conftest import INV, REPO, ClusterEnv, make_cluster, run_inv

PATHS = ("clamor", "weld", "cloister", ".bashrc")


# -- helpers ---------------------------------------------------------------

def home(env: ClusterEnv, node: Node) -> Path:
    return LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name).host_dir(node.name) / "home"


def chown_tree(path: Path) -> None:
    user = pwd.getpwnam("ubuntu")
    for root, dirs, files in os.walk(path):
        for item in (root, *(os.path.join(root, n) for n in dirs + files)):
            os.lchown(item, user.pw_uid, user.pw_gid)


def write_tree(base: Path, seed: int) -> None:
    """Mixed content: empty, small, ~300 KiB and 2 MiB files, nesting, a symlink, an executable, odd names."""
    rng = __import__("random").Random(seed)
    files = {
        "empty": b"",
        "small.txt": f"seed {seed}\n".encode(),
        "sub/mid.bin": rng.randbytes(300 * 1024),
        "sub/deeper/big.bin": rng.randbytes(2 * 1024 * 1024),
        "name with spaces é.txt": b"odd name\n",
    }
    for rel, data in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (base / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(base / "run.sh", 0o755)
    link = base / "sub" / "link"
    if not link.is_symlink():
        link.symlink_to("mid.bin")
    chown_tree(base)


def snapshot(root: Path, paths=PATHS) -> dict[str, tuple]:
    """Every entry under ``paths`` of ``root``: type, permission bits and content hash or link target."""
    out: dict[str, tuple] = {}

    def entry(path: Path) -> None:
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())

    for name in paths:
        top = root / name
        if not top.exists() and not top.is_symlink():
            continue
        entry(top)
        if top.is_dir() and not top.is_symlink():
            for dirpath, dirs, files in os.walk(top):
                for n in dirs + files:
                    entry(Path(dirpath) / n)
    # Each node's own cloister files (servers/, runs/, known_hosts) are not part of a redeploy.
    kept = tuple(path.rstrip("/") for path in NODE_STATE)
    return {rel: v for rel, v in out.items() if not any(rel == k or rel.startswith(k + "/") for k in kept)}


def assert_all_match(env: ClusterEnv, nodes=None) -> dict[str, tuple]:
    want = snapshot(home(env, env.info.dev))
    assert len(want) > 5
    for node in nodes if nodes is not None else env.info.cluster_nodes:
        got = snapshot(home(env, node))
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        assert not (missing or extra or wrong), f"{node.name}: missing {missing[:5]} extra {extra[:5]} differ {wrong[:5]}"
    return want


def node_lines(proc: subprocess.CompletedProcess, env: ClusterEnv) -> dict[str, str]:
    lines = {}
    for line in proc.stdout.splitlines():
        for node in env.info.cluster_nodes:
            if line.startswith(f"[{node.host}] "):
                lines[node.host] = line
    return lines


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def rd(tmp_path_factory) -> ClusterEnv:
    """A master, 6 workers (7 nodes) and a dev host, for this module; weld/ exists on the dev host."""
    env = make_cluster(tmp_path_factory.mktemp("redeploy"), f"rd{os.getpid() % 100000}", nworkers=6, dev=True)
    try:
        dev = home(env, env.info.dev)
        write_tree(dev / "weld", seed=1)
        yield env
    finally:
        from cloister.cluster import lifecycle as lib

        lib.destroy(env.cfg, settings=env.settings)


# -- flat and tree -------------------------------------------------------------

def test_flat_redeploy_every_file_on_every_node(rd):
    dev = home(rd, rd.info.dev)
    write_tree(dev / "clamor" / "flat", seed=2)
    (dev / ".bashrc").write_text("export CLOISTER_FLAT=1\n")
    proc = rd.inv("cluster.redeploy")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    lines = node_lines(proc, rd)
    assert set(lines) == {n.host for n in rd.info.cluster_nodes}
    assert all(" files, " in line and " in " in line for line in lines.values()), lines
    assert "to 7/7 nodes" in proc.stdout and "(flat, 8 at a time, key auth" in proc.stdout
    assert_all_match(rd)

    again = rd.inv("cluster.redeploy")
    assert again.returncode == 0, again.stderr
    assert all("] 0 files, 0 B in " in line for line in node_lines(again, rd).values()), again.stdout


def test_tree_redeploy_is_identical_and_spares_the_dev_host(rd):
    dev = home(rd, rd.info.dev)
    write_tree(dev / "clamor" / "tree", seed=3)
    (dev / "weld" / "small.txt").write_text("changed for the tree\n")
    proc = rd.inv("cluster.redeploy", "--tree")
    assert proc.returncode == 0, proc.stderr
    lines = node_lines(proc, rd)
    assert len(lines) == 7
    from_dev = [h for h, line in lines.items() if line.endswith(f" from {rd.info.dev.host}")]
    assert len(from_dev) == broadcast.TREE_SEEDS, proc.stdout
    assert "(tree, " in proc.stdout
    assert_all_match(rd)


def test_delete_removes_a_file_from_every_node(rd):
    dev = home(rd, rd.info.dev)
    doomed = dev / "clamor" / "doomed.txt"
    doomed.write_text("short-lived\n")
    chown_tree(doomed)
    assert rd.inv("cluster.redeploy", "--paths", "clamor/").returncode == 0
    assert all((home(rd, n) / "clamor" / "doomed.txt").exists() for n in rd.info.cluster_nodes)

    doomed.unlink()
    keep = rd.inv("cluster.redeploy", "--paths", "clamor/")
    assert keep.returncode == 0, keep.stderr
    assert all((home(rd, n) / "clamor" / "doomed.txt").exists() for n in rd.info.cluster_nodes)

    gone = rd.inv("cluster.redeploy", "--paths", "clamor/", "--delete")
    assert gone.returncode == 0, gone.stderr
    assert all(", 1 deleted in " in line for line in node_lines(gone, rd).values()), gone.stdout
    assert not any((home(rd, n) / "clamor" / "doomed.txt").exists() for n in rd.info.cluster_nodes)
    assert_all_match(rd)


def test_cloister_files_on_the_nodes_survive_a_redeploy_of_cloister(rd):
    # copy-dns and experiment runs keep files under ~/cloister, which the default paths redeploy.
    dev = home(rd, rd.info.dev)
    dev_servers_txt = dev / "cloister" / "servers" / "servers.txt"
    original = dev_servers_txt.read_text()
    dev_servers_txt.write_text("10.9.9.9\n")
    (dev / "cloister" / "tool.py").write_text("print('cloister scripts on the cluster')\n")
    chown_tree(dev / "cloister")
    node = rd.info.workers[0]
    servers_txt = home(rd, node) / "cloister" / "servers" / "servers.txt"
    before = servers_txt.read_text()
    log = home(rd, node) / "cloister" / "runs" / "dsum" / "20260101-000000-abcd" / "worker0.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("not downloaded yet\n")
    chown_tree(home(rd, node) / "cloister" / "runs")
    try:
        proc = rd.inv("cluster.redeploy", "--paths", "cloister/", "--delete")
        assert proc.returncode == 0, proc.stderr
        assert (home(rd, node) / "cloister" / "tool.py").exists()
        assert servers_txt.read_text() == before != "10.9.9.9\n"
        assert log.read_text() == "not downloaded yet\n"
    finally:
        dev_servers_txt.write_text(original)
        (dev / "cloister" / "tool.py").unlink()
        shutil.rmtree(home(rd, node) / "cloister" / "runs")
        assert rd.inv("cluster.redeploy", "--paths", "cloister/", "--delete").returncode == 0


def test_dry_run_changes_nothing(rd):
    dev = home(rd, rd.info.dev)
    assert rd.inv("cluster.redeploy").returncode == 0
    extra = home(rd, rd.info.master) / "clamor" / "only-on-master.txt"
    extra.write_text("would be deleted\n")
    chown_tree(extra)
    before = {n.host: snapshot(home(rd, n)) for n in rd.info.cluster_nodes}
    (dev / "clamor" / "dry-new.txt").write_text("would be sent\n")
    (dev / "weld" / "small.txt").write_text("changed in the dry run\n")
    chown_tree(dev / "clamor")
    proc = rd.inv("cluster.redeploy", "--dry-run", "--delete")
    assert proc.returncode == 0, proc.stderr
    lines = node_lines(proc, rd)
    assert len(lines) == 7 and all("would send 2 files" in line for line in lines.values()), proc.stdout
    assert "clamor/dry-new.txt" in proc.stdout and "weld/small.txt" in proc.stdout
    assert "*deleting" in proc.stdout and "only-on-master.txt" in proc.stdout
    assert "delete 1" in lines[rd.info.master.host]
    after = {n.host: snapshot(home(rd, n)) for n in rd.info.cluster_nodes}
    assert after == before
    extra.unlink()
    assert rd.inv("cluster.redeploy").returncode == 0
    assert_all_match(rd)


def test_missing_path_is_skipped_with_a_warning(rd):
    proc = rd.inv("cluster.redeploy", "--paths", "clamor/,no-such-dir/,.bashrc")
    assert proc.returncode == 0, proc.stderr
    assert "warning: skipped no-such-dir/: not in the dev instance's home" in proc.stderr
    assert "redeployed clamor/ .bashrc from" in proc.stdout

    none = rd.inv("cluster.redeploy", "--paths", "nothing-here/")
    assert none.returncode == 1
    assert "nothing to redeploy" in none.stderr
    no_traceback(none)


@pytest.mark.parametrize("paths, message", [
    ("../etc", "'..' is not allowed"),
    ("/etc", "relative to the home directory"),
    ("clamor/,,weld/", "empty path"),
    (".", "whole home directory"),
    ("~bob/x", "relative to the home directory"),
])
def test_bad_paths_are_one_line_errors(rd, paths, message):
    proc = rd.inv("cluster.redeploy", f"--paths={paths}")
    assert proc.returncode == 1
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    no_traceback(proc)


def test_bad_configured_paths_name_the_config_key(rd, tmp_path):
    config = tmp_path / "bad-paths.json"
    config.write_text(json.dumps({**json.loads(rd.config_path.read_text()), "redeploy_paths": ["clamor/", "../up"]}))
    proc = run_inv("cluster.redeploy", env=dict(rd.env(), INVOKE_CLOISTER_CONFIG=str(config)))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{config}: key 'redeploy_paths' '../up': '..' is not allowed; " \
                                  f"paths stay inside the home directory"


def test_bad_redeploy_concurrency_is_one_line(rd):
    for value in ("lots", "0"):
        proc = run_inv("cluster.redeploy", env=dict(rd.env(), INVOKE_CLOISTER_REDEPLOY_CONCURRENCY=value))
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1 and "REDEPLOY_CONCURRENCY" in proc.stderr.upper()
        assert f"'{value}'" in proc.stderr or f" {value}" in proc.stderr


def test_agent_forwarding_needs_no_key_on_the_dev_host(rd, tmp_path):
    """With an agent holding the cluster key, the dev host and tree sources authenticate through it."""
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not agent_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        env = rd.env()
        env["SSH_AUTH_SOCK"] = str(agent_sock)
        subprocess.run(["ssh-add", "-q", rd.info.ssh_key], env=env, check=True, capture_output=True)
        for node in [rd.info.dev, *rd.info.cluster_nodes]:
            (home(rd, node) / deploy.REMOTE_KEY).unlink(missing_ok=True)
        deploy.close_masters(rd.info)  # no shared connection may authenticate for us
        write_tree(home(rd, rd.info.dev) / "clamor" / "agent", seed=4)
        proc = run_inv("cluster.redeploy", "--tree", env=env)
        assert proc.returncode == 0, proc.stderr
        assert "agent auth" in proc.stdout
        for node in [rd.info.dev, *rd.info.cluster_nodes]:
            assert not (home(rd, node) / deploy.REMOTE_KEY).exists(), node.name
        assert_all_match(rd)
    finally:
        os.kill(agent.pid, signal.SIGTERM)
        agent.wait(timeout=5)


def test_ctrl_c_stops_the_rsyncs_on_the_dev_host(rd):
    dev = home(rd, rd.info.dev)
    folder = dev / "clamor" / "interrupted"
    folder.mkdir()
    for i in range(3):
        (folder / f"big{i}.bin").write_bytes(os.urandom(40_000_000))
    chown_tree(folder)
    proc = subprocess.Popen([INV, "cluster.redeploy", "--paths", "clamor/"], cwd=REPO, env=rd.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until a node is receiving (rsync's temporary files appear)
            if any(p.name.startswith(".big") for n in rd.info.cluster_nodes
                   for p in (home(rd, n) / "clamor" / "interrupted").glob(".big*")):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["interrupted: redeploy stopped (Ctrl-C)"], err
    time.sleep(0.5)
    left = rd.inv("cluster.run", "--role", "dev", "pgrep -x rsync || echo none")
    assert left.stdout.strip().splitlines()[-1] == "none", left.stdout
    shutil.rmtree(folder)
    assert rd.inv("cluster.redeploy", "--delete").returncode == 0
    assert_all_match(rd)


# -- a dead node -------------------------------------------------------------------

def test_a_dead_node_is_named_and_the_others_complete(own_cluster):
    env = own_cluster("rdkill", nworkers=5, dev=True)
    victim = env.info.workers[2]
    others = [n for n in env.info.cluster_nodes if n.host != victim.host]
    assert LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name).kill_host(victim.name)
    dev = home(env, env.info.dev)
    for flags, seed in (((), 5), (("--tree",), 6)):
        write_tree(dev / "clamor" / f"kill{seed}", seed=seed)
        proc = env.inv("cluster.redeploy", *flags)
        assert proc.returncode == 1, proc.stdout
        no_traceback(proc)
        err = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning: skipped weld/")]
        assert err[-1] == "redeploy: 1/6 hosts failed", proc.stderr
        assert re.fullmatch(rf"\[{re.escape(victim.host)}\] ssh failed: ssh: connect to host {re.escape(victim.host)} "
                            r"port 22: (Connection timed out|No route to host)", err[0]), err
        assert len(err) == 2, proc.stderr
        assert set(node_lines(proc, env)) == {n.host for n in others}
        assert "to 5/6 nodes" in proc.stdout
        assert_all_match(env, others)

    # Host keys are checked from the dev host: a node whose recorded key no longer matches is refused.
    spoofed = env.info.workers[0]
    lc = LocalCluster(state_root=env.settings.state_dir, cluster=env.cfg.cluster_name)
    _, other_key = __import__("cloister.providers.local.machines", fromlist=["_keypair"])._keypair()
    for path in (Path(env.info.known_hosts), lc.host_dir(env.info.dev.name) / "etc_ssh" / "ssh_known_hosts"):
        lines = path.read_text().splitlines()
        path.write_text("".join((f"{line.split()[0]} {other_key}" if spoofed.host in line.split()[0].split(",")
                                 else line) + "\n" for line in lines))
    deploy.close_masters(env.info)  # a shared connection opened with the genuine key would skip the check
    write_tree(dev / "clamor" / "spoof", seed=7)
    proc = env.inv("cluster.redeploy")
    assert proc.returncode == 1
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith("warning: skipped weld/")]
    assert f"[{spoofed.host}] ssh failed: host key does not match known_hosts (changed or spoofed); " \
           f"refusing to connect" in err, proc.stderr
    assert err[-1] == "redeploy: 2/6 hosts failed"
    assert not (home(env, spoofed) / "clamor" / "spoof").exists()
    assert_all_match(env, [n for n in others if n.host != spoofed.host])

    # No dev host, no redeploy: one line naming it.
    assert lc.kill_host(env.info.dev.name)
    proc = env.inv("cluster.redeploy")
    assert proc.returncode == 1
    assert re.fullmatch(rf"\[{re.escape(env.info.dev.host)}\] dev instance unreachable: "
                        r"(connection timed out|No route to host)", proc.stderr.strip()), proc.stderr


# -- pure logic: the broadcast tree's schedule ------------------------------------------

def _fake_hops(fail: set[str] = frozenset()):
    log: list[tuple[str, str]] = []

    def hop(source, target, attempt):
        label = source if isinstance(source, str) else source.host
        log.append((label, target.host))
        time.sleep(0.01)
        ok = target.host not in fail
        return transfer.Transfer(host=target.host, name=target.name, source=label, ok=ok, duration=0.01,
                                 error=None if ok else "down", attempts=attempt)

    return hop, log


def test_tree_schedule_doubles_and_dev_seeds_only_two():
    targets = [Node(role="worker", id=str(i), host=f"n{i}") for i in range(16)]
    hop, log = _fake_hops()
    final, hops = broadcast.schedule("dev", targets, tree=True, concurrency=64, hop=hop, on_result=None)
    assert len(final) == 16 and all(t.ok for t in final.values())
    assert sum(1 for src, _ in log if src == "dev") == 2
    # every target received exactly once, each from a holder that already had it
    have = {"dev"}
    for src, dst in log:
        assert src in have
        have.add(dst)
    hop, log = _fake_hops()
    broadcast.schedule("dev", targets, tree=False, concurrency=8, hop=hop, on_result=None)
    assert {src for src, _ in log} == {"dev"}


def test_tree_schedule_retries_a_failed_hop_from_the_dev_host():
    targets = [Node(role="worker", id=str(i), host=f"n{i}") for i in range(8)]
    hop, log = _fake_hops(fail={"n5"})
    final, hops = broadcast.schedule("dev", targets, tree=True, concurrency=4, hop=hop, on_result=None)
    assert not final["n5"].ok and final["n5"].source == "dev"
    assert all(final[t.host].ok for t in targets if t.host != "n5")
    assert max(len([1 for s, d in log if d == t.host]) for t in targets) <= 2


# -- pure logic: inputs and rsync output ---------------------------------------------

def test_check_paths_normalises():
    assert deploy.check_paths(["clamor/", "~/weld/", "./a//b", ".bashrc", "clamor/"]) == \
        ["clamor/", "weld/", "a/b", ".bashrc"]


def test_parse_rsync_stats_and_items():
    out = """\
>f+++++++++ clamor/a b.txt
cd+++++++++ clamor/sub/
*deleting   clamor/old.txt

Number of files: 5 (reg: 3, dir: 2)
Number of deleted files: 1 (reg: 1)
Number of regular files transferred: 3
Total file size: 2,097,152 bytes
Total transferred file size: 1,048,576 bytes
Total bytes sent: 1,049,911
Total bytes received: 96
"""
    s = transfer.parse(out)
    assert (s.files, s.deleted, s.size, s.total_size, s.sent, s.received) == (3, 1, 1048576, 2097152, 1049911, 96)
    assert s.items == (">f+++++++++ clamor/a b.txt", "cd+++++++++ clamor/sub/", "*deleting   clamor/old.txt")


def test_ssh_command_checks_host_keys_and_shares_connections():
    ssh = transfer.Ssh(user="u", port=2222, key="~/.ssh/k", known_hosts="~/.ssh/kh", control_path="~/.ssh/cm-%C")
    argv = ssh.argv()
    assert "StrictHostKeyChecking=yes" in argv and "StrictHostKeyChecking=no" not in " ".join(argv)
    assert ["-p", "2222"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert "UserKnownHostsFile=~/.ssh/kh" in argv and "ControlMaster=auto" in argv
    with pytest.raises(ValueError):
        transfer.Ssh(known_hosts="/a b").argv()
