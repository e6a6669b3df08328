"""The twin: a moto EC2 server in this process whose instances are machines (see the package doc)."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import moto_server as ms  # before anything imports moto: its validation switches

from moto.ec2.models.instances import Instance, StateReason

from . import faults as twin_faults
from . import hooks, identity, reclaim
from .addresses import AddressPool
from .machine import CGROUP_ROOT, Machine, TwinError

# What each needed file comes from (scripts/twin-deps.sh installs them).
REQUIRED = {"/lib/systemd/systemd": "systemd", "/usr/bin/cloud-init": "cloud-init",
            "/usr/sbin/sshd": "openssh-server", "/usr/bin/ssh-keygen": "openssh-client",
            "/usr/bin/sudo": "sudo", "/usr/bin/setpriv": "util-linux", "/usr/bin/unshare": "util-linux",
            "/usr/sbin/chroot": "coreutils", "/usr/bin/rsync": "rsync"}
STATES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


def check_requirements() -> None:
    if os.geteuid() != 0:
        raise TwinError("the EC2 twin needs root (namespaces, mounts, cgroups)")
    missing = sorted({package for path, package in REQUIRED.items() if not os.path.exists(path)})
    if missing:
        raise TwinError(f"the EC2 twin needs {', '.join(missing)}: run scripts/twin-deps.sh")
    if not (CGROUP_ROOT / "systemd" / "cgroup.procs").exists() and not (CGROUP_ROOT / "cgroup.procs").exists():
        raise TwinError(f"no systemd cgroup hierarchy under {CGROUP_ROOT}")


def _set_state(instance: Instance, name: str) -> None:
    instance._state.name, instance._state.code = name, STATES[name]


def _addresses(instance: Instance) -> list[str]:
    primary = instance.nics[0]
    return [primary.private_ip_address] + ([primary.public_ip] if primary.public_ip else [])


class Twin:
    """``with Twin() as twin:`` a moto EC2 endpoint at ``twin.url`` whose instances boot.

    ``twin.client()`` is a boto3 EC2 client for it, ``twin.env()`` the environment for an ``inv``
    subprocess, ``twin.machine(instance_id)`` the machine behind an instance (address, console,
    wait_ssh, running, init_pid). ``grace`` is how long a clean power-off may take before the
    machine is killed.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, *, grace: float = 20.0,
                 faults: twin_faults.Faults | None = None):
        self.grace = grace
        # EC2's daily failures (tests/twin/faults.py); by default those CLOISTER_TWIN_FAULTS names.
        self.faults = faults if faults is not None else twin_faults.Faults.parse(os.environ.get(twin_faults.ENV, ""))
        self.url = ""
        self.machines: dict[str, Machine] = {}
        self.images: dict[str, Path] = {}
        self._state_dir = state_dir
        self._instances: dict[str, Instance] = {}
        self._lock = threading.RLock()
        self._closing = False
        self._stack = contextlib.ExitStack()
        self.requests = identity.Requests()  # every request moto answered (identity.py)

    def __enter__(self) -> Twin:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        check_requirements()
        try:
            self.dir = Path(self._state_dir or tempfile.mkdtemp(prefix="cloister-twin-")).resolve()
            if "," in str(self.dir) or ":" in str(self.dir):
                raise TwinError(f"{self.dir}: overlayfs options cannot carry ',' or ':'")
            self.dir.mkdir(parents=True, exist_ok=True)
            self._stack.callback(shutil.rmtree, self.dir, ignore_errors=True)
            self.pool = AddressPool(self.dir)
            self._stack.callback(self.pool.release)
            self._stack.enter_context(hooks.installed(self))
            # The faults first, so that the record of requests (identity) sees the refused ones too.
            self._stack.enter_context(twin_faults.installed(self.faults))
            self._stack.enter_context(identity.installed(self.requests))
            server = ms.MotoEc2()
            self._stack.callback(server.stop)
            # Forget every instance before and after, so no other test sees a twin instance.
            server.reset()
            self._stack.callback(server.reset)
            self.url = server.url
            self._stack.callback(self._end_machines)
        except BaseException:
            self._stack.close()
            raise

    def stop(self) -> None:
        """End every machine, then moto, the claims and the state directory."""
        self._stack.close()

    def _end_machines(self) -> None:
        self._closing = True
        for machine in self.machines.values():
            machine.kill()
        stuck = [m.id for m in self.machines.values() if not m.wait(30)]
        if stuck:
            raise TwinError(f"machines still running after SIGKILL: {stuck}")

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "ec2", region_name=ms.REGION, endpoint_url=self.url,
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def env(self) -> dict[str, str]:
        return ms.aws_env(self.url)

    def profile_env(self, directory: Path, *, role: str) -> dict[str, str]:
        """``env()`` with credentials from a profile that assumes ``role`` (identity.py)."""
        return identity.profile_env(self.env(), directory, role=role)

    def reclaim(self, instance_id: str) -> None:
        """EC2 takes the spot instance back (reclaim.py)."""
        reclaim.reclaim(self, instance_id)

    def machine(self, instance_id: str) -> Machine:
        return self.machines[instance_id]

    def console(self, instance_id: str) -> str:
        machine = self.machines.get(instance_id)
        return machine.console() if machine else ""

    # -- called by the hooks, inside moto's request handling ----------------------------------

    def created(self, instance: Instance) -> None:
        with self._lock:
            for nic in instance.nics.values():
                address = self.pool.take()
                nic.private_ip_address, nic.private_dns_name = address, address
                nic.private_ip_addresses = [{"Primary": True, "PrivateIpAddress": address}]
                if nic.public_ip:
                    nic.public_ip = self.pool.take()
            private = instance.nics[0].private_ip_address
            key = instance.ec2_backend.key_pairs.get(instance.key_name or "")
            user_data = base64.b64decode(instance.user_data.as_bytes()) if instance.user_data else b""
            machine = Machine(
                instance.id, self.dir / "instances" / instance.id, hostname="ip-" + private.replace(".", "-"),
                user_data=user_data, public_keys=[key.material_public.decode()] if key else [],
                image=self.images.get(instance.image_id), hide=(str(self.dir),), on_exit=self._exited)
            self.machines[instance.id] = machine
            self._instances[instance.id] = instance
            machine.boot(_addresses(instance))

    def started(self, instance: Instance) -> None:
        with self._lock:
            machine = self.machines.get(instance.id)
            # As on EC2, a started instance gets a new public address; the private one stays.
            for nic in instance.nics.values():
                if nic.public_ip:
                    nic.public_ip = self.pool.take()
            if machine is not None and not machine.running:
                machine.boot(_addresses(instance))

    def stopping(self, instance: Instance) -> None:
        with self._lock:
            machine = self.machines.get(instance.id)
            if machine is not None and machine.running:
                machine.want = "stop"
                _set_state(instance, "stopping")
                machine.power_off(self.grace)

    def terminating(self, instance: Instance) -> None:
        with self._lock:
            machine = self.machines.get(instance.id)
            if machine is None:
                return
            if machine.running:
                machine.want = "terminate"
                _set_state(instance, "shutting-down")
                machine.power_off(self.grace)
            else:
                machine.destroy_disk()

    def imaged(self, ami_id: str, instance_id: str) -> None:
        """Record the instance's disk as the image's (no reboot, as with NoReboot=true)."""
        target = self.dir / "images" / ami_id
        target.parent.mkdir(exist_ok=True)
        # rsync (not cp) because a running instance's files may vanish while copied (exit code 24).
        copy = subprocess.run(["rsync", "-aHX", "--numeric-ids", "--", f"{self.machines[instance_id].upper}/",
                               f"{target}/"], check=False, capture_output=True, text=True)
        if copy.returncode not in (0, 24):
            raise TwinError(f"recording the image of {instance_id} failed: {copy.stderr.strip()}")
        self.images[ami_id] = target

    def _exited(self, machine: Machine) -> None:
        """PID 1 ended: the API asked for it, or the machine powered itself off (then, as EC2 does,
        InstanceInitiatedShutdownBehavior says stopped or terminated). A terminated instance's disk
        goes before the state says so, so that whoever sees "terminated" finds no disk."""
        with self._lock:
            if self._closing:
                return
            instance = self._instances[machine.id]
            if machine.want is not None:
                if machine.want == "terminate":
                    machine.destroy_disk()
                _set_state(instance, "stopped" if machine.want == "stop" else "terminated")
                return
            if machine.exit_code != 0:
                action, reason = "terminate", StateReason("Server.InternalError: Internal error on launch",
                                                          "Server.InternalError")
            else:
                action = "terminate" if instance.instance_initiated_shutdown_behavior == "terminate" else "stop"
                reason = StateReason("Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                                     "Client.InstanceInitiatedShutdown")
            if action == "terminate":
                machine.destroy_disk()
            hooks.ORIGINAL[action](instance)
            instance.state_reason = reason
