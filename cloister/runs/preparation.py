"""A benchmark's process preparation as experiments.yaml declares it (``prepare``).

The old Clamor start scripts did, on each node before a role started: ASLR off, overcommit on,
``ulimit -s unlimited``, ``source ~/.local_vars``, ``export PUBLIC_HOSTNAME``. Here each item is
declared, may be switched off per benchmark, and ``cloister.runs.prepare`` turns it into shell.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

PREPARE_KEYS = ("disable_aslr", "stack_limit", "local_vars", "public_hostname", "sysctl")
PUBLIC_HOSTNAME_SOURCES = ("recorded", "imds")
SYSCTL_KEY_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")
# No tab or newline: a sysctl's value travels in the tab-separated lines a node reports back.
SYSCTL_VALUE_RE = re.compile(r"[A-Za-z0-9_.:/ -]+")

# Makes the one-line error for a key of the benchmark being read: fail(key, expected).
Fail = Callable[[str, str], ConfigError]


@dataclass(frozen=True)
class Preparation:
    """What a node does before a role's processes start; False, None or {} switches an item off."""

    disable_aslr: bool  # setarch -R on each process (no root needed)
    stack_limit: str | None  # ulimit -s
    local_vars: str | None  # a file sourced when present
    public_hostname: str | None  # where PUBLIC_HOSTNAME comes from: "recorded" or "imds"
    sysctl: dict[str, str]  # applied with sudo where the node has a kernel of its own

    def declared(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in PREPARE_KEYS}


def _sysctl(value: Any, fail: Fail) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise fail("prepare.sysctl", "expected a mapping of name: value, e.g. vm.overcommit_memory: 1")
    out = {}
    for key, setting in value.items():
        if not isinstance(key, str) or not SYSCTL_KEY_RE.fullmatch(key):
            raise fail(f"prepare.sysctl.{key}", "expected a sysctl name such as vm.overcommit_memory")
        text = str(setting).lower() if isinstance(setting, bool) else str(setting)
        if isinstance(setting, (dict, list)) or setting is None or not SYSCTL_VALUE_RE.fullmatch(text):
            raise fail(f"prepare.sysctl.{key}", f"expected a number or a word, got {setting!r}")
        out[key] = text
    return out


def _stack_limit(value: Any, fail: Fail) -> str | None:
    if value is None:
        return None
    if value == "unlimited" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return str(value)
    raise fail("prepare.stack_limit", f"expected 'unlimited', a size in KiB, or null, got {value!r}")


def parse_preparation(value: Any, *, fail: Fail) -> Preparation:
    """experiments.yaml's ``prepare`` mapping; an item left out is not done."""
    prepare = value or {}
    if not isinstance(prepare, Mapping):
        raise fail("prepare", f"expected a mapping of {', '.join(PREPARE_KEYS)}")
    for key in prepare:
        if key not in PREPARE_KEYS:
            close = difflib.get_close_matches(str(key), PREPARE_KEYS, n=1)
            raise fail(f"prepare.{key}", "unknown item" + (f"; did you mean '{close[0]}'?" if close else
                                                           f"; expected one of {', '.join(PREPARE_KEYS)}"))
    if not isinstance(prepare.get("disable_aslr", False), bool):
        raise fail("prepare.disable_aslr", "expected true or false")
    local_vars = prepare.get("local_vars")
    if local_vars is not None and (not isinstance(local_vars, str) or not local_vars):
        raise fail("prepare.local_vars", "expected a file path such as ~/.local_vars, or null")
    public = prepare.get("public_hostname")
    if public is not None and public not in PUBLIC_HOSTNAME_SOURCES:
        raise fail("prepare.public_hostname", f"expected {' or '.join(PUBLIC_HOSTNAME_SOURCES)} or null, got {public!r}")
    return Preparation(disable_aslr=prepare.get("disable_aslr", False),
                       stack_limit=_stack_limit(prepare.get("stack_limit"), fail), local_vars=local_vars,
                       public_hostname=public, sysctl=_sysctl(prepare.get("sysctl"), fail))
