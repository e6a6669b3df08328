"""Bad configs and flags through `inv` as a user runs it: one line on stderr, no traceback; precedence end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cloister.cluster import lifecycle as lib
from cloister.settings import Settings
from cloister.config import load_config
from cloister.cluster.servers import ClusterInfo, Node, write_servers
from conftest import REPO, run_inv


def inv_env(root: Path, **extra: str) -> dict[str, str]:
    """An environment with servers/ and state in ``root`` and no INVOKE_CLOISTER_* from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_CLOISTER_")}
    env.update(INVOKE_CLOISTER_SERVERS_DIR=str(root / "servers"), INVOKE_CLOISTER_STATE_DIR=str(root / "state"))
    env.update(extra)
    return env


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got: {proc.stderr!r}"
    return lines[0]


def key_file(root: Path, mode: int = 0o600) -> str:
    path = root / "keys" / "lab.pem"
    path.parent.mkdir(exist_ok=True)
    path.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----\n")
    path.chmod(mode)
    return str(path)


LOCAL = {"cluster_name": "bad", "provider": "local", "nworkers": 1, "dev_host": False, "ttl": 0}
EC2 = {"cluster_name": "bad", "region": "us-west-2", "ami": "ami-0123456789abcdef0", "key_name": "lab"}


def with_key(data: dict, mode: int = 0o600):
    return lambda root: {**data, "ssh_key": key_file(root, mode)}


# name -> (file content: dict/list (JSON), str, bytes, a callable(root) returning one of those, or None for
# "no file"; what the one line must contain besides the file name: a string or a tuple of strings)
BAD_CONFIGS = {
    "missing file": (None, "no such config file"),
    "directory": ("DIR", "is a directory"),
    "not utf-8": (b'{"cluster_name": "\xff\xfe"}', "not UTF-8"),
    "invalid json": ('{\n  "cluster_name": "bad",\n  "nworkers": ,\n}', "invalid JSON at line 3, column"),
    "empty file": ("", "invalid JSON at line 1, column 1"),
    "not an object": ([LOCAL], "expected a JSON object"),
    "unknown key": ({**LOCAL, "nworker": 2}, "key 'nworker': unknown key; did you mean 'nworkers'?"),
    "missing cluster_name": ({k: v for k, v in LOCAL.items() if k != "cluster_name"}, "key 'cluster_name': missing"),
    "bad cluster_name": ({**LOCAL, "cluster_name": "Alice_Cluster"}, "key 'cluster_name': expected a name"),
    "long cluster_name": ({**LOCAL, "cluster_name": "a" * 41}, "key 'cluster_name': expected a name"),
    "unknown provider": ({**LOCAL, "provider": "gcp"}, "key 'provider': expected one of ec2, local, static"),
    "negative nworkers": ({**LOCAL, "nworkers": -1}, "key 'nworkers': expected a non-negative integer, got -1"),
    "nworkers as words": ({**LOCAL, "nworkers": "four"}, "key 'nworkers': expected a non-negative integer"),
    "nworkers as bool": ({**LOCAL, "nworkers": True}, "key 'nworkers': expected a non-negative integer, got true"),
    "tiny root_size": ({**LOCAL, "root_size": 4}, "key 'root_size': expected a volume size"),
    "negative spot": ({**LOCAL, "spot": -0.5}, "key 'spot': expected false, true, or a maximum price"),
    "bad ttl": ({**LOCAL, "ttl": "soon"}, "key 'ttl': expected a duration"),
    "open ssh_cidr": ({**LOCAL, "ssh_cidr": "everyone"}, "key 'ssh_cidr': expected 'auto', a CIDR"),
    "dev_host as string": ({**LOCAL, "dev_host": "yes"}, "key 'dev_host': expected true or false"),
    "redeploy_paths as string": ({**LOCAL, "redeploy_paths": "src/"}, "key 'redeploy_paths': expected a list"),
    "bad user": ({**LOCAL, "user": "Root User"}, "key 'user': expected a login user name"),
    "local as root": ({**LOCAL, "user": "root"}, "key 'user': root cannot log in to local hosts"),
    "too large": ('{"cluster_name": "bad"' + " " * (1 << 20) + "}", "larger than 1 MiB; expected a JSON config file"),
    "missing image": ({**LOCAL, "image": "no/such/image"}, "key 'image': directory no/such/image does not exist"),
    "ec2 without region": ({k: v for k, v in EC2.items() if k != "region"}, "key 'region': missing"),
    "ec2 bad ami": ({**EC2, "ami": "ubuntu-22.04"}, "key 'ami': expected an AMI id"),
    "ec2 missing key file": ({**EC2, "ssh_key": "/nonexistent/lab.pem"}, "key 'ssh_key': key file /nonexistent"),
    "key readable by others": (with_key(EC2, 0o644), ("key 'ssh_key': key file", "mode 0644; expected 0600")),
    "legacy key twice": ({**EC2, "identity_file": "old"}, "key 'identity_file': legacy name of 'key_name'"),
    "static without hosts": ({"cluster_name": "bad", "provider": "static"}, "key 'hosts': missing"),
    "static empty hosts": ({"cluster_name": "bad", "provider": "static", "hosts": []}, "key 'hosts':"),
}


