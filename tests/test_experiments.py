"""experiments.yaml: validation, rendering of role commands, quoting, --args and benchmark names (no SSH)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cloister.errors import ConfigError, ExperimentError
from cloister.runs.experiments import RunShape, load_registry, parse_args, remote_dir, render, validate_name
from cloister.runs import Proc, log_name, start_script
from cloister.runs.prepare import NodeFacts
from conftest import REPO

DEFAULTS = yaml.safe_load((REPO / "experiments.yaml").read_text())["defaults"]
# Start scripts run here in bash: this machine's kernel must never be changed by a test.
THIS_MACHINE = NodeFacts(public="127.0.0.1", shared_kernel=True)


def write_registry(tmp_path: Path, benchmarks: dict, *, defaults: dict | None = None, name="experiments.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"defaults": DEFAULTS if defaults is None else defaults,
                                    "benchmarks": benchmarks}))
    return path


def registry_error(tmp_path: Path, benchmarks: dict, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_registry(write_registry(tmp_path, benchmarks, **kwargs))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def bench(tmp_path: Path, name: str = "bench", **entry):
    return load_registry(write_registry(tmp_path, {name: entry})).get(name)


SHAPE = RunShape(run_id="20260101-000000-abcd", k=2, nprocs=3, manager="10.0.0.1", worker_hosts=["10.0.0.2", "10.0.0.3"],
                 worker_endpoints=[("10.0.0.2", 50000), ("10.0.0.2", 50001), ("10.0.0.2", 50002),
                                   ("10.0.0.3", 50000), ("10.0.0.3", 50001), ("10.0.0.3", 50002)])
ENDPOINTS = "10.0.0.2:50000,10.0.0.2:50001,10.0.0.2:50002,10.0.0.3:50000,10.0.0.3:50001,10.0.0.3:50002"


# ------------------------------------------------------------ the repository's registry


def test_repository_registry_loads_and_has_dsum():
    registry = load_registry(REPO / "experiments.yaml")
    dsum = registry.get("dsum")
    assert dsum.dir == "~/clamor/experiments/cpp/dsum"
    assert dsum.binary == dsum.worker_binary == "./dsum"
    assert (dsum.manager_port, dsum.master_port, dsum.worker_base) == (40000, 45000, 50000)
    assert dsum.metric and dsum.timeout > 0


# ------------------------------------------------------------ defaults = the old Clamor flags


def test_defaults_reproduce_the_old_clamor_layout(tmp_path):
    b = bench(tmp_path, "bench")
    assert b.dir == "~/clamor/experiments/cpp/bench"
    assert b.binary == b.worker_binary == "./bench"
    assert b.vars_file == "experiment_vars"
    assert (b.manager_port, b.worker_base) == (40000, 50000)
    assert 1 <= b.master_port <= 65535
    assert b.worker_port(0) == 50000 and b.worker_port(7) == 50007
    assert b.ready_log is None  # readiness = ports listening


def test_defaults_render_clamors_command_lines_token_by_token(tmp_path):
    """B = bench, P = 3, K = 2, W = the worker hosts without ports, MANAGER = the master's host."""
    path = write_registry(tmp_path, {"bench": {}})
    assert "bench: {}" in path.read_text()
    b = load_registry(path).get("bench")
    w = "10.0.0.2,10.0.0.3"
    assert shlex.split(render(b, "manager", SHAPE, host="10.0.0.1", port=40000)) == [
        "./bench", "-i", "10.0.0.1", "-m", "manager", "-r", "40000", "-t", "3", "-l", "bench.weld", "-w", w, "-x", "6"]
    for i in range(3):
        assert shlex.split(render(b, "worker", SHAPE, host="10.0.0.3", port=b.worker_port(i), index=3 + i)) == [
            "./bench", "-i", "10.0.0.3", "-m", "worker", "-p", str(50000 + i), "-d", "10.0.0.1", "-l", "bench.weld"]
    # The old master port was 70000 (not a TCP port): 45000; the rest is Clamor's command word for word.
    assert shlex.split(render(b, "master", SHAPE, host="10.0.0.1", port=b.master_port)) == [
        "./bench", "-i", "10.0.0.1", "-p", "45000", "-m", "master", "-d", "10.0.0.1", "-l", "bench.weld", "-t", "3",
        "-w", w, "-x", "6"]


