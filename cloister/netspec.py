"""The ``network`` key of a local config: how local hosts are networked and how their links are shaped.

``{"rate": "1gbit", "latency": "2ms", "loss": "0.1%"}`` shapes every host's link: ``rate`` caps each
direction, ``latency`` is the one-way delay between two hosts, ``loss`` the share of packets lost
between two hosts. ``mode`` is ``netns`` (each host its own network namespace on a bridge, the default)
or ``loopback`` (every host on this machine's own network, on a loopback address).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

MODES = ("netns", "loopback")
KEYS = ("mode", "rate", "latency", "loss")
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
              "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
TIME_UNITS = {"us": 1, "ms": 10**3, "s": 10**6}
_NUMBER = r"(\d+(?:\.\d+)?)\s*"
RATE_RE = re.compile(_NUMBER + r"([a-z]+)", re.IGNORECASE)
TIME_RE = re.compile(_NUMBER + r"(us|ms|s)")
LOSS_RE = re.compile(_NUMBER + r"%")


@dataclass(frozen=True)
class NetworkSpec:
    mode: str = "netns"
    rate_bit: int | None = None       # bits per second, each direction of each host's link
    latency_us: int = 0               # one-way, host to host
    loss_pct: float = 0.0             # host to host

    @property
    def shaped(self) -> bool:
        return self.rate_bit is not None or self.needs_netem

    @property
    def needs_netem(self) -> bool:
        return self.latency_us > 0 or self.loss_pct > 0


def parse_network(value: Any, *, file: str) -> NetworkSpec:
    """The spec of a config's ``network`` value (None: the defaults); ConfigError naming the bad key."""
    if value is None:
        return NetworkSpec()
    if not isinstance(value, dict):
        raise ConfigError(file=file, key="network", expected=f"expected a mapping such as "
                                                             f'{{"rate": "1gbit", "latency": "2ms"}}, got {value!r}')
    for key in value:
        if key not in KEYS:
            raise ConfigError(file=file, key=f"network.{key}", expected=f"unknown key; valid keys: {', '.join(KEYS)}")
    mode = value.get("mode", "netns")
    if mode not in MODES:
        raise ConfigError(file=file, key="network.mode", expected=f"expected one of {', '.join(MODES)}, got {mode!r}")
    spec = NetworkSpec(mode=mode, rate_bit=_rate(value.get("rate"), file=file),
                       latency_us=_latency(value.get("latency"), file=file), loss_pct=_loss(value.get("loss"), file=file))
    if spec.shaped and mode == "loopback":
        raise ConfigError(file=file, key="network.mode", expected="loopback hosts share one link and cannot be "
                                                                  "shaped; use mode netns or drop rate/latency/loss")
    return spec


def _rate(value: Any, *, file: str) -> int | None:
    match = RATE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else None
    if value is None:
        return None
    if unit not in RATE_UNITS or float(match.group(1)) * RATE_UNITS[unit] < 8000:
        raise ConfigError(file=file, key="network.rate",
                          expected=f"expected a rate of at least 8kbit such as '1gbit', '100mbit' or '10mbps', got {value!r}")
    return int(float(match.group(1)) * RATE_UNITS[unit])


def _latency(value: Any, *, file: str) -> int:
    match = TIME_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if value is None:
        return 0
    if match is None or float(match.group(1)) * TIME_UNITS[match.group(2)] > 10**7:
        raise ConfigError(file=file, key="network.latency",
                          expected=f"expected a one-way delay up to 10s such as '2ms' or '500us', got {value!r}")
    return round(float(match.group(1)) * TIME_UNITS[match.group(2)])


def _loss(value: Any, *, file: str) -> float:
    match = LOSS_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if value is None:
        return 0.0
    if match is None or float(match.group(1)) > 100:
        raise ConfigError(file=file, key="network.loss",
                          expected=f"expected a percentage such as '0%' or '0.5%', got {value!r}")
    return float(match.group(1))