def write_bad(root: Path, content) -> Path:
    path = root / "bad.json"
    if callable(content):
        content = content(root)
    if content is None:
        return path
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content, indent=2))
    return path


@pytest.mark.parametrize("content, expected", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, content, expected):
    path = write_bad(tmp_path, content)
    line = one_line_error(run_inv("cluster.status", "--config", str(path), env=inv_env(tmp_path)))
    assert line.startswith(str(path)), line
    for fragment in (expected,) if isinstance(expected, str) else expected:
        assert fragment in line, line


def launched_nothing(root: Path) -> bool:
    return not any((root / "state" / "local").glob("*")) and not (root / "servers" / "cluster.json").exists()


@pytest.mark.parametrize("name", ["unknown key", "negative nworkers", "missing image", "invalid json"])
def test_launch_with_a_bad_config_launches_nothing(tmp_path, name):
    content, expected = BAD_CONFIGS[name]
    path = write_bad(tmp_path, content)
    line = one_line_error(run_inv("cluster.launch", "--config", str(path), env=inv_env(tmp_path)))
    assert line.startswith(str(path)) and expected in line, line
    assert launched_nothing(tmp_path)


@pytest.mark.parametrize("value, expected", [
    ("-2", "(from --nworkers): key 'nworkers': expected a non-negative integer, got -2"),
    ("many", "--nworkers 'many': expected an integer"),
])
def test_launch_with_a_bad_nworkers_flag(tmp_path, value, expected):
    path = write_bad(tmp_path, LOCAL)
    line = one_line_error(run_inv("cluster.launch", "--config", str(path), "--nworkers", value,
                                  env=inv_env(tmp_path)))
    assert expected in line, line
    assert launched_nothing(tmp_path)


def test_servers_of_another_cluster_are_refused(tmp_path):
    mine = write_bad(tmp_path, LOCAL)
    write_servers(tmp_path / "servers", ClusterInfo(provider="local", cluster_name="other", user="ubuntu",
                                                   ssh_key="k", nodes=[Node("master", "m", "127.0.0.9")]))
    line = one_line_error(run_inv("cluster.run", "--config", str(mine), "hostname", env=inv_env(tmp_path)))
    assert "describes cluster 'other'" in line and "the config names 'bad'" in line


# ---------------------------------------------------------------- precedence, end to end


def no_cluster_running(proc, name: str = "bad") -> None:
    """The config loaded fine: the only complaint is that the cluster is not running."""
    assert one_line_error(proc) == f"no local cluster '{name}' is running; run inv cluster.launch"


def test_file_beats_env(tmp_path):
    env = inv_env(tmp_path, INVOKE_CLOISTER_TTL="soon")
    # Control: with no ttl in the file, the env value is used (and rejected, naming where it came from).
    without = write_bad(tmp_path, {k: v for k, v in LOCAL.items() if k != "ttl"})
    line = one_line_error(run_inv("cluster.status", "--config", str(without), env=env))
    assert "(from cloister.ttl): key 'ttl'" in line and '"soon"' in line
    with_ttl = write_bad(tmp_path, LOCAL)
    no_cluster_running(run_inv("cluster.status", "--config", str(with_ttl), env=env))


def project_with(root: Path, invoke_yaml: dict) -> Path:
    """A project folder using the real tasks/ but its own invoke.yaml (Invoke reads it beside tasks/)."""
    project = root / "project"
    project.mkdir()
    (project / "tasks").symlink_to(REPO / "tasks", target_is_directory=True)
    (project / "invoke.yaml").write_text(yaml.safe_dump(invoke_yaml))
    return project


def test_env_beats_invoke_yaml(tmp_path):
    project = project_with(tmp_path, {"cloister": {"ttl": "from-yaml"}})
    path = write_bad(tmp_path, {k: v for k, v in LOCAL.items() if k != "ttl"})
    args = ("--search-root", str(project), "cluster.status", "--config", str(path))
    from_yaml = one_line_error(run_inv(*args, env=inv_env(tmp_path), cwd=project))
    assert '"from-yaml"' in from_yaml, from_yaml
    from_env = one_line_error(run_inv(*args, env=inv_env(tmp_path, INVOKE_CLOISTER_TTL="from-env"), cwd=project))
    assert '"from-env"' in from_env, from_env
    no_cluster_running(run_inv(*args, env=inv_env(tmp_path, INVOKE_CLOISTER_TTL="3h"), cwd=project))


