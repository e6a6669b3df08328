"""The provider registry: the one place that maps a config's ``provider`` name to its class.

A new provider is one module (or package) under ``cloister/providers/`` with a ``Provider``
subclass, and one line here.
"""

from __future__ import annotations

from ..config import ClusterConfig
from ..errors import ConfigError
from ..settings import Settings
from .base import Provider
from .ec2 import Ec2Provider
from .local import LocalProvider
from .static import StaticProvider

REGISTRY: dict[str, type[Provider]] = {cls.name: cls for cls in (Ec2Provider, LocalProvider, StaticProvider)}


def register(cls: type[Provider]) -> type[Provider]:
    """Add a provider class under its ``name`` (usable as a class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(cfg: ClusterConfig, *, settings: Settings) -> Provider:
    """The provider ``cfg`` names, bound to it."""
    try:
        cls = REGISTRY[cfg.provider]
    except KeyError:
        raise ConfigError(file=cfg.source, key="provider",
                          expected=f"expected one of {', '.join(REGISTRY)}, got \"{cfg.provider}\"") from None
    return cls(cfg, settings)
