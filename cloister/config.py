"""Load and validate a cluster config (JSON).

Precedence, lowest first: DEFAULTS < invoke.yaml < INVOKE_CLOISTER_* env < the
config file < task flags. Invoke merges the first three into ``c.cloister``;
tasks pass that mapping as ``defaults`` and their flags as ``overrides``.

Config files of the old Clamor scripts (both their "driver" and their later
"master" naming) load unchanged: their keys are read under cloister's names or
accepted with a notice (LEGACY_KEYS).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Collection, Mapping
from typing import Any

from .errors import ConfigError
from .files import NotASmallFile, read_small
from .netspec import NetworkSpec, parse_network

# The built-in providers; the registry (cloister.providers) may know more.
PROVIDERS = ("ec2", "local", "static")
CLUSTER_NAME_RE = re.compile(r"[a-z0-9-]{1,40}")
TTL_RE = re.compile(r"(\d+)\s*([smhd]?)")
DEFAULT_REDEPLOY_PATHS = ["clamor/", "weld/", "cloister/", ".bashrc"]

# Old key -> new key (None: accepted and ignored, with a notice).
LEGACY_KEYS: dict[str, str | None] = {
    "identity_file": "key_name",
    "key_pair": "ssh_key",
    "driver_instance_type": "master_instance_type",
    "num_workers": "nworkers",
    "swap_size_master": "swap_size",
    "swap_size_driver": "swap_size",
    "master_file": None,
    "driver_file": None,
    "servers_file": None,
    "manager_file": None,
    "servers_private_file": None,
    "servers_public_file": None,
    "datagen_instance_ip": None,
    "datagen_instance_type": None,
    "swap_size_worker": None,
}
# The old scripts' `ami: latest` without an ami_tag looked for the user's own images tagged clamor.
LEGACY_AMI_TAG = "clamor"


def _str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _opt_str(value: Any) -> bool:
    return value is None or _str(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# key -> (check, what is expected)
_CHECKS: dict[str, tuple[Any, str]] = {
    "cluster_name": (lambda v: isinstance(v, str) and bool(CLUSTER_NAME_RE.fullmatch(v)),
                     "a name of 1-40 characters from a-z, 0-9 and '-'"),
    "provider": (lambda v: isinstance(v, str) and v != "", "a provider name"),
    "region": (_opt_str, "a region name such as 'us-west-2'"),
    "ami": (lambda v: v is None or (isinstance(v, str) and (v == "latest" or v.startswith("ami-"))),
            "an AMI id ('ami-...') or 'latest'"),
    "ami_tag": (_opt_str, "an AMI name prefix such as 'alice-clamor'"),
    "instance_type": (_str, "an instance type such as 'm5.large'"),
    "master_instance_type": (_opt_str, "an instance type such as 'm5.large'"),
    "nworkers": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "key_name": (_opt_str, "an EC2 key pair name"),
    "ssh_key": (_opt_str, "a path to a private key file"),
    "user": (lambda v: isinstance(v, str) and bool(re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v)),
             "a login user name such as 'ubuntu'"),
    "root_size": (lambda v: v is None or (_int(v) and 8 <= v <= 16384), "a volume size in GiB (8-16384)"),
    "swap_size": (lambda v: v is None or (_int(v) and 0 <= v <= 16384),
                  "GiB of swap for the master (0-16384; 0 or null: none)"),
    "ami_instance_ip": (_opt_str, "the dev instance's DNS name or IP address"),
    "placement_group": (_opt_str, "a placement group name or null"),
    "spot": (lambda v: isinstance(v, bool) or (isinstance(v, (int, float)) and v > 0),
             "false, true, or a maximum price in $/hour"),
    "ttl": (lambda v: (_int(v) and v >= 0) or (isinstance(v, str) and bool(TTL_RE.fullmatch(v.strip()))),
            "a duration such as '6h', '90m' or 0 to disable"),
    "ssh_cidr": (lambda v: isinstance(v, str) and (v == "auto" or v.startswith("sg-") or _is_cidr(v)),
                 "'auto', a CIDR such as '203.0.113.7/32', or a security group id"),
    "redeploy_paths": (lambda v: isinstance(v, list) and all(_str(p) for p in v), "a list of paths"),
    "image": (_opt_str, "a directory to copy into each host's home"),
    "dev_host": (lambda v: isinstance(v, bool), "true or false"),
    "mpi_slots": (lambda v: _int(v) and 1 <= v <= 4096, "mpirun's slots per worker where the provider does not "
                  "know its processors (1-4096)"),
    "budget": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
               "a budget in dollars for the cluster's life, or null"),
    "owner": (_opt_str, "who owns the cluster's instances (default: the caller's AWS identity)"),
    "subnet_id": (lambda v: v is None or (isinstance(v, str) and v.startswith("subnet-")), "a subnet id ('subnet-...')"),
    "availability_zone": (_opt_str, "an availability zone such as 'us-west-2a'"),
    "cpu_credits": (lambda v: v in ("standard", "unlimited"), "'standard' or 'unlimited' (t2/t3/t3a/t4g CPU credits)"),
    "hosts": (lambda v: v is None or (isinstance(v, list) and len(v) >= 1 and all(_str(h) for h in v)),
              "a list of host names, the master first"),
    "network": (lambda v: v is None or isinstance(v, dict),
                'local hosts\' network, a mapping such as {"rate": "1gbit", "latency": "2ms", "loss": "0%"}'),
}



def _is_cidr(value: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return "/" in value


def parse_ttl(value: int | str) -> int:
    """Return a TTL in seconds; a bare number means hours, 0 disables."""
    if isinstance(value, int):
        return value * 3600
    number, unit = TTL_RE.fullmatch(value.strip()).groups()
    return int(number) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}[unit]


@dataclass(frozen=True)
class ClusterConfig:
    """A validated cluster config; ``source`` is the file it came from."""

    cluster_name: str
    source: str
    provider: str = "ec2"
    region: str | None = None
    ami: str | None = None
    ami_tag: str | None = None
    instance_type: str = "m5.large"
    master_instance_type: str | None = None
    nworkers: int = 1
    key_name: str | None = None
    ssh_key: str | None = None
    user: str = "ubuntu"
    root_size: int | None = 50
    swap_size: int | None = None
    ami_instance_ip: str | None = None
    placement_group: str | None = None
    spot: bool | float = False
    ttl: int | str = "8h"
    ssh_cidr: str = "auto"
    redeploy_paths: list[str] = field(default_factory=lambda: list(DEFAULT_REDEPLOY_PATHS))
    image: str | None = None
    dev_host: bool = True
    mpi_slots: int = 1
    budget: float | None = None
    owner: str | None = None
    subnet_id: str | None = None
    availability_zone: str | None = None
    cpu_credits: str = "standard"
    hosts: list[str] | None = None
    network: dict[str, Any] | None = None
    notices: tuple[str, ...] = ()
    legacy: dict[str, Any] = field(default_factory=dict)
    from_flags: tuple[str, ...] = ()

    @property
    def ttl_seconds(self) -> int:
        return parse_ttl(self.ttl)

    @property
    def master_type(self) -> str:
        return self.master_instance_type or self.instance_type

    @property
    def network_spec(self) -> NetworkSpec:
        return parse_network(self.network, file=self.source)

    def replace(self, **changes: Any) -> "ClusterConfig":
        return dataclasses.replace(self, **changes)


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# The cluster-config keys with their built-in defaults, read off ClusterConfig (defined once there);
# tasks/__init__.py hands them to Invoke, and invoke.yaml mirrors them.
DEFAULTS: dict[str, Any] = {"cluster_name": None, **{f.name: _field_default(f) for f in dataclasses.fields(ClusterConfig)
                                                     if f.name in _CHECKS and f.name != "cluster_name"}}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = read_small(path)
    except NotASmallFile as err:
        raise ConfigError(file=str(path), expected=f"{err}; expected a JSON config file")
    except FileNotFoundError:
        raise ConfigError(file=str(path), expected="no such config file (give --config or set cloister.config)")
    except IsADirectoryError:
        raise ConfigError(file=str(path), expected="is a directory, expected a JSON config file")
    except OSError as err:
        raise ConfigError(file=str(path), expected=f"cannot read: {err.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(file=str(path), expected="cannot read: not UTF-8 text")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(file=str(path),
                          expected=f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}")
    if not isinstance(data, dict):
        raise ConfigError(file=str(path), expected="expected a JSON object of keys")
    return data


def _translate(data: Mapping[str, Any], *, file: str, layer: str) -> tuple[dict[str, Any], list[str], dict]:
    """Map legacy keys, reject unknown ones; return (values, notices, ignored legacy values)."""
    values: dict[str, Any] = {}
    notices: list[str] = []
    legacy: dict[str, Any] = {}
    named_by: dict[str, str] = {key: key for key in data if key in DEFAULTS}
    for key, value in data.items():
        if key in DEFAULTS:
            values[key] = value
        elif key in LEGACY_KEYS:
            new = LEGACY_KEYS[key]
            if new is None:
                legacy[key] = value
                notices.append(f"{file}: legacy key '{key}' accepted and not used by cloister")
                continue
            if new in named_by:
                also = "" if named_by[new] == new else f" (as '{named_by[new]}')"
                raise ConfigError(file=file, key=key,
                                  expected=f"legacy name of '{new}', which is also set{also}; keep one")
            named_by[new] = key
            values[new] = value
            notices.append(f"{file}: legacy key '{key}' read as '{new}'")
        else:
            close = difflib.get_close_matches(key, list(DEFAULTS) + list(LEGACY_KEYS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(DEFAULTS)}"
            raise ConfigError(file=file, key=json.dumps(key)[1:-1], expected=f"unknown {layer}key{hint}")
    return values, notices, legacy


def _coerce(key: str, value: Any) -> Any:
    """Env vars arrive as strings when the default is None or a str; read numbers back."""
    if key in ("nworkers", "root_size", "swap_size", "mpi_slots") and isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


def _check_key_file(path: str, *, file: str) -> str:
    """The key file as an absolute path; a relative one is relative to the working directory, as the
    old scripts' key_pair was, and made absolute so a later change of directory cannot lose it."""
    full = Path(os.path.expanduser(path)).absolute()
    try:
        st = full.stat()
    except FileNotFoundError:
        raise ConfigError(file=file, key="ssh_key", expected=f"key file {full} does not exist")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(file=file, key="ssh_key", expected=f"{full} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(file=file, key="ssh_key",
                          expected=f"key file {full} has mode {stat.S_IMODE(st.st_mode):04o}; "
                                   f"expected 0600 or narrower (chmod 600 {full})")
    return str(full)