def test_worker_hosts_and_worker_endpoints_placeholders(tmp_path):
    b = bench(tmp_path, "bench", commands={"master": "{binary} {worker_hosts} {worker_endpoints}"})
    assert render(b, "master", SHAPE, host="10.0.0.1") == f"./bench 10.0.0.2,10.0.0.3 {ENDPOINTS}"


def test_worker_binary_override_only_changes_the_worker(tmp_path):
    b = bench(tmp_path, "bench", worker_binary="./{benchmark}-worker")
    assert b.worker_binary == "./bench-worker"
    assert render(b, "worker", SHAPE, host="10.0.0.2", port=50000, index=0).startswith("./bench-worker -i 10.0.0.2 ")
    assert render(b, "manager", SHAPE, host="10.0.0.1").startswith("./bench -i ")
    assert render(b, "master", SHAPE, host="10.0.0.1").startswith("./bench -i ")


def test_overrides_ports_commands_ready_and_timeouts(tmp_path):
    b = bench(tmp_path, "bench", dir="/opt/b", ports={"worker_base": 7000}, ready={"log": "^ready$"},
              commands={"worker": "{binary} --port {port} --index {index} --run {run_id} --k {k}"},
              timeout=5, ready_timeout=2.5)
    assert b.dir == "/opt/b" and b.worker_base == 7000
    assert (b.manager_port, b.master_port) == (40000, DEFAULTS["ports"]["master"])  # merged, not replaced
    assert b.ready_log == "^ready$" and b.timeout == 5.0 and b.ready_timeout == 2.5
    assert render(b, "worker", SHAPE, host="h", port=b.worker_port(1), index=4) == (
        "./bench --port 7001 --index 4 --run 20260101-000000-abcd --k 2")


def test_env_and_args(tmp_path):
    b = bench(tmp_path, "bench", env={"DSUM_CHUNK": 0, "NAME": "a b"}, args="-n 5 --label 'x y'")
    assert b.env == {"DSUM_CHUNK": "0", "NAME": "a b"}
    shape = RunShape(**{**SHAPE.__dict__, "args": ["--extra", "two words"]})
    master = render(b, "master", shape, host="10.0.0.1", port=b.master_port)
    assert master.endswith(" -x 6 -n 5 --label 'x y' --extra 'two words'")
    # args go to the master only
    assert "-n 5" not in render(b, "worker", shape, host="10.0.0.2", port=50000, index=0)


# ------------------------------------------------------------ validation: one line naming benchmark and key


