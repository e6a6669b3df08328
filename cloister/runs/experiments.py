"""experiments.yaml: the benchmark registry and role command rendering."""

from __future__ import annotations

import copy
import difflib
import math
import re
import shlex
import string
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError, ExperimentError
from ..files import NotASmallFile
from .preparation import Fail, Preparation, parse_preparation
from .yamlfile import read_yaml

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
ROLES = ("manager", "worker", "master")
PLACEHOLDERS = frozenset({"binary", "worker_binary", "benchmark", "host", "port", "index", "manager",
                          "manager_port", "master_port", "worker_hosts", "worker_endpoints", "nprocs", "k",
                          "partitions", "run_id", "args", "hostfile"})
KEYS = ("dir", "binary", "worker_binary", "vars_file", "env", "args", "ports", "commands", "ready",
        "ready_timeout", "timeout", "build", "metric", "prepare", "resources", "workers_per_host", "logs",
        "stop_grace")
# Roles a benchmark may leave out (null): an MPI program is a master only, mpirun starts its ranks.
OPTIONAL_ROLES = ("manager", "worker")
# workers_per_host: "nprocs" starts P worker processes on each host (ports worker_base + j); "one" starts
# one that is given P ({nprocs}), on worker_base, for systems with a daemon per host (Ray's raylet).
WORKERS_PER_HOST = ("nprocs", "one")
STOP_GRACE = 5.0  # seconds between TERM and KILL when a run's processes are ended
MAX_STOP_GRACE = 60.0  # the run's end waits this long at most, within the log download's time
# The per-run OpenMPI hostfile on the master ({hostfile}): the run's K worker hosts, P slots each.
HOSTFILE = "hostfile"
# A log path on a host: absolute or under ~/, no shell syntax needed to name it.
_LOG_PATH_RE = re.compile(r"(/|~/)[^\0\n]*[^\0\n/][^\0\n]*")
SAMPLE_INTERVAL = 1.0  # seconds between resource samples on each host of a run
MIN_SAMPLE_INTERVAL = 0.1  # a sampler waking more often would cost more than it tells
PORT_KEYS = ("manager", "master", "worker_base")
# Shell control operators and redirections: refused in --args rather than quoted,
# because they are almost certainly a mistake or an injection attempt.
_OPERATOR_RE = re.compile(r"^[;&|<>()]+$")


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's fully merged, validated definition."""

    name: str
    dir: str
    binary: str
    worker_binary: str
    vars_file: str | None
    env: dict[str, str]
    args: str
    manager_port: int
    master_port: int
    worker_base: int
    commands: dict[str, str]
    ready_log: str | None
    ready_timeout: float
    timeout: float
    build: str
    metric: str | None
    prepare: Preparation
    resources: float  # seconds between resource samples on each host; 0: not sampled
    source: str = ""
    workers_per_host: str = WORKERS_PER_HOST[0]
    logs: tuple[str, ...] = ()  # more paths on the hosts collected with the run
    stop_grace: float = STOP_GRACE

    def has(self, role: str) -> bool:
        """Whether the benchmark has ``role`` (manager and worker may be null)."""
        return self.commands.get(role) is not None

    def worker_port(self, local_index: int) -> int:
        return self.worker_base + local_index

    @property
    def metric_name(self) -> str:
        """The metric regex's first named group names it: time_s=(?P<time_s>[0-9.]+)."""
        names = list(re.compile(self.metric).groupindex) if self.metric else []
        return names[0] if names else "metric"


@dataclass(frozen=True)
class Registry:
    source: str
    benchmarks: dict[str, Benchmark] = field(default_factory=dict)

    def get(self, name: str) -> Benchmark:
        validate_name(name)
        if name not in self.benchmarks:
            close = difflib.get_close_matches(name, list(self.benchmarks), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(self.benchmarks) or 'none'}"
            raise ExperimentError(f"{self.source}: no benchmark '{name}'{hint}", benchmark=name)
        return self.benchmarks[name]


