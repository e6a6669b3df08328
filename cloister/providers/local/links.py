"""The root-namespace side of netns hosts' networks: one bridge per cluster, one veth per host, shaping.

cloister only ever runs ``ip``/``tc`` here on what it created (its bridge, the root ends of its veths);
each host configures its own end (``eth0``), ``lo`` and routes from its start-up script, with the
commands of ``host_script``. The bridge holds this machine's address on the cluster's network and
nothing else: no physical interface, no default route in the hosts, no forwarding, no NAT.
"""

from __future__ import annotations

import ipaddress
import json
import math
import shlex
import subprocess
from pathlib import Path

from ...errors import ProviderError
from ...netspec import NetworkSpec
from ...poll import Backoff

HOST_IF = "eth0"
FALLBACK = 'set "network": {"mode": "loopback"} in the config to run hosts on this machine\'s loopback instead'


def _run(argv: list[str], *, what: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ProviderError(f"'{argv[0]}' not found: install iproute2 (apt-get install iproute2)", provider="local")
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"exit {done.returncode}"
        raise ProviderError(f"{what} failed: {argv[0]}: {said}", provider="local")
    return done.stdout


def exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine's own namespace routes (all tables)."""
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"], what="reading routes") or "[]")
    found = []
    for route in routes:
        dst = route.get("dst", "default")
        if dst != "default":
            try:
                found.append(ipaddress.ip_network(dst, strict=False))
            except ValueError:
                continue
    return found


def create_bridge(name: str, *, address: str, prefixlen: int) -> None:
    """The cluster's bridge, with this machine's address on the cluster's network."""
    try:
        _run(["ip", "-batch", "-"], what=f"creating bridge {name}",
             stdin=f"link add {name} type bridge\nlink set dev {name} addrgenmode none\n"
                   f"address add {address}/{prefixlen} dev {name}\nlink set dev {name} up\n")
    except ProviderError as err:
        raise ProviderError(f"{err}; {FALLBACK}", provider="local") from None
    # Nothing that arrives from the hosts is forwarded, whatever this machine forwards elsewhere.
    Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").write_text("0\n")


def remove_bridge(name: str) -> bool:
    """Remove a cluster's bridge and whatever root ends of its veths are left (a host's netns is
    freed asynchronously after its last process, and its veth with it); wait until they are gone, so
    the next cluster on these addresses can take their names. True if anything was there."""
    def veths() -> list[str]:
        return [p.name for p in Path("/sys/class/net").glob(f"clv{name[len('clb-'):]}-*")]

    found = veths()
    if exists(name) and Path("/sys/class/net", name, "bridge").is_dir():
        found.append(name)
    for link in found:
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=60)  # gone meanwhile: fine
    backoff = Backoff(10.0, initial=0.005, maximum=0.1)
    while veths() or exists(name):
        if not backoff.wait():
            raise ProviderError(f"links of {name} still present after 10s: {', '.join(veths()[:4]) or name}",
                                provider="local")
    return bool(found)


def check_netem(bridge: str, spec: NetworkSpec) -> None:
    """Refuse latency or loss on a kernel without the netem qdisc, before any host starts."""
    if not spec.needs_netem:
        return
    try:
        _run(["tc", "qdisc", "add", "dev", bridge, "root", "netem", "delay", "1ms"], what="netem")
    except ProviderError as err:
        key = "latency" if spec.latency_us else "loss"
        raise ProviderError(f"network.{key} needs the netem qdisc (kernel module sch_netem), which this "
                            f"kernel lacks ({str(err).split(': ', 1)[-1]}); remove network.latency and "
                            f"network.loss, or use a kernel with netem", provider="local") from None
    _run(["tc", "qdisc", "del", "dev", bridge, "root"], what="netem")


def attach(veths: list[tuple[str, int]], *, bridge: str, spec: NetworkSpec) -> None:
    """For each (veth, pid): a veth pair whose peer is ``eth0`` in that process's network namespace,
    its root end on the bridge and shaped."""
    lines = []
    for veth, pid in veths:
        lines += [f"link add {veth} type veth peer name {HOST_IF} netns {pid}",
                  f"link set dev {veth} addrgenmode none", f"link set dev {veth} master {bridge} up"]
    _run(["ip", "-batch", "-"], what="creating the hosts' links", stdin="".join(f"{line}\n" for line in lines))
    shaping = [line for veth, _ in veths for line in qdisc_commands(veth, spec)]
    if shaping:
        _run(["tc", "-batch", "-"], what="shaping the hosts' links", stdin="".join(f"{line}\n" for line in shaping))


def qdisc_commands(dev: str, spec: NetworkSpec) -> list[str]:
    """tc commands shaping what leaves ``dev``. Each host-to-host path leaves two devices (the sender's
    eth0, the receiver's veth end): each gets the full rate, half the latency, half the loss."""
    netem = []
    if spec.latency_us:
        netem.append(f"delay {spec.latency_us / 2:.0f}us")
    if spec.loss_pct:
        netem.append(f"loss {100 * (1 - math.sqrt(1 - spec.loss_pct / 100)):.6f}%")
    tbf = None
    if spec.rate_bit:
        burst = max(16000, spec.rate_bit // 8 // 250)  # 4 ms at the rate
        tbf = f"tbf rate {spec.rate_bit}bit burst {burst} latency 50ms"
    if netem and tbf:
        return [f"qdisc add dev {dev} root handle 1: netem limit 100000 {' '.join(netem)}",
                f"qdisc add dev {dev} parent 1:1 handle 10: {tbf}"]
    if netem:
        return [f"qdisc add dev {dev} root handle 1: netem limit 100000 {' '.join(netem)}"]
    return [f"qdisc add dev {dev} root handle 1: {tbf}"] if tbf else []


def host_script(*, address: str, prefixlen: int, spec: NetworkSpec) -> str:
    """Shell run by a host's PID 1 in its own namespace: lo up, eth0 with its address, shaped."""
    lines = ["ip link set dev lo up", f"ip link set dev {HOST_IF} addrgenmode none",
             f"ip address add {shlex.quote(f'{address}/{prefixlen}')} dev {HOST_IF}", f"ip link set dev {HOST_IF} up"]
    lines += [f"tc {command}" for command in qdisc_commands(HOST_IF, spec)]
    return "".join(f"{line}\n" for line in lines)