@pytest.mark.parametrize("entry, key, words", [
    ({"timout": 5}, "timout", ["unknown key", "did you mean 'timeout'"]),
    ({"ports": {"master": 70000}}, "ports.master", ["1-65535", "70000"]),
    ({"ports": {"manager": 0}}, "ports.manager", ["1-65535", "got 0"]),
    ({"ports": {"worker_base": "50000"}}, "ports.worker_base", ["1-65535"]),
    ({"ports": {"driver": 1}}, "ports.driver", ["unknown port"]),
    ({"commands": {"worker": "{binary} -i {hots}"}}, "commands.worker", ["unknown placeholder {hots}"]),
    ({"commands": {"master": "{binary} {"}}, "commands.master", ["bad template"]),
    ({"commands": {"driver": "./x"}}, "commands.driver", ["unknown role"]),
    ({"commands": {"manager": ""}}, "commands.manager", ["expected a command template"]),
    ({"ready": "logline"}, "ready", ["expected 'port' or {log: REGEX}"]),
    ({"ready": {"log": "(unclosed"}}, "ready.log", ["bad regex"]),
    ({"metric": "time=([0-9.]+"}, "metric", ["bad regex"]),
    ({"metric": "time=[0-9.]+"}, "metric", ["one group", "got 0 groups"]),
    ({"metric": "(time|t)=([0-9.]+)"}, "metric", ["one group", "got 2 groups"]),
    ({"ports": {"master": 40000}}, "ports.master", ["40000 is also ports.manager", "cannot share a port"]),
    ({"commands": {"master": "{binary} -w {workers}"}}, "commands.master", ["unknown placeholder {workers}",
                                                                            "worker_endpoints", "worker_hosts"]),
    ({"prepare": {"disable_alsr": True}}, "prepare.disable_alsr", ["unknown item", "did you mean 'disable_aslr'"]),
    ({"prepare": {"disable_aslr": "yes"}}, "prepare.disable_aslr", ["true or false"]),
    ({"prepare": {"stack_limit": "big"}}, "prepare.stack_limit", ["'unlimited', a size in KiB"]),
    ({"prepare": {"public_hostname": "dns"}}, "prepare.public_hostname", ["recorded or imds"]),
    ({"prepare": {"local_vars": ""}}, "prepare.local_vars", ["file path"]),
    ({"prepare": {"sysctl": ["vm.overcommit_memory=1"]}}, "prepare.sysctl", ["mapping of name: value"]),
    ({"prepare": {"sysctl": {"vm; reboot": 1}}}, "prepare.sysctl.vm; reboot", ["sysctl name"]),
    ({"prepare": {"sysctl": {"vm.x": "1; reboot"}}}, "prepare.sysctl.vm.x", ["a number or a word"]),
    ({"prepare": [1]}, "prepare", ["expected a mapping"]),
    ({"timeout": 0}, "timeout", ["positive number"]),
    ({"ready_timeout": "soon"}, "ready_timeout", ["positive number"]),
    ({"env": {"1BAD": "x"}}, "env", ["VARIABLE"]),
    ({"vars_file": "../experiment_vars"}, "vars_file", ["inside the benchmark directory"]),
    ({"build": ["make"]}, "build", ["expected a string"]),
])
def test_bad_entries_are_one_line_naming_benchmark_and_key(tmp_path, entry, key, words):
    message = registry_error(tmp_path, {"mybench": entry})
    assert str(tmp_path / "experiments.yaml") in message
    assert "benchmark 'mybench'" in message
    assert f"key '{key}'" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("entry, key", [
    ({"dir": "~/x/{nope}"}, "dir"),
    ({"binary": "./{benchmark"}, "binary"),
    ({"worker_binary": "./{bench}-worker"}, "worker_binary"),
])
def test_bad_placeholders_in_paths_are_one_line(tmp_path, entry, key):
    message = registry_error(tmp_path, {"mybench": entry})
    assert "benchmark 'mybench'" in message and f"key '{key}'" in message


@pytest.mark.parametrize("template", ["{binary} -i {host!r}", "{binary} -i {host:>40}", "{binary} -i {host!s:x}"])
def test_conversions_and_format_specs_are_refused(tmp_path, template):
    # {host!r} would wrap the quoted value in Python quotes and break the shell quoting.
    message = registry_error(tmp_path, {"mybench": {"commands": {"worker": template}}})
    assert "benchmark 'mybench'" in message and "key 'commands.worker'" in message


def test_registry_args_with_shell_operators_are_refused_when_loading(tmp_path):
    message = registry_error(tmp_path, {"mybench": {"args": "-n 1; rm -rf ~"}})
    assert "benchmark 'mybench'" in message and "key 'args'" in message


