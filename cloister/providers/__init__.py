"""The provider registry: the one place that maps a config's ``provider`` name to its class.

A new provider is one module (or package) under ``cloister/providers/`` with a ``Provider``
subclass, and one line here. A provider's module is imported when a config names it: a task on a
local cluster does not pay for the ec2 provider's import, nor one on ec2 for the local one's.
"""

from __future__ import annotations

import importlib

from ..config import ClusterConfig
from ..errors import ConfigError
from ..settings import Settings
from .base import Provider

# name -> (module, class), imported on first use (``provider_class``).
MODULES: dict[str, tuple[str, str]] = {
    "ec2": ("cloister.providers.ec2", "Ec2Provider"),
    "local": ("cloister.providers.local", "LocalProvider"),
    "static": ("cloister.providers.static", "StaticProvider"),
}
REGISTRY: dict[str, type[Provider]] = {}


def register(cls: type[Provider]) -> type[Provider]:
    """Add a provider class under its ``name`` (usable as a class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*MODULES, *REGISTRY]))


def provider_class(name: str) -> type[Provider] | None:
    """The class registered under ``name`` (its module imported now if need be), or None."""
    if name not in REGISTRY and name in MODULES:
        module, attribute = MODULES[name]
        REGISTRY[name] = getattr(importlib.import_module(module), attribute)
    return REGISTRY.get(name)


def get(cfg: ClusterConfig, *, settings: Settings) -> Provider:
    """The provider ``cfg`` names, bound to it."""
    cls = provider_class(cfg.provider)
    if cls is None:
        raise ConfigError(file=cfg.source, key="provider",
                          expected=f"expected one of {', '.join(names())}, got \"{cfg.provider}\"")
    return cls(cfg, settings)