def validate_name(name: str) -> str:
    """Refuse benchmark names that could reach a shell as anything but a word."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ExperimentError(f"benchmark name {name!r}: expected letters, digits, '_', '.' or '-' only",
                              benchmark=str(name))
    if name in (".", ".."):
        raise ExperimentError(f"benchmark name {name!r}: not a directory name", benchmark=name)
    return name


def parse_args(text: str | None) -> list[str]:
    """Split ``--args`` into words; refuse shell operators (each word is quoted later anyway)."""
    if not text:
        return []
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError as err:
        raise ExperimentError(f"--args {text!r}: {err}")
    for word in words:
        if _OPERATOR_RE.match(word) or "`" in word or "$(" in word:
            raise ExperimentError(f"--args {text!r}: shell syntax {word!r} is not allowed; pass plain arguments")
    return words


def _fields(template: str) -> set[str]:
    """Placeholder names of a template; a conversion ({host!r}) or format spec ({host:>9}) is refused
    because it would rewrite the already-quoted value and undo the quoting."""
    names = set()
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if spec or conversion:
            raise ValueError(f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}: "
                             f"conversions and format specs are not allowed")
        names.add(name)
    return names


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _error(file: str, name: str, key: str, expected: str) -> ConfigError:
    return ConfigError(file=f"{file}: benchmark '{name}'", key=key, expected=expected)


def _check_keys(raw: Mapping[str, Any], fail: Fail) -> None:
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            raise fail(key, "unknown key" + (f"; did you mean '{close[0]}'?" if close else ""))
    for key in ("dir", "binary", "commands", "ports"):
        if key not in raw:
            raise fail(key, "missing")
    for key in ("build", "args"):
        if not isinstance(raw.get(key, ""), str):
            raise fail(key, "expected a string")
    vars_file = raw.get("vars_file")
    if vars_file is not None and (not isinstance(vars_file, str) or "/" in vars_file or not vars_file):
        raise fail("vars_file", "expected a file name inside the benchmark directory, or null")
    env = raw.get("env") or {}
    if not isinstance(env, Mapping) or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)) for k in env):
        raise fail("env", "expected a mapping of VARIABLE: value")
    try:
        parse_args(raw.get("args") or "")
    except ExperimentError as err:
        raise fail("args", str(err).removeprefix("--args "))


def _ports(raw: Mapping[str, Any], fail: Fail) -> dict[str, int]:
    ports = raw["ports"]
    if not isinstance(ports, Mapping):
        raise fail("ports", "expected a mapping of manager, master, worker_base")
    for key in ports:
        if key not in PORT_KEYS:
            raise fail(f"ports.{key}", f"unknown port; expected one of {', '.join(PORT_KEYS)}")
    for key in PORT_KEYS:
        value = ports.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise fail(f"ports.{key}", f"expected a TCP port 1-65535, got {value!r}")
    # The manager and the master both run on the master node.
    if ports["manager"] == ports["master"]:
        raise fail("ports.master", f"{ports['master']} is also ports.manager; two roles cannot share a port")
    return {key: ports[key] for key in PORT_KEYS}


def _commands(raw: Mapping[str, Any], fail: Fail) -> dict[str, str]:
    commands = raw["commands"]
    if not isinstance(commands, Mapping):
        raise fail("commands", "expected a mapping of manager, worker, master")
    for key in commands:
        if key not in ROLES:
            raise fail(f"commands.{key}", f"unknown role; expected one of {', '.join(ROLES)}")
    for role in ROLES:
        template = commands.get(role)
        if template is None and role in OPTIONAL_ROLES:
            continue
        if not isinstance(template, str) or not template.strip():
            raise fail(f"commands.{role}", "expected a command template"
                       + (" or null (no such role)" if role in OPTIONAL_ROLES else ""))
        try:
            unknown = _fields(template) - PLACEHOLDERS
        except ValueError as err:
            raise fail(f"commands.{role}", f"bad template: {err}")
        if unknown:
            raise fail(f"commands.{role}", f"unknown placeholder {{{sorted(unknown)[0]}}}; "
                                           f"known: {', '.join(sorted(PLACEHOLDERS))}")
    return {role: commands[role] for role in ROLES if commands.get(role) is not None}


def _regex(value: Any, key: str, fail: Fail) -> re.Pattern:
    if not isinstance(value, str):
        raise fail(key, "expected a regex")
    try:
        return re.compile(value)
    except re.error as err:
        raise fail(key, f"bad regex: {err}")


def _ready_log(raw: Mapping[str, Any], fail: Fail) -> str | None:
    ready = raw.get("ready", "port")
    if ready == "port":
        return None
    if isinstance(ready, Mapping) and set(ready) == {"log"}:
        if ready["log"] == "":
            # An empty pattern matches any log at once: readiness would mean nothing.
            raise fail("ready.log", "expected a non-empty regex (a line each worker prints once ready)")
        return _regex(ready["log"], "ready.log", fail).pattern
    raise fail("ready", "expected 'port' or {log: REGEX}")


def _metric(raw: Mapping[str, Any], fail: Fail) -> str | None:
    metric = raw.get("metric")
    if metric is None:
        return None
    groups = _regex(metric, "metric", fail).groups
    if groups != 1:
        raise fail("metric", f"expected a regex with one group (the value), got {groups} groups")
    return metric


def sample_interval(value: Any) -> float:
    """Seconds between resource samples, from experiments.yaml's ``resources`` or ``--resources``:
    at least MIN_SAMPLE_INTERVAL, or 0 (false, off) for none. Raises ValueError."""
    if value in (False, None, 0) or str(value).strip().lower() in ("off", "false", "no", "0"):
        return 0.0
    try:
        seconds = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not MIN_SAMPLE_INTERVAL <= seconds < math.inf:
        raise ValueError(f"expected seconds between resource samples (at least {MIN_SAMPLE_INTERVAL:g}), or off")
    return seconds


def _resources(raw: Mapping[str, Any], fail: Fail) -> float:
    try:
        return sample_interval(raw.get("resources", SAMPLE_INTERVAL))
    except ValueError:
        raise fail("resources", f"expected seconds between resource samples (at least {MIN_SAMPLE_INTERVAL:g}), "
                                f"or false; got {raw['resources']!r}")


def _seconds(raw: Mapping[str, Any], key: str, fail: Fail) -> float:
    value = raw.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise fail(key, f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _shape(raw: Mapping[str, Any], fail: Fail) -> str:
    value = raw.get("workers_per_host", WORKERS_PER_HOST[0])
    if value not in WORKERS_PER_HOST:
        raise fail("workers_per_host", f"expected nprocs (P worker processes per host) or one (one process "
                                       f"per host, given P as {{nprocs}}), got {value!r}")
    return value


def _logs(raw: Mapping[str, Any], fail: Fail) -> tuple[str, ...]:
    value = raw.get("logs") or []
    if not isinstance(value, list):
        raise fail("logs", "expected a list of paths on the hosts, such as [/tmp/ray/session_latest/logs]")
    for path in value:
        if (not isinstance(path, str) or not _LOG_PATH_RE.fullmatch(path)
                or {".", ".."} & set(path.split("/"))):
            raise fail("logs", f"expected absolute paths or ~/paths below / or ~ (no '.' or '..' part, no newline), "
                               f"got {path!r}")
    return tuple(value)


def _grace(raw: Mapping[str, Any], fail: Fail) -> float:
    value = raw.get("stop_grace", STOP_GRACE)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_STOP_GRACE:
        raise fail("stop_grace", f"expected seconds between TERM and KILL (0-{MAX_STOP_GRACE:g}), got {value!r}")
    return float(value)


def _path(name: str, key: str, value: Any, fail: Fail) -> str:
    if not isinstance(value, str) or not value:
        raise fail(key, "expected a non-empty string")
    try:
        return value.format(benchmark=name)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise fail(key, f"bad template {value!r}: the only placeholder here is {{benchmark}}")


def _build(name: str, raw: Mapping[str, Any], *, file: str) -> Benchmark:
    fail = partial(_error, file, name)
    _check_keys(raw, fail)
    ports = _ports(raw, fail)
    return Benchmark(
        name=name, dir=_path(name, "dir", raw["dir"], fail), binary=_path(name, "binary", raw["binary"], fail),
        worker_binary=_path(name, "worker_binary", raw.get("worker_binary") or raw["binary"], fail),
        vars_file=raw.get("vars_file"), env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
        args=raw.get("args") or "", manager_port=ports["manager"], master_port=ports["master"],
        worker_base=ports["worker_base"], commands=_commands(raw, fail), ready_log=_ready_log(raw, fail),
        ready_timeout=_seconds(raw, "ready_timeout", fail), timeout=_seconds(raw, "timeout", fail),
        build=raw.get("build") or "true", metric=_metric(raw, fail), prepare=parse_preparation(raw.get("prepare"), fail=fail), source=file,
        resources=_resources(raw, fail), workers_per_host=_shape(raw, fail), logs=_logs(raw, fail),
        stop_grace=_grace(raw, fail))


def load_registry(path: str | Path) -> Registry:
    """Read and validate experiments.yaml; any problem is a one-line ConfigError."""
    import yaml

    file = str(path)
    try:
        data = read_yaml(file)
    except FileNotFoundError:
        raise ConfigError(file=file, expected="no such file (the benchmark registry)")
    except IsADirectoryError:
        raise ConfigError(file=file, expected="is a directory, expected the benchmark registry (YAML)")
    except NotASmallFile as err:
        raise ConfigError(file=file, expected=f"{err}; expected the benchmark registry (YAML)")
    except UnicodeDecodeError:
        raise ConfigError(file=file, expected="not UTF-8 text; expected the benchmark registry (YAML)")
    except OSError as err:
        raise ConfigError(file=file, expected=f"cannot read: {err.strerror}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(file=file, expected=f"invalid YAML{at}: {problem}")
    if not isinstance(data, Mapping):
        raise ConfigError(file=file, expected="expected a mapping with 'defaults' and 'benchmarks'")
    for key in data:
        if key not in ("defaults", "benchmarks"):
            raise ConfigError(file=file, key=str(key), expected="unknown top-level key; expected defaults, benchmarks")
    defaults = data.get("defaults") or {}
    benchmarks = data.get("benchmarks") or {}
    if not isinstance(defaults, Mapping) or not isinstance(benchmarks, Mapping):
        raise ConfigError(file=file, expected="'defaults' and 'benchmarks' must be mappings")
    registry = Registry(source=file)
    for name, entry in benchmarks.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(file=file, key=f"benchmarks.{name}",
                              expected="benchmark names use letters, digits, '_', '.' and '-' only")
        if entry is not None and not isinstance(entry, Mapping):
            raise ConfigError(file=file, key=f"benchmarks.{name}", expected="expected a mapping")
        registry.benchmarks[name] = _build(name, _merge(dict(defaults), entry or {}), file=file)
    return registry


@dataclass(frozen=True)
class RunShape:
    """Everything a role command needs to be rendered for one run."""

    run_id: str
    k: int
    nprocs: int
    manager: str
    worker_hosts: list[str]  # the K worker hosts, in servers.txt order
    worker_endpoints: list[tuple[str, int]]  # every worker process as (host, port)
    args: list[str] = field(default_factory=list)


def render(bench: Benchmark, role: str, shape: RunShape, *, host: str, port: int | None = None,
           index: int | None = None) -> str:
    """A role's command line with every substituted value shell-quoted."""
    values = {
        "binary": bench.binary if role != "worker" else bench.worker_binary,
        "worker_binary": bench.worker_binary,
        "benchmark": bench.name,
        "host": host,
        "port": "" if port is None else str(port),
        "index": "" if index is None else str(index),
        "manager": shape.manager,
        "manager_port": str(bench.manager_port),
        "master_port": str(bench.master_port),
        "worker_hosts": ",".join(shape.worker_hosts),
        "worker_endpoints": ",".join(f"{h}:{p}" for h, p in shape.worker_endpoints),
        "nprocs": str(shape.nprocs),
        "k": str(shape.k),
        "partitions": str(shape.nprocs * shape.k),
        "run_id": shape.run_id,
    }
    quoted = {key: shlex.quote(value) for key, value in values.items()}
    # Written into the run's folder on the master, which every role's shell knows as $CLOISTER_RUN_DIR.
    quoted["hostfile"] = f'"$CLOISTER_RUN_DIR"/{HOSTFILE}'
    # The binary is a path written by the user in experiments.yaml; "./x" stays readable.
    quoted["binary"] = _quote_path(values["binary"])
    quoted["worker_binary"] = _quote_path(values["worker_binary"])
    extra = parse_args(bench.args) + list(shape.args)
    quoted["args"] = " ".join(shlex.quote(a) for a in extra)
    # Collapse the template's own whitespace, never a substituted value's ('a  b' or a tab stays literal).
    return " ".join(bench.commands[role].split()).format(**quoted).strip()


def _quote_path(path: str) -> str:
    return path if re.fullmatch(r"[A-Za-z0-9_./~-]+", path) and not path.startswith("~") else shlex.quote(path)


def remote_dir(path: str) -> str:
    """A remote directory for a shell: '~/x' becomes "$HOME"/'x' so it expands but stays quoted; a
    relative path that starts with '-' gets './' so that cd does not take it for an option."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(f"./{path}" if path.startswith("-") else path)
