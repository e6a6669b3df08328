"""Shared plumbing for the task modules: config loading and error conversion."""

from __future__ import annotations

import functools
import sys
from typing import Any

from invoke import Exit
from invoke import task as invoke_task

from cloister.settings import Settings
from cloister import providers
from cloister.config import ClusterConfig, load_config
from cloister.errors import CloisterError


def task(*args: Any, **kwargs: Any):
    """``invoke.task`` that turns CloisterError into a one-line ``Exit`` (no traceback)."""

    def decorate(body):
        @functools.wraps(body)
        def wrapper(*a: Any, **kw: Any):
            try:
                return body(*a, **kw)
            except CloisterError as err:
                raise Exit(str(err), code=1)

        return invoke_task(*args, **kwargs)(wrapper)

    return decorate


def number(flag: str, value: str | None, kind: type = int, *, positive: bool = False) -> int | float | None:
    """Invoke hands flags without a typed default over as strings; a non-number is a one-line error."""
    if value is None:
        return None
    noun = "integer" if kind is int else "number"
    expected = f"a positive {noun}" if positive else ("an integer" if kind is int else "a number")
    try:
        parsed = kind(value)
    except ValueError:
        raise Exit(f"{flag} {value!r}: expected {expected}", code=1)
    if positive and not parsed > 0:
        raise Exit(f"{flag} {value!r}: expected {expected}", code=1)
    return parsed


def settings(c) -> Settings:
    conf = c.cloister
    return Settings(config=conf.config, experiments=conf.experiments, runs_dir=conf.runs_dir,
                    servers_dir=conf.servers_dir, state_dir=conf.state_dir,
                    concurrency=_positive_int(conf.concurrency, "cloister.concurrency"),
                    connect_timeout=float(conf.connect_timeout), ssh_timeout=float(conf.ssh_timeout),
                    redeploy_concurrency=_positive_int(conf.redeploy_concurrency, "cloister.redeploy_concurrency"))


def _positive_int(value: Any, name: str) -> int:
    """A setting that must be a positive integer (it may arrive as a string from INVOKE_CLOISTER_* env)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise Exit(f"{name}: expected a positive integer, got {value!r}", code=1)
    return number


def load(c, config: str | None, **overrides: Any) -> ClusterConfig:
    """The cluster config: ``--config`` or cloister.config, under flags, over invoke.yaml/env."""
    path = config or c.cloister.config
    cfg = load_config(path, defaults=dict(c.cloister), overrides=overrides, providers=providers.names())
    for notice in cfg.notices:
        print(f"note: {notice}", file=sys.stderr)
    launched = _named_by_flag(c, cfg)
    if launched and overrides.get("cluster_name") is None:
        print(f"note: using cluster '{launched}', launched from {cfg.source} with --name", file=sys.stderr)
        cfg = cfg.replace(cluster_name=launched)
    return cfg


def _named_by_flag(c, cfg: ClusterConfig) -> str | None:
    """The cluster in servers/ if it was launched from this very config file under another --name."""
    from pathlib import Path

    from cloister.errors import ServersError
    from cloister.servers import read_servers

    try:
        info = read_servers(c.cloister.servers_dir)
    except ServersError:
        return None
    same_file = info.extra.get("config") == str(Path(cfg.source).resolve())
    if same_file and info.extra.get("named_by_flag") and info.provider == cfg.provider:
        return info.cluster_name
    return None


def install_error_hook() -> None:
    """Report a badly typed INVOKE_CLOISTER_* variable or flag value in one line.

    Invoke casts environment values to the type of their default while it loads its config, and
    flag values to the type of their task's default while it parses argv: both after the tasks are
    imported and before any task runs, so no task can catch these errors.
    """
    import os
    from pathlib import Path

    previous = sys.excepthook

    def frame_locals(tb, where: tuple[str, ...], name: str) -> dict | None:
        found = None
        while tb is not None:
            if Path(tb.tb_frame.f_code.co_filename).parts[-len(where):] == where and name in tb.tb_frame.f_locals:
                found = tb.tb_frame.f_locals
            tb = tb.tb_next
        return found

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, Exception):
            previous(exc_type, exc, tb)
            return
        env = frame_locals(tb, ("invoke", "env.py"), "real_var")
        flag = frame_locals(tb, ("invoke", "parser", "argument.py"), "value")
        if env is not None:
            var = env["real_var"]
            expected = ("a list cannot come from the environment; set it in the config file or invoke.yaml"
                        if "adapt" in str(exc) else f"wrong type ({exc})")
            print(f"environment variable {var}={os.environ.get(var, '')!r}: {expected}", file=sys.stderr)
        elif flag is not None and "self" in flag:
            argument = flag["self"]
            kind = "an integer" if argument.kind is int else f"a {argument.kind.__name__}"
            dashes = "-" if len(argument.name) == 1 else "--"
            print(f"{dashes}{argument.name.replace('_', '-')} {flag['value']!r}: expected {kind}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    sys.excepthook = hook
