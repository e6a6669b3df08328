"""The local provider: N real sshd "hosts" on this machine.

Host i is an OpenSSH sshd running as PID 1 of its own PID/mount/UTS/network namespaces with its own
hostname, /etc/ssh, /etc/hosts, home, /tmp, ``lo`` and ``eth0`` (an address of 198.18.0.0/15 on the
cluster's bridge; or, in loopback mode, with no network namespace, on its own loopback address).
Killing that PID 1 ends every process of the host, and its network. An "image" is a directory copied
into each new host's home.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ...errors import Interrupted, ProviderError
from ...interrupts import shielded
from ...files import atomic_write
from ...poll import Backoff
from ...cluster.servers import ClusterInfo, Node
from ..base import NodeStatus
from ...netspec import NetworkSpec
from . import links
from .hostfiles import SSH_CONFIG, host_order, host_public_key, init_script, share_hosts, sshd_config
from .procs import alive, children, cmdline, pids, reap
from .subnets import HOSTS_PER_SUBNET, Block, claim_block, release_claims

SSHD = "/usr/sbin/sshd"
STATE_FILE = "cluster-state.json"

@dataclass(frozen=True)
class LocalHost:
    name: str
    role: str
    address: str


def state_dir(root: str | os.PathLike, cluster: str) -> Path:
    return Path(root).resolve() / "local" / cluster


def _keypair() -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption())
    public = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return private, public


def check_requirements(spec: NetworkSpec) -> None:
    """Raise ProviderError unless this machine can run local hosts."""
    if os.geteuid() != 0:
        raise ProviderError("the local provider needs root (namespaces, port 22 on loopback); run as root",
                            provider="local")
    if not Path(SSHD).exists():
        raise ProviderError(f"{SSHD} not found: install openssh-server (apt-get install openssh-server rsync)",
                            provider="local")
    for tool in ("unshare", "setsid", "rsync") + (("ip", "tc") if spec.mode == "netns" else ()):
        if shutil.which(tool) is None:
            raise ProviderError(f"'{tool}' not found: install util-linux, rsync and iproute2", provider="local")


def ensure_user(user: str) -> pwd.struct_passwd:
    """Create the login user if missing: password field '*' (no password, not locked)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--home-dir", f"/home/{user}", "--shell", "/bin/bash",
                        "--password", "*", user], check=True, capture_output=True)
        entry = pwd.getpwnam(user)
    shadow = subprocess.run(["getent", "shadow", user], capture_output=True, text=True).stdout
    if shadow.split(":")[1:2] and shadow.split(":")[1].startswith("!"):
        raise ProviderError(f"user '{user}' is locked ('!' in /etc/shadow) and sshd would refuse it; "
                            f"run: usermod -p '*' {user}", provider="local")
    Path(entry.pw_dir).mkdir(parents=True, exist_ok=True)
    return entry