def test_invoke_yaml_beats_builtin_defaults(tmp_path):
    project = project_with(tmp_path, {"cloister": {"config": str(tmp_path / "bad.json"), "user": "Not Valid"}})
    write_bad(tmp_path, {k: v for k, v in LOCAL.items() if k != "user"})
    line = one_line_error(run_inv("--search-root", str(project), "cluster.status", env=inv_env(tmp_path),
                                  cwd=project))
    # cloister.config came from this invoke.yaml too: no --config was given.
    assert line.startswith(str(tmp_path / "bad.json")) and '"Not Valid"' in line, line


def test_flag_beats_file(tmp_path):
    path = write_bad(tmp_path, {**LOCAL, "nworkers": 3})
    env = inv_env(tmp_path, INVOKE_CLOISTER_NWORKERS="2")
    proc = run_inv("cluster.launch", "--config", str(path), "--nworkers", "1", env=env)
    try:
        assert proc.returncode == 0, proc.stderr
        assert "1 master, 1 workers" in proc.stdout
        assert (tmp_path / "servers" / "servers.txt").read_text().count("\n") == 1
    finally:
        lib.destroy(load_config(path), settings=Settings(servers_dir=str(tmp_path / "servers"),
                                                         state_dir=str(tmp_path / "state")))
    assert launched_nothing(tmp_path)


def test_invoke_yaml_mirrors_the_collection_defaults():
    from tasks import ns

    mirrored = yaml.safe_load((REPO / "invoke.yaml").read_text())["cloister"]
    assert mirrored == ns.configuration()["cloister"]


@pytest.mark.parametrize("var, value, expected", [
    ("INVOKE_CLOISTER_NWORKERS", "abc", "wrong type"),
    ("INVOKE_CLOISTER_CONCURRENCY", "many", "wrong type"),
    ("INVOKE_CLOISTER_REDEPLOY_PATHS", "clamor/", "a list cannot come from the environment"),
])
def test_badly_typed_env_var_is_one_line(tmp_path, var, value, expected):
    env = {**os.environ, var: value, "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers"),
           "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state")}
    proc = run_inv("cluster.status", env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"environment variable {var}={value!r}: {expected}")


@pytest.mark.parametrize("args, line", [
    (["exp.run", "--benchmark", "dsum", "-p", "abc"], "-p 'abc': expected an integer"),
    (["exp.run", "--benchmark", "dsum", "-k", "two"], "-k 'two': expected a positive integer"),
    (["exp.run", "--benchmark", "dsum", "-k", "0"], "-k '0': expected a positive integer"),
    (["exp.run", "--benchmark", "dsum", "--timeout", "-5"], "--timeout '-5': expected a positive number"),
    (["exp.sweep", "--benchmark", "dsum", "--timeout", "0"], "--timeout '0': expected a positive number"),
    (["exp.run", "--benchmark", "dsum", "--timeout", "soon"], "--timeout 'soon': expected a positive number"),
    (["exp.sweep", "--benchmark", "dsum", "--repeat", "x"], "--repeat 'x': expected an integer"),
    (["cluster.run", "--timeout", "x", "hostname"], "--timeout 'x': expected a positive number"),
    (["cluster.run", "--timeout=-1", "hostname"], "--timeout '-1': expected a positive number"),
    (["cluster.launch", "--nworkers", "many"], "--nworkers 'many': expected an integer"),
])
def test_badly_typed_flag_is_one_line(tmp_path, args, line):
    env = {**os.environ, "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers"),
           "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state"), "INVOKE_CLOISTER_RUNS_DIR": str(tmp_path / "runs")}
    proc = run_inv(*args, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [line]


@pytest.mark.parametrize("setting", ["INVOKE_CLOISTER_CONFIG", "INVOKE_CLOISTER_EXPERIMENTS"])
def test_a_device_given_as_a_config_file_is_refused_unread(tmp_path, setting):
    """/dev/zero never ends and a FIFO never answers: both are refused before they are read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    config = write_bad(tmp_path, LOCAL)
    for path in ("/dev/zero", str(fifo)):
        env = inv_env(tmp_path, **{"INVOKE_CLOISTER_CONFIG": str(config), setting: path})
        line = one_line_error(run_inv("exp.list" if "EXPERIMENTS" in setting else "cluster.status", env=env,
                                      timeout=30))
        assert line.startswith(f"{path}: not a regular file (a device, pipe or socket); expected"), line


def test_a_yaml_alias_bomb_in_experiments_yaml_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "experiments.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    env = inv_env(tmp_path, INVOKE_CLOISTER_CONFIG=str(write_bad(tmp_path, LOCAL)), INVOKE_CLOISTER_EXPERIMENTS=str(bomb))
    line = one_line_error(run_inv("exp.list", env=env, timeout=30))
    assert line.startswith(f"{bomb}: YAML aliases expand it to more than 10000 values"), line
