"""Process preparation through bash on this machine, no SSH: what each process gets, what the report says.

sudo and curl are stubs placed first on PATH, so no test can change this machine's kernel or reach a
metadata service; the stubs record how they were called.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cloister.runs.experiments import RunShape, load_registry, render
from cloister.runs import Proc, start_script
from cloister.runs.prepare import NodeFacts, parse_report, this_boot_id
from conftest import REPO

RUN_ID = "20260101-000000-abcd"
NASTY = "it's $(touch PWNED) `touch PWNED` \"x\" ; touch PWNED"
# Prints what a process was given: its personality, stack limit and the variables preparation sets.
SHOW = f"""#!{sys.executable}
import json, os, resource
soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
print(json.dumps({{"personality": open("/proc/self/personality").read().strip(),
                   "stack": "unlimited" if soft == resource.RLIM_INFINITY else soft,
                   **{{k: os.environ.get(k) for k in ("PUBLIC_HOSTNAME", "FROM_LOCAL_VARS", "FROM_VARS")}}}}))
"""


def stub(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {bin_dir}/calls\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def node_home(tmp_path: Path) -> Path:
    """A home with the benchmark directory ~/b w/ experiment_vars, ~/.local_vars, and stub sudo and curl."""
    home = tmp_path / "home"
    bdir = home / "b"
    bdir.mkdir(parents=True)
    (bdir / "show").write_text(SHOW)
    (bdir / "show").chmod(0o755)
    (bdir / "experiment_vars").write_text("export FROM_VARS=experiment_vars\n")
    (home / ".local_vars").write_text("export FROM_LOCAL_VARS=local_vars\nexport PUBLIC_HOSTNAME=overridden\n")
    (tmp_path / "bin").mkdir()
    stub(tmp_path / "bin", "sudo", "exit 0")
    stub(tmp_path / "bin", "curl", "exit 7")
    return home


def registry(tmp_path: Path, **entry):
    data = yaml.safe_load((REPO / "experiments.yaml").read_text())
    data["benchmarks"] = {"b": {"dir": "~/b", "binary": "./show", "commands": {"worker": "{binary}"}, **entry}}
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_registry(path).get("b")


def start(tmp_path: Path, bench, node: NodeFacts) -> tuple[list[dict], dict]:
    """Start one worker through bash as a node would; return the report and what the process saw."""
    home = tmp_path / "home"
    shape = RunShape(run_id=RUN_ID, k=1, nprocs=1, manager="m", worker_hosts=["h"], worker_endpoints=[("h", 1)])
    proc = Proc(role="worker", host="h", index=0, port=1, command=render(bench, "worker", shape, host="h", port=1))
    env = {**os.environ, "HOME": str(home), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", start_script(bench, RUN_ID, [proc], node=node)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    done = home / "cloister" / "runs" / "b" / RUN_ID / "worker0.exit"
    deadline = time.monotonic() + 10
    # The exit file is created before its code is written: wait for the code.
    while not (done.exists() and done.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    log = (home / "cloister" / "runs" / "b" / RUN_ID / f"worker0_{RUN_ID}.log").read_text()
    assert done.read_text().strip() == "0", log
    return parse_report(result.stdout), json.loads(log)


def by_item(report: list[dict]) -> dict[str, tuple[str, str]]:
    return {step["item"]: (step["status"], step["detail"]) for step in report}


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "bin" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_the_default_preparation_reaches_the_process(tmp_path, node_home):
    report, seen = start(tmp_path, registry(tmp_path), NodeFacts(public="ec2-1-2-3-4.example", shared_kernel=False))
    assert int(seen["personality"], 16) & 0x0040000  # ADDR_NO_RANDOMIZE
    assert seen["stack"] == "unlimited"
    # ~/.local_vars first, then PUBLIC_HOSTNAME (the old order: local_vars cannot override it), then experiment_vars
    assert seen == {**seen, "PUBLIC_HOSTNAME": "ec2-1-2-3-4.example", "FROM_LOCAL_VARS": "local_vars",
                    "FROM_VARS": "experiment_vars"}
    items = by_item(report)
    assert items["sysctl vm.overcommit_memory=1"] == ("done", "sudo sysctl -w vm.overcommit_memory=1")
    assert calls(tmp_path) == [f"{tmp_path}/bin/sudo -n sysctl -w vm.overcommit_memory=1"]
    assert items["disable_aslr"][0] == "done" and "-R on every process" in items["disable_aslr"][1]
    assert items["stack_limit"] == ("done", "ulimit -s unlimited")
    assert items["local_vars"] == ("done", "~/.local_vars sourced by every process")
    assert items["public_hostname"] == ("done", "PUBLIC_HOSTNAME=ec2-1-2-3-4.example (the address recorded in servers/)")
    assert items["dir"] == ("done", "cd ~/b")
    assert items["vars_file"] == ("done", "experiment_vars sourced by every process")


@pytest.mark.parametrize("node, why", [
    (NodeFacts(public="h", shared_kernel=True), "provider"),
    (NodeFacts(public="h", shared_kernel=False, boot_id=this_boot_id()), "boot id"),
])
def test_a_node_on_this_machines_kernel_never_gets_a_sysctl(tmp_path, node_home, node, why):
    bench = registry(tmp_path, prepare={"sysctl": {"vm.overcommit_memory": 1, "kernel.randomize_va_space": 0}})
    report, _ = start(tmp_path, bench, node)
    items = by_item(report)
    for item in ("sysctl vm.overcommit_memory=1", "sysctl kernel.randomize_va_space=0"):
        assert items[item] == ("skipped", "the node runs on this machine's kernel; never changed there"), why
    assert calls(tmp_path) == []


def test_a_refused_sysctl_is_reported_and_the_process_still_starts(tmp_path, node_home):
    stub(tmp_path / "bin", "sudo", "echo 'sudo: a password is required' >&2; exit 1")
    bench = registry(tmp_path, prepare={"sysctl": {"net.ipv4.tcp_rmem": "4096 87380 6291456"}})
    report, seen = start(tmp_path, bench, NodeFacts(public="h", shared_kernel=False))
    assert by_item(report)["sysctl net.ipv4.tcp_rmem=4096 87380 6291456"] == ("failed", "sudo: a password is required")
    # the value with spaces reached sysctl as one word
    assert calls(tmp_path) == [f"{tmp_path}/bin/sudo -n sysctl -w net.ipv4.tcp_rmem=4096 87380 6291456"]
    assert seen["FROM_VARS"] == "experiment_vars"


def test_every_item_can_be_switched_off(tmp_path, node_home):
    bench = registry(tmp_path, vars_file=None, prepare={"disable_aslr": False, "stack_limit": None, "local_vars": None,
                                                        "public_hostname": None, "sysctl": {}})
    report, seen = start(tmp_path, bench, NodeFacts(public="h", shared_kernel=False))
    assert not int(seen["personality"], 16) & 0x0040000
    assert (seen["FROM_LOCAL_VARS"], seen["FROM_VARS"], seen["PUBLIC_HOSTNAME"]) == (None, None, None)
    assert by_item(report) == {
        "sysctl": ("skipped", "none declared"), "disable_aslr": ("skipped", "off in experiments.yaml"),
        "stack_limit": ("skipped", "off in experiments.yaml"), "local_vars": ("skipped", "off in experiments.yaml"),
        "public_hostname": ("skipped", "off in experiments.yaml"), "dir": ("done", "cd ~/b"),
        "vars_file": ("skipped", "off in experiments.yaml")}
    assert calls(tmp_path) == []


def test_missing_local_vars_and_experiment_vars_are_reported_as_skipped(tmp_path, node_home):
    (node_home / ".local_vars").unlink()
    (node_home / "b" / "experiment_vars").unlink()
    report, seen = start(tmp_path, registry(tmp_path), NodeFacts(public="h", shared_kernel=True))
    assert by_item(report)["local_vars"] == ("skipped", "~/.local_vars not present")
    assert by_item(report)["vars_file"] == ("skipped", "experiment_vars not in ~/b")
    assert seen["PUBLIC_HOSTNAME"] == "h"


def test_hostile_values_arrive_literally(tmp_path, node_home):
    odd = node_home / NASTY
    odd.write_text("export FROM_LOCAL_VARS=odd\n")
    bench = registry(tmp_path, prepare={"local_vars": f"~/{NASTY}"})
    report, seen = start(tmp_path, bench, NodeFacts(public=NASTY, shared_kernel=True))
    assert (seen["PUBLIC_HOSTNAME"], seen["FROM_LOCAL_VARS"]) == (NASTY, "odd")
    assert by_item(report)["public_hostname"] == ("done", f"PUBLIC_HOSTNAME={NASTY} (the address recorded in servers/)")
    assert not list(tmp_path.rglob("PWNED"))


def test_imds_gives_the_public_hostname_with_a_token(tmp_path, node_home):
    stub(tmp_path / "bin", "curl", 'case "$*" in *"-X PUT"*) echo tok123;; '
                                   '*"metadata-token: tok123"*public-hostname*) echo ec2-9-9-9-9.compute.example;; '
                                   '*) exit 22;; esac')
    bench = registry(tmp_path, prepare={"public_hostname": "imds"})
    report, seen = start(tmp_path, bench, NodeFacts(public="recorded.example", shared_kernel=True))
    assert seen["PUBLIC_HOSTNAME"] == "ec2-9-9-9-9.compute.example"
    assert by_item(report)["public_hostname"] == ("done", "PUBLIC_HOSTNAME=ec2-9-9-9-9.compute.example (from IMDSv2)")
    put, get = calls(tmp_path)
    assert "-m 1" in put and "http://169.254.169.254/latest/api/token" in put
    assert "X-aws-ec2-metadata-token: tok123" in get


def test_imds_silent_falls_back_to_the_recorded_address(tmp_path, node_home):
    bench = registry(tmp_path, prepare={"public_hostname": "imds"})
    report, seen = start(tmp_path, bench, NodeFacts(public="recorded.example", shared_kernel=True))
    assert seen["PUBLIC_HOSTNAME"] == "recorded.example"
    assert by_item(report)["public_hostname"] == (
        "done", "PUBLIC_HOSTNAME=recorded.example (IMDS did not answer; the address recorded in servers/)")