def _plan(cluster: str, nworkers: int, dev: bool, block: Block) -> list[LocalHost]:
    names = [(f"{cluster}-master", "master")]
    names += [(f"{cluster}-worker-{i}", "worker") for i in range(1, nworkers + 1)]
    if dev:
        names.append((f"{cluster}-dev", "dev"))
    hosts = []
    for index, (name, role) in enumerate(names):
        prefix = block.prefix(index // HOSTS_PER_SUBNET)
        hosts.append(LocalHost(name=name, role=role, address=f"{prefix}.{index % HOSTS_PER_SUBNET + 1}"))
    return hosts


class LocalCluster:
    """One local cluster's state under ``{state_root}/local/{cluster}/``."""

    def __init__(self, *, state_root: str | os.PathLike, cluster: str, user: str = "ubuntu",
                 spec: NetworkSpec = NetworkSpec()):
        self.cluster = cluster
        self.user = user
        self.spec = spec
        self.dir = state_dir(state_root, cluster)
        self.key = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"

    # -- state -------------------------------------------------------------
    def _state(self) -> dict | None:
        try:
            return json.loads((self.dir / STATE_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def exists(self) -> bool:
        return self._state() is not None

    def state(self) -> dict:
        state = self._state()
        if state is None:
            raise ProviderError(f"no local cluster '{self.cluster}' under {self.dir}", provider="local",
                                cluster=self.cluster)
        return state


    def host_dir(self, name: str) -> Path:
        return self.dir / "hosts" / name

    def init_pid(self, name: str) -> int | None:
        try:
            return int((self.host_dir(name) / "init.pid").read_text())
        except (OSError, ValueError):
            return None

    def info(self) -> ClusterInfo:
        state = self.state()
        nodes = [Node(role=h["role"], id=h["name"], host=h["address"], private=h["address"],
                      public=h["address"], name=h["name"]) for h in state["hosts"]]
        return ClusterInfo(provider="local", cluster_name=self.cluster, user=state["user"], ssh_key=str(self.key),
                           nodes=nodes, known_hosts=str(self.known_hosts),
                           extra={"state_dir": str(self.dir), "launched": state["launched"],
                                  # Every host runs on this machine's kernel: no sysctl may be changed.
                                  "shared_kernel": True})

    def dead_hosts(self) -> list[str]:
        state = self._state() or {"hosts": []}
        return [h["name"] for h in state["hosts"] if not self.host_alive(h["name"])]

    def host_alive(self, name: str) -> bool:
        pid = self.init_pid(name)
        return pid is not None and alive(pid) and "sshd" in cmdline(pid)

    def status(self) -> list[NodeStatus]:
        state = self._state() or {"hosts": [], "launched": time.time()}
        rows = []
        for h in state["hosts"]:
            up = self.host_alive(h["name"])
            rows.append(NodeStatus(role=h["role"], id=h["name"], host=h["address"], name=h["name"],
                                   state="running" if up else "dead",
                                   uptime_s=time.time() - state["launched"] if up else None))
        return rows

    # -- launch ------------------------------------------------------------
    def launch(self, *, nworkers: int, dev: bool, image: str | None, timeout: float = 30.0) -> ClusterInfo:
        """Start the cluster, or return the running one unchanged (idempotent)."""
        check_requirements(self.spec)
        state = self._state()
        if state is not None:
            workers = sum(1 for h in state["hosts"] if h["role"] == "worker")
            dead = self.dead_hosts()
            if dead:
                raise ProviderError(f"local cluster '{self.cluster}' exists but {len(dead)} host(s) are down: "
                                    f"{', '.join(dead[:8])}; inv cluster.repair replaces them",
                                    provider="local", cluster=self.cluster)
            if workers != nworkers:
                raise ProviderError(f"local cluster '{self.cluster}' is running with {workers} workers, not "
                                    f"{nworkers}; inv cluster.resize --nworkers {nworkers} changes its size",
                                    provider="local", cluster=self.cluster)
            return self.info()
        entry = ensure_user(self.user)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        count = 1 + nworkers + (1 if dev else 0)
        block = claim_block(self.spec.mode, count, self.dir)
        hosts = _plan(self.cluster, nworkers, dev, block)
        try:
            self.prepare(hosts, entry, image, block)
            if block.mode == "netns":
                links.remove_bridge(block.bridge)  # a leftover of an earlier holder of these addresses
                links.create_bridge(block.bridge, address=block.gateway, prefixlen=block.network.prefixlen)
                links.check_netem(block.bridge, self.spec)
            self.start(hosts, block, timeout=timeout)
            return self.info()
        except BaseException as exc:
            outcome = self.end_launch()
            if isinstance(exc, KeyboardInterrupt):
                raise Interrupted(outcome) from None
            raise

    def start(self, hosts: list[LocalHost], block: Block, *, timeout: float) -> None:
        """Start the prepared ``hosts``; return once each listens and its PID 1 is recorded."""
        self._start(hosts, block)
        self._wait_listening(hosts, timeout)
        for host in hosts:
            self._record_init_pid(host)

    def prepare(self, hosts: list[LocalHost], entry: pwd.struct_passwd, image: str | None, block: Block, *,
                present: list[LocalHost] = ()) -> None:
        """Make ``hosts``' folders (keys, config, home from ``image``) and record them; ``present``: hosts
        of the running cluster they join (its key stays; their /etc/hosts and known hosts learn the new)."""
        if present:
            public = self.key.with_suffix(".pub").read_text().strip()
        else:
            private, public = _keypair()
            atomic_write(self.key, private, mode=0o600)
            atomic_write(self.key.with_suffix(".pub"), public + "\n")
        host_keys = [_keypair() for _ in hosts]
        everyone = [(h, host_public_key(self.host_dir(h.name))) for h in present] + \
            [(h, pub) for h, (_, pub) in zip(hosts, host_keys)]
        known = "".join(f"{h.address} {pub}\n" for h, pub in everyone)
        known_names = "".join(f"{h.name},{h.address} {pub}\n" for h, pub in everyone)
        atomic_write(self.known_hosts, known)
        etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h, _ in everyone)
        for host in present:
            share_hosts(self.host_dir(host.name), etc_hosts=etc_hosts, known_names=known_names)

        def prepare(pair: tuple[LocalHost, tuple[bytes, str]]) -> None:
            host, (host_private, host_public) = pair
            hdir = self.host_dir(host.name)
            etc = hdir / "etc_ssh"
            etc.mkdir(parents=True, exist_ok=True)
            atomic_write(etc / "sshd_config", sshd_config(address=host.address, user=entry.pw_name, spec=self.spec))
            atomic_write(etc / "ssh_config", SSH_CONFIG)
            atomic_write(etc / "ssh_host_ed25519_key", host_private, mode=0o600)
            atomic_write(etc / "ssh_host_ed25519_key.pub", host_public + "\n")
            atomic_write(etc / "ssh_known_hosts", known_names)
            atomic_write(hdir / "etc_hosts", etc_hosts)
            atomic_write(hdir / "etc_hostname", host.name + "\n")
            home = hdir / "home"
            if image:
                shutil.copytree(image, home, symlinks=False, dirs_exist_ok=True)
            ssh_dir = home / ".ssh"
            ssh_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(ssh_dir / "authorized_keys", public + "\n", mode=0o600)
            os.chmod(home, 0o755)
            os.chmod(ssh_dir, 0o700)
            for root, dirs, files in os.walk(home):
                for item in (root, *(os.path.join(root, n) for n in dirs + files)):
                    os.lchown(item, entry.pw_uid, entry.pw_gid)
            tmp = hdir / "tmp"
            tmp.mkdir(exist_ok=True)
            os.chmod(tmp, 0o1777)
            atomic_write(hdir / "init.sh", init_script(hostdir=str(hdir), hostname=host.name, home=entry.pw_dir,
                                                       sshd=SSHD, address=host.address,
                                                       prefixlen=block.network.prefixlen, spec=self.spec), mode=0o755)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(prepare, zip(hosts, host_keys)))
        before = self._state() if present else None
        state = {**(before or {}), "cluster": self.cluster, "user": entry.pw_name,
                 "launched": before["launched"] if before else time.time(), "image": image,
                 "block": block.to_json(), "bridge": block.bridge if block.mode == "netns" else None,
                 "hosts": [{"name": h.name, "role": h.role, "address": h.address}
                           for h in sorted((h for h, _ in everyone), key=lambda h: host_order(h.name, h.role))]}
        atomic_write(self.dir / STATE_FILE, json.dumps(state, indent=2))

    def _start(self, hosts: list[LocalHost], block: Block) -> None:
        netns = block.mode == "netns"
        waiting: dict[str, tuple[int, int]] = {}  # host -> (unshare's pid, the pipe its PID 1 waits on)
        try:
            for host in hosts:
                hdir = self.host_dir(host.name)
                read_end, write_end = os.pipe() if netns else (subprocess.DEVNULL, -1)
                try:
                    with open(hdir / "sshd.log", "ab") as log:
                        proc = subprocess.Popen(
                            ["unshare", "--pid", "--fork", "--kill-child=SIGTERM", "--mount", "--uts", "--mount-proc",
                             *(["--net"] if netns else []), "--propagation", "private", "/bin/sh",
                             str(hdir / "init.sh")],
                            stdin=read_end, stdout=log, stderr=log, start_new_session=True, close_fds=True)
                except BaseException:
                    if netns:
                        os.close(write_end)
                    raise
                finally:
                    if netns:
                        os.close(read_end)
                if netns:
                    waiting[host.name] = (proc.pid, write_end)
                atomic_write(hdir / "unshare.pid", str(proc.pid))
            if netns:
                self._link(hosts, block, {name: pid for name, (pid, _) in waiting.items()})
                for _, write_end in waiting.values():
                    # A host that has already ended is named with its log by the wait that follows.
                    with contextlib.suppress(BrokenPipeError):
                        os.write(write_end, b"go\n")
        finally:
            for _, write_end in waiting.values():
                os.close(write_end)

    def _link(self, hosts: list[LocalHost], block: Block, unshares: dict[str, int]) -> None:
        """Once each unshare is in its new network namespace, give it its veth (named by host index)."""
        own = os.readlink("/proc/self/ns/net")
        backoff = Backoff(10.0, initial=0.001, maximum=0.05)
        pending = set(unshares)
        while pending:
            for name in list(pending):
                pid = unshares[name]
                if not alive(pid):
                    reap(pid)
                    raise ProviderError(f"[{name}] could not start its namespaces: {self.log_tail(name)}; "
                                        f"{links.FALLBACK}", provider="local", cluster=self.cluster)
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/ns/net") != own:
                        pending.discard(name)
            if pending and not backoff.wait():
                raise ProviderError(f"{len(pending)} local host(s) got no network namespace in 10s",
                                    provider="local", cluster=self.cluster)
        veths = [(block.veth(host.address), unshares[host.name]) for host in hosts]
        links.attach(veths, bridge=block.bridge, spec=self.spec)

    def _wait_listening(self, hosts: list[LocalHost], timeout: float) -> None:
        pending = {h.name: h for h in hosts}
        backoff = Backoff(timeout, initial=0.01, maximum=0.2)
        while pending:
            for name, host in list(pending.items()):
                with socket.socket() as probe:
                    probe.settimeout(0.5)
                    if probe.connect_ex((host.address, 22)) == 0:
                        del pending[name]
                        continue
                pid = self._unshare_pid(name)
                if pid is not None and not alive(pid):
                    reap(pid)
                    raise ProviderError(f"[{name}] sshd exited at start-up: {self.log_tail(name)}",
                                        provider="local", cluster=self.cluster)
            if not pending:
                break
            if not backoff.wait():
                raise ProviderError(f"{len(pending)} local host(s) not listening after {timeout:.0f}s: "
                                    f"{', '.join(list(pending)[:8])}", provider="local", cluster=self.cluster)

    def _unshare_pid(self, name: str) -> int | None:
        try:
            return int((self.host_dir(name) / "unshare.pid").read_text())
        except (OSError, ValueError):
            return None

    def _record_init_pid(self, host: LocalHost) -> None:
        outer = self._unshare_pid(host.name)
        inits = children(outer) if outer else []
        if not inits:
            raise ProviderError(f"[{host.name}] namespace init not found", provider="local", cluster=self.cluster)
        atomic_write(self.host_dir(host.name) / "init.pid", str(inits[0]))

    def log_tail(self, name: str, lines: int = 3) -> str:
        try:
            text = (self.host_dir(name) / "sshd.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    # -- destroy -----------------------------------------------------------
    def running_hosts(self) -> list[str]:
        """The hosts of this cluster whose namespace still runs, recorded or not (found by their unshare)."""
        hosts_dir = f"{self.dir}/hosts/"
        found = set()
        for pid in pids():
            argv = cmdline(pid)
            if argv.startswith("unshare ") and hosts_dir in argv:
                found.add(argv.split(hosts_dir, 1)[1].split("/", 1)[0])
        return sorted(found)

    def end_launch(self) -> str:
        """End what an unfinished launch started, a second Ctrl-C notwithstanding; say in one line what
        was really ended and name what was not."""
        with shielded():
            started = self.running_hosts()
            self.destroy()
            left = self.running_hosts()
        if not started:
            return "no host had started"
        if not left:
            return f"ended the {len(started)} hosts it had started"
        more = f" and {len(left) - 8} more" if len(left) > 8 else ""
        return (f"ended {len(set(started) - set(left))} of the {len(started)} hosts it had started; still running: "
                f"{', '.join(left[:8])}{more} (inv cluster.destroy --yes ends them)")

    def kill_host(self, name: str) -> bool:
        """End one host: SIGKILL its namespace's PID 1, which takes every process of the host with it."""
        hdir = str(self.host_dir(name))
        return self._end_namespace(self._unshare_pid(name), hdir, init=self.init_pid(name))

    def _end_namespace(self, outer: int | None, hdir: str, *, init: int | None = None) -> bool:
        """SIGKILL the namespace init (found as unshare's child if it was not recorded), then reap unshare."""
        killed = False
        outer_ours = outer is not None and alive(outer) and hdir in cmdline(outer)
        if (init is None or not alive(init)) and outer_ours:
            init = next(iter(children(outer)), None)
        if init is not None and alive(init) and ("sshd" in cmdline(init) or hdir in cmdline(init)):
            if outer is None or not alive(outer) or init in children(outer):
                os.kill(init, signal.SIGKILL)
                killed = True
        if outer_ours:
            # unshare exits once its child (the namespace's init) is gone.
            backoff = Backoff(5.0, initial=0.005, maximum=0.005)
            while alive(outer):
                reap(outer)
                if not backoff.wait():
                    break
            if alive(outer):
                os.kill(outer, signal.SIGKILL)
                killed = True
            reap(outer)
        return killed

    def destroy(self) -> int:
        """Kill every host of this cluster and remove its state; return how many hosts were running."""
        state = self._state()
        names = [h["name"] for h in state["hosts"]] if state else \
            [p.name for p in (self.dir / "hosts").glob("*")] if (self.dir / "hosts").exists() else []
        running = sum(1 for n in names if self.host_alive(n))
        for name in names:
            self.kill_host(name)
        # A launch interrupted between starting a host and recording its PID leaves no pid file:
        # find every unshare still running one of this cluster's init scripts.
        hosts_dir = f"{self.dir}/hosts/"
        for pid in pids():
            argv = cmdline(pid)
            if argv.startswith("unshare ") and hosts_dir in argv:
                hdir = argv.split(hosts_dir, 1)[1].split("/", 1)[0]
                self._end_namespace(pid, hosts_dir + hdir)
        if self.running_hosts():  # keep what a later destroy needs to find them: state, bridge, claims
            return running
        bridge = state.get("bridge") if state else None
        if bridge:
            links.remove_bridge(bridge)
        # Claims name the bridges of a launch interrupted before its state was written.
        for leftover in release_claims(self.dir):
            links.remove_bridge(leftover)
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        return running