def test_defaults_are_validated_for_every_benchmark(tmp_path):
    defaults = {**DEFAULTS, "ports": {**DEFAULTS["ports"], "master": 70000}}
    message = registry_error(tmp_path, {"a": {}}, defaults=defaults)
    assert "benchmark 'a'" in message and "key 'ports.master'" in message
    # ... and a benchmark may repair a bad default
    path = write_registry(tmp_path, {"a": {"ports": {"master": 45001}}}, defaults=defaults)
    assert load_registry(path).get("a").master_port == 45001


@pytest.mark.parametrize("name", ["x; rm -rf ~", "../x", "a/b", "a b", "$(id)"])
def test_bad_benchmark_names_in_the_file(tmp_path, name):
    message = registry_error(tmp_path, {name: {}})
    assert f"benchmarks.{name}" in message and "letters, digits" in message


def test_bad_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text("defaults:\n  dir: x\nbenchmarks:\n  a: {dir: [1, 2}\n")
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)) and "invalid YAML at line 4, column" in message


@pytest.mark.parametrize("text, key, line", [
    ("defaults:\n  dir: x\n  dir: y\nbenchmarks: {}\n", "defaults.dir", 3),
    ("defaults: {}\nbenchmarks:\n  a: {}\n  b: {}\n  a: {}\n", "benchmarks.a", 5),
    ("defaults: {}\nbenchmarks:\n  a:\n    ports: {manager: 1, manager: 2}\n", "benchmarks.a.ports.manager", 4),
    ("defaults: {}\ndefaults: {}\n", "defaults", 2),
])
def test_a_key_given_twice_is_one_line_naming_file_and_key(tmp_path, text, key, line):
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert str(info.value) == f"{path}: key '{key}': given twice (again at line {line}); keep one"


def test_repository_defaults_prepare_processes_as_the_old_scripts_did():
    prep = load_registry(REPO / "experiments.yaml").get("dsum").prepare
    assert prep.declared() == {"disable_aslr": True, "stack_limit": "unlimited", "local_vars": "~/.local_vars",
                               "public_hostname": "recorded", "sysctl": {"vm.overcommit_memory": "1"}}


