"""Bad cloister.* settings, flags and cluster keys through `inv`: one line on stderr, no traceback, before
any SSH; and hand edits to servers/servers.txt honoured or refused, never ignored."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cloister.cluster.servers import write_servers
from conftest import one_line_error, run_inv


def settings_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_CLOISTER_")}
    env.update(INVOKE_CLOISTER_SERVERS_DIR=str(root / "servers"), INVOKE_CLOISTER_STATE_DIR=str(root / "state"),
               INVOKE_CLOISTER_RUNS_DIR=str(root / "runs"))
    env.update(extra)
    return env


@pytest.fixture
def immutable(tmp_path):
    """A directory even root cannot write in (chattr +i), made writable again afterwards."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("task", [["cluster.status"], ["cluster.run", "hostname"], ["exp.list"]])
def test_servers_dir_that_is_a_file(tmp_path, task):
    (tmp_path / "afile").write_text("not a folder\n")
    line = one_line_error(run_inv(*task, env=settings_env(tmp_path, INVOKE_CLOISTER_SERVERS_DIR=str(tmp_path / "afile"))))
    assert line == f"cloister.servers_dir (INVOKE_CLOISTER_SERVERS_DIR) {tmp_path / 'afile'}: is not a directory"


@pytest.mark.parametrize("where, expected", [
    ("immutable", "{dir}: is not writable"),
    ("immutable/runs", "{dir}: cannot be created: {parent} is not writable"),
    ("afile/runs", "{dir}: cannot be created: {parent} is not a directory"),
])
def test_runs_dir_that_cannot_be_written(tmp_path, immutable, where, expected):
    (tmp_path / "afile").write_text("")
    folder = tmp_path / where
    line = one_line_error(run_inv("exp.list", env=settings_env(tmp_path, INVOKE_CLOISTER_RUNS_DIR=str(folder))))
    assert line == "cloister.runs_dir (INVOKE_CLOISTER_RUNS_DIR) " + expected.format(dir=folder, parent=folder.parent)


@pytest.mark.parametrize("task", [["exp.list"], ["exp.run", "--benchmark", "dsum"], ["cluster.status"]])
def test_experiments_file_that_is_a_directory(tmp_path, task):
    line = one_line_error(run_inv(*task, env=settings_env(tmp_path, INVOKE_CLOISTER_EXPERIMENTS=str(tmp_path))))
    assert line == f"cloister.experiments (INVOKE_CLOISTER_EXPERIMENTS) {tmp_path}: is a directory, expected a file"


@pytest.mark.parametrize("var, value, expected", [
    ("INVOKE_CLOISTER_CONNECT_TIMEOUT", "-1", "cloister.connect_timeout (INVOKE_CLOISTER_CONNECT_TIMEOUT): "
                                              "expected a positive number, got -1.0"),
    ("INVOKE_CLOISTER_CONNECT_TIMEOUT", "inf", "expected a positive number, got inf"),
    ("INVOKE_CLOISTER_SSH_TIMEOUT", "0", "cloister.ssh_timeout (INVOKE_CLOISTER_SSH_TIMEOUT): expected a positive"),
    ("INVOKE_CLOISTER_CONCURRENCY", "0", "cloister.concurrency (INVOKE_CLOISTER_CONCURRENCY): expected a positive"),
])
def test_bad_numeric_setting(tmp_path, var, value, expected):
    line = one_line_error(run_inv("cluster.status", env=settings_env(tmp_path, **{var: value})))
    assert expected in line, line


@pytest.mark.parametrize("args", [["cluster.run", "--timeout", "inf", "hostname"],
                                  ["cluster.run", "--timeout", "nan", "hostname"],
                                  ["exp.run", "--benchmark", "dsum", "--timeout", "inf"],
                                  ["exp.sweep", "--benchmark", "dsum", "--timeout", "Infinity"]])
def test_timeout_that_is_not_a_number_of_seconds(tmp_path, args):
    value = args[args.index("--timeout") + 1]
    assert one_line_error(run_inv(*args, env=settings_env(tmp_path))) == \
        f"--timeout {value!r}: expected a positive number"


# ---------------------------------------------------------------- the cluster key


def with_key(local_cluster, root: Path, key: Path | None) -> dict[str, str]:
    """An environment whose servers/ is the shared cluster's, except that cluster.json names ``key``."""
    info = dataclasses.replace(local_cluster.info, ssh_key=str(key))
    write_servers(root / "servers", info)
    return {**local_cluster.env(), "INVOKE_CLOISTER_SERVERS_DIR": str(root / "servers")}


@pytest.mark.parametrize("task", [["cluster.login"], ["cluster.login", "--worker", "1"], ["cluster.run", "hostname"],
                                  ["cluster.put", "/etc/hostname", "x"], ["cluster.copy-dns"]])
def test_a_key_readable_by_others_is_refused_alike_by_every_task(local_cluster, tmp_path, task):
    key = tmp_path / "key"
    shutil.copy(local_cluster.info.ssh_key, key)
    key.chmod(0o644)
    proc = run_inv(*task, env=with_key(local_cluster, tmp_path, key), input="", timeout=60)
    assert one_line_error(proc) == f"cluster key file {key} has mode 0644; expected 0600 or narrower (chmod 600 {key})"


@pytest.mark.parametrize("task", [["cluster.login"], ["cluster.run", "hostname"], ["cluster.get", "x", "y"]])
def test_a_missing_key_names_the_key_file(local_cluster, tmp_path, task):
    key = tmp_path / "gone" / "id_ed25519"
    proc = run_inv(*task, env=with_key(local_cluster, tmp_path, key), input="", timeout=60)
    assert one_line_error(proc) == f"cluster key file {key} (ssh_key in cluster.json): No such file or directory"
