"""Shared plumbing for the task modules: config loading and error conversion."""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from invoke import Exit
from invoke import task as invoke_task

from cloister.settings import Settings
from cloister.cluster import lifecycle as clusterlib
from cloister import providers
from cloister.config import ClusterConfig, load_config
from cloister.errors import CloisterError

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C


def task(*args: Any, **kwargs: Any):
    """``invoke.task`` that turns CloisterError into a one-line ``Exit`` (no traceback) and Ctrl-C,
    wherever it lands, into exit 130 (128 + SIGINT, as a shell reports it) with one line."""

    def decorate(body):
        @functools.wraps(body)
        def wrapper(*a: Any, **kw: Any):
            try:
                return body(*a, **kw)
            except CloisterError as err:
                raise Exit(str(err), code=1)
            except KeyboardInterrupt:
                raise interrupted(f"interrupted: {body.__name__.strip('_').replace('_', '-')} stopped (Ctrl-C)")

        return invoke_task(*args, **kwargs)(wrapper)

    return decorate


def interrupted(message: str) -> Exit:
    """The Exit (130) of a task stopped by Ctrl-C. The task is over and its clean-up done: from here on
    Ctrl-C is ignored, so that one more press cannot turn the last line into a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return Exit(message, code=INTERRUPTED)


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
    # float() reads "inf" and "nan": neither is a number of seconds or of anything else.
    if not math.isfinite(parsed) or (positive and not parsed > 0):
        raise Exit(f"{flag} {value!r}: expected {expected}", code=1)
    return parsed


def settings(c) -> Settings:
    """The cloister.* settings, checked: a bad one is a one-line error naming it and its variable."""
    conf = c.cloister
    return Settings(config=conf.config, experiments=_not_a_directory(conf.experiments, "experiments"),
                    runs_dir=_directory(conf.runs_dir, "runs_dir"),
                    servers_dir=_directory(conf.servers_dir, "servers_dir"),
                    state_dir=_directory(conf.state_dir, "state_dir"),
                    concurrency=_positive(conf.concurrency, "concurrency", int),
                    connect_timeout=_positive(conf.connect_timeout, "connect_timeout", float),
                    ssh_idle=_positive(conf.ssh_idle, "ssh_idle", float, zero=True),
                    ssh_timeout=_positive(conf.ssh_timeout, "ssh_timeout", float),
                    boot_stall=_positive(conf.boot_stall, "boot_stall", float),
                    redeploy_concurrency=_positive(conf.redeploy_concurrency, "redeploy_concurrency", int))


def _setting(name: str) -> str:
    return f"cloister.{name} (INVOKE_CLOISTER_{name.upper()})"


def _positive(value: Any, name: str, kind: type, *, zero: bool = False) -> int | float:
    """A setting that must be a positive (or with ``zero``, non-negative), finite number (it may arrive
    as a string from the environment)."""
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = -1
    if not (math.isfinite(number) and (number > 0 or (zero and number == 0))):
        noun = "integer" if kind is int else "number"
        adjective = "non-negative" if zero else "positive"
        raise Exit(f"{_setting(name)}: expected a {adjective} {noun}, got {value!r}", code=1)
    return number


def _not_a_directory(value: Any, name: str) -> str:
    """A file setting: it may be missing (the task that needs it says so), but it is no directory."""
    if Path(os.path.expanduser(str(value))).is_dir():
        raise Exit(f"{_setting(name)} {value}: is a directory, expected a file", code=1)
    return str(value)


def _directory(value: Any, name: str) -> str:
    """A directory setting: a directory cloister can write in, or one it can create (nothing is created here)."""
    path = Path(os.path.expanduser(str(value)))
    if not str(value).strip():
        raise Exit(f"{_setting(name)}: expected a directory, got {value!r}", code=1)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is not a directory" if existing == path else f"cannot be created: {existing} is not a directory"
        raise Exit(f"{_setting(name)} {value}: {what}", code=1)
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise Exit(f"{_setting(name)} {value}: {what}", code=1)
    return str(value)


def load(c, config: str | None, **overrides: Any) -> ClusterConfig:
    """The cluster config: ``--config`` or cloister.config, under flags, over invoke.yaml/env."""
    path = config or c.cloister.config
    cfg = load_config(path, defaults=dict(c.cloister), overrides=overrides, providers=providers.names())
    for notice in cfg.notices:
        print(f"note: {notice}", file=sys.stderr)
    launched = clusterlib.launched_under_another_name(cfg, settings=settings(c))
    if launched and overrides.get("cluster_name") is None:
        print(f"note: using cluster '{launched}', launched from {cfg.source} with --name", file=sys.stderr)
        cfg = cfg.replace(cluster_name=launched)
    return cfg


def install_error_hook() -> None:
    """Report a badly typed INVOKE_CLOISTER_* variable or flag value in one line.

    Invoke casts environment values to the type of their default while it loads its config, and
    flag values to the type of their task's default while it parses argv: both after the tasks are
    imported and before any task runs, so no task can catch these errors.
    """
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