def test_a_benchmark_switches_preparation_items_off(tmp_path):
    prep = bench(tmp_path, "b", prepare={"disable_aslr": False, "stack_limit": None, "sysctl": {}}).prepare
    assert prep.declared() == {"disable_aslr": False, "stack_limit": None, "local_vars": "~/.local_vars",
                               "public_hostname": "recorded", "sysctl": {}}
    extra = bench(tmp_path, "b", prepare={"sysctl": {"kernel.randomize_va_space": 0, "vm.overcommit_memory": 1}})
    assert extra.prepare.sysctl == {"kernel.randomize_va_space": "0", "vm.overcommit_memory": "1"}


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_registry(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file (the benchmark registry)"


@pytest.mark.parametrize("text, words", [
    ("- a\n- b\n", "mapping"),
    ("defaults: {}\nbenchmark: {}\n", "key 'benchmark'"),
    ("defaults: [1]\nbenchmarks: {}\n", "must be mappings"),
    ("defaults: {}\nbenchmarks:\n  a: [1]\n", "key 'benchmarks.a'"),
])
def test_bad_top_level(tmp_path, text, words):
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_registry(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_missing_required_key_without_defaults(tmp_path):
    message = registry_error(tmp_path, {"solo": {"binary": "./solo"}}, defaults={})
    assert "benchmark 'solo'" in message and "key 'dir'" in message and "missing" in message


def test_unknown_benchmark_suggests_a_name(tmp_path):
    registry = load_registry(write_registry(tmp_path, {"dsum": {}, "other": {}}))
    with pytest.raises(ExperimentError, match="no benchmark 'dsun'; did you mean 'dsum'"):
        registry.get("dsun")


# ------------------------------------------------------------ names and --args


@pytest.mark.parametrize("name", ["x; rm -rf ~", "../x", "", ".", "..", "a/b", "a b", "$(id)", "`id`", "x\n", "ü"])
def test_validate_name_refuses(name):
    with pytest.raises(ExperimentError) as info:
        validate_name(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["dsum", "my-bench_2.0", "A1"])
def test_validate_name_accepts(name):
    assert validate_name(name) == name


def test_registry_get_validates_the_name(tmp_path):
    registry = load_registry(write_registry(tmp_path, {"dsum": {}}))
    with pytest.raises(ExperimentError, match="letters, digits"):
        registry.get("x; rm -rf ~")


@pytest.mark.parametrize("text", [
    "; touch /tmp/pwned", "-n 1; touch x", "-n 1 && touch x", "a || b", "a | tee x", "-n 1 > out", "< in",
    "a >> out", "a &", "`touch x`", "-n `id`", "$(touch x)", "-n $(id)", "'$(id)'", "a;b", "(a)",
])
def test_parse_args_refuses_shell_syntax(text):
    with pytest.raises(ExperimentError) as info:
        parse_args(text)
    assert "not allowed" in str(info.value) and "\n" not in str(info.value)


def test_parse_args_unbalanced_quote_is_an_error():
    with pytest.raises(ExperimentError, match="--args"):
        parse_args("-n 'five")


@pytest.mark.parametrize("text, words", [
    (None, []), ("", []), ("-n 5", ["-n", "5"]), ("--label 'a b' -x=1,2", ["--label", "a b", "-x=1,2"]),
    ('--path "/tmp/x y" --rate 0.5', ["--path", "/tmp/x y", "--rate", "0.5"]), ("$HOME", ["$HOME"]),
])
def test_parse_args_accepts_plain_words(text, words):
    assert parse_args(text) == words


# ------------------------------------------------------------ quoting: what the shell really sees

NASTY = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "x; touch PWNED", "$HOME", "*",
         "-n 5 && touch PWNED", "tab\there", "new\nline", "back\\slash", ""]

ARGV_STUB = f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n"


def make_stub(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ARGV_STUB)
    path.chmod(0o755)
    return path


def shell_argv(command: str, cwd: Path) -> list[str]:
    """Run ``command`` through bash as a remote shell would and return the stub's argv."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (command, result.stderr)
    return json.loads(result.stdout)


@pytest.mark.parametrize("value", NASTY)
def test_every_substituted_value_reaches_the_program_as_one_literal_word(tmp_path, value):
    make_stub(tmp_path / "show")
    b = bench(tmp_path, "show", commands={
        "manager": "{binary} {host} {manager} {worker_hosts} {worker_endpoints}",
        "worker": "{binary} {host} {port} {manager}",
        "master": "{binary} {host} {args}"})
    shape = RunShape(run_id=SHAPE.run_id, k=1, nprocs=1, manager=value, worker_hosts=[value],
                     worker_endpoints=[(value, 50000)], args=[value, "--flag", value])
    assert shell_argv(render(b, "manager", shape, host=value), tmp_path) == [value, value, value, f"{value}:50000"]
    assert shell_argv(render(b, "worker", shape, host=value, port=50000, index=0), tmp_path) == [
        value, "50000", value]
    assert shell_argv(render(b, "master", shape, host=value), tmp_path) == [value, value, "--flag", value]
    assert not (tmp_path / "PWNED").exists()


def test_registry_args_and_a_binary_path_with_spaces_are_quoted(tmp_path):
    make_stub(tmp_path / "odd dir" / "show")
    b = bench(tmp_path, "show", binary="./odd dir/{benchmark}", args="--label 'a b' \"it's\"",
              commands={"master": "{binary} {args}"})
    assert shell_argv(render(b, "master", SHAPE, host="h"), tmp_path) == ["--label", "a b", "it's"]


def test_start_script_quotes_env_dir_and_detaches(tmp_path):
    """The whole start script through bash: env values and the directory arrive literally, PIDs are recorded."""
    home = tmp_path / "home"
    bdir = home / "my bench $(x)"
    make_stub(bdir / "show")
    (bdir / "experiment_vars").write_text("export FROM_VARS=sourced\n")
    value = "a b'c\"$(touch PWNED)`touch PWNED`"
    b = bench(tmp_path, "show", dir="~/my bench $(x)", env={"NASTY": value},
              commands={"worker": "{binary} {port} \"$NASTY\" \"$FROM_VARS\" \"$CLOISTER_RUN_ID\""})
    shape = RunShape(run_id=SHAPE.run_id, k=1, nprocs=2, manager="m", worker_hosts=["h"],
                     worker_endpoints=[("h", 7000), ("h", 7001)])
    procs = [Proc(role="worker", host="h", index=i, port=7000 + i,
                  command=render(b, "worker", shape, host="h", port=7000 + i, index=i)) for i in range(2)]
    env = {**os.environ, "HOME": str(home)}
    result = subprocess.run(["bash", "-c", start_script(b, shape.run_id, procs, node=THIS_MACHINE)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    run_dir = home / "cloister" / "runs" / "show" / shape.run_id
    pids = [line.split() for line in result.stdout.splitlines() if not line.startswith("prep\t")]
    assert [p[1:] for p in pids] == [["worker", "0", "7000"], ["worker", "1", "7001"]]
    deadline = time.monotonic() + 10
    # An exit file is created before its code is written: wait for the codes.
    while (not all((run_dir / f"worker{i}.exit").exists() and (run_dir / f"worker{i}.exit").read_text().strip()
                   for i in range(2)) and time.monotonic() < deadline):
        time.sleep(0.02)
    for i in range(2):
        assert (run_dir / f"worker{i}.exit").read_text().strip() == "0"
        argv = json.loads((run_dir / log_name("worker", i, shape.run_id)).read_text())
        assert argv == [str(7000 + i), value, "sourced", shape.run_id]
    assert not list(tmp_path.rglob("PWNED"))


def test_start_script_reports_a_missing_directory(tmp_path):
    b = bench(tmp_path, "show", dir="~/absent")
    proc = Proc(role="worker", host="h", index=0, port=1, command="true")
    result = subprocess.run(["bash", "-c", start_script(b, SHAPE.run_id, [proc], node=THIS_MACHINE)],
                            env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 66 and "benchmark directory ~/absent not found" in result.stderr


@pytest.mark.parametrize("folder", ["~/absent $(touch PWNED) `touch PWNED`; touch PWNED", "-absent $(touch PWNED)"])
def test_a_missing_hostile_directory_is_named_and_never_run(tmp_path, folder):
    b = bench(tmp_path, "show", dir=folder)
    proc = Proc(role="worker", host="h", index=0, port=1, command="true")
    result = subprocess.run(["bash", "-c", start_script(b, SHAPE.run_id, [proc], node=THIS_MACHINE)], cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 66 and f"benchmark directory {folder} not found" in result.stderr
    assert not list(tmp_path.rglob("PWNED"))


def test_a_directory_that_starts_with_a_dash_is_not_an_option(tmp_path):
    (tmp_path / "-P").mkdir()
    result = subprocess.run(["bash", "-c", f"cd {remote_dir('-P')} && pwd"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30)
    assert result.stdout.strip() == str(tmp_path / "-P")


def test_aliases_within_bounds_load_and_a_self_reference_is_refused(tmp_path):
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump({"defaults": DEFAULTS}) + "benchmarks:\n  a: &a {timeout: 5}\n  b: *a\n")
    assert sorted(load_registry(shared).benchmarks) == ["a", "b"]
    loop = tmp_path / "loop.yaml"
    loop.write_text("defaults: {}\nbenchmarks:\n  a: &a {env: {X: [*a]}}\n")
    with pytest.raises(ConfigError) as info:
        load_registry(loop)
    assert str(info.value) == f"{loop}: YAML aliases: an alias refers to a node that contains it"
