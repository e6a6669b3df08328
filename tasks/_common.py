"""Shared plumbing for the task modules: config loading and error conversion."""

from __future__ import annotations

import functools
import sys
from typing import Any

from invoke import Exit
from invoke import task as invoke_task

from cloister.cluster import Settings
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


def settings(c) -> Settings:
    conf = c.cloister
    return Settings(servers_dir=conf.servers_dir, state_dir=conf.state_dir, concurrency=int(conf.concurrency),
                    connect_timeout=float(conf.connect_timeout), ssh_timeout=float(conf.ssh_timeout))


def load(c, config: str | None, **overrides: Any) -> ClusterConfig:
    """The cluster config: ``--config`` or cloister.config, under flags, over invoke.yaml/env."""
    path = config or c.cloister.config
    cfg = load_config(path, defaults=dict(c.cloister), overrides=overrides)
    for notice in cfg.notices:
        print(f"note: {notice}", file=sys.stderr)
    return cfg


def confirm(question: str) -> bool:
    """Ask on the terminal; no terminal means no."""
    if not sys.stdin or not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False