def _where(file: str, sources: Mapping[str, str], key: str) -> str:
    source = sources.get(key, file)
    return file if source == file else f"{file} (from {source})"


def label_overrides(*, label: str | None, name: str | None) -> dict[str, str | None]:
    """Flags for a launch: ``label`` names the cluster and its images (the old scripts' ``-l``)."""
    if label is not None and name is not None:
        raise ConfigError(file="--label", expected="sets the cluster name and ami_tag; give --label or --name, not both")
    if label is None:
        return {"cluster_name": name}
    return {"cluster_name": label, "ami_tag": label}


def _merge(file: str, file_values: Mapping[str, Any], *, defaults: Mapping[str, Any] | None,
           overrides: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """DEFAULTS < ``defaults`` < the file < ``overrides``; return the values and where each came from."""
    merged: dict[str, Any] = copy.deepcopy(DEFAULTS)
    sources: dict[str, str] = {}
    for key, value in (defaults or {}).items():
        if key in DEFAULTS and value is not None:
            merged[key] = copy.deepcopy(_coerce(key, value))
            sources[key] = "cloister." + key
    for key, value in file_values.items():
        merged[key] = value
        sources[key] = file
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
            sources[key] = "--" + key.replace("_", "-")
    return merged, sources


def _check(merged: Mapping[str, Any], *, file: str, sources: Mapping[str, str], providers: Collection[str]) -> None:
    for key, (check, expected) in _CHECKS.items():
        value = merged[key]
        if key == "cluster_name" and value is None:
            raise ConfigError(file=file, key=key, expected="missing; every cluster needs a name")
        if key == "provider" and value not in providers:
            raise ConfigError(file=_where(file, sources, key), key=key,
                              expected=f"expected one of {', '.join(providers)}, got {json.dumps(value)}")
        if not check(value):
            raise ConfigError(file=_where(file, sources, key), key=key, expected=f"expected {expected}, got {json.dumps(value)}")
    provider = merged["provider"]
    if merged["network"] is not None:
        parse_network(merged["network"], file=_where(file, sources, "network"))
        if provider != "local":
            raise ConfigError(file=_where(file, sources, "network"), key="network",
                              expected=f"hosts' networks are made and shaped by the local provider only, not {provider}")
    if provider == "static" and not merged["hosts"]:
        raise ConfigError(file=file, key="hosts", expected="missing; the static provider needs a list of hosts")
    if provider == "local" and merged["user"] == "root":
        # Its hosts' sshd refuses root (PermitRootLogin no): the launch would wait for SSH until it gave up.
        raise ConfigError(file=_where(file, sources, "user"), key="user",
                          expected="root cannot log in to local hosts; use an ordinary user such as ubuntu "
                                   "(created if missing)")
    if provider == "ec2":
        for key in ("region", "ami", "key_name", "ssh_key"):
            if not merged[key]:
                raise ConfigError(file=file, key=key, expected="missing; required by the ec2 provider")


def _local_image(value: str, *, file: str) -> str:
    """A relative image is looked for beside the config file first, then in the working directory."""
    image = Path(value)
    if not image.is_absolute():
        image = (Path(file).resolve().parent / image).resolve()
        if not image.is_dir():
            image = Path(value).resolve()
    return str(image)


def load_config(path: str | os.PathLike, *, defaults: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | None = None, providers: Collection[str] = PROVIDERS) -> ClusterConfig:
    """Read ``path`` and merge it over ``defaults`` and under ``overrides`` (None values skipped).

    ``providers`` are the provider names the registry knows (``cloister.providers.names()``).
    """
    file = str(path)
    file_values, notices, legacy = _translate(_read_json(Path(path)), file=file, layer="")
    merged, sources = _merge(file, file_values, defaults=defaults, overrides=overrides)
    _check(merged, file=file, sources=sources, providers=providers)
    if merged["ami"] == "latest" and not merged["ami_tag"]:
        merged["ami_tag"] = LEGACY_AMI_TAG
        notices.append(f"{file}: no ami_tag; 'ami: latest' takes your newest image named {LEGACY_AMI_TAG}-* "
                       f"as the old scripts did (set ami_tag to choose another prefix)")
    if merged["ssh_key"] and merged["provider"] != "local":
        merged["ssh_key"] = _check_key_file(merged["ssh_key"], file=_where(file, sources, "ssh_key"))
    if merged["image"] and merged["provider"] == "local":
        given, merged["image"] = merged["image"], _local_image(merged["image"], file=file)
        if not Path(merged["image"]).is_dir():
            raise ConfigError(file=_where(file, sources, "image"), key="image", expected=f"directory {given} does not exist")
    flags = tuple(k for k, v in sources.items() if v.startswith("--"))
    return ClusterConfig(source=file, notices=tuple(notices), legacy=legacy, from_flags=flags, **merged)
