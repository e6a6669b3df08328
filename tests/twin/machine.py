"""One twin instance's machine: a disk (an overlay upper directory) and, while it runs, systemd as
PID 1 of its own PID, mount, UTS, IPC and cgroup namespaces, below one `unshare` process the twin
started (boot.sh). Killing that process ends the namespace and everything in it; nothing else is
ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from . import rootfs

BOOT_SH = Path(__file__).with_name("boot.sh")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "cloister-twin"
# systemd in a container powers off on SIGRTMIN+4 (what `machinectl poweroff` sends).
POWEROFF = signal.SIGRTMIN + 4
_cgroup_lock = threading.Lock()


class TwinError(RuntimeError):
    pass


def _hierarchies() -> list[Path]:
    """This process's cgroup in every mounted hierarchy (v1 controllers, name=systemd, unified): an
    instance gets a child in each, so that what its systemd creates stays inside it."""
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers:
            mount = CGROUP_ROOT / controllers.removeprefix("name=")
        elif (CGROUP_ROOT / "unified" / "cgroup.procs").exists():
            mount = CGROUP_ROOT / "unified"
        else:
            mount = CGROUP_ROOT
        if (mount / "cgroup.procs").exists():
            found.append(mount / path.lstrip("/"))
    return found


def _make_cgroups(name: str) -> list[Path]:
    made = []
    with _cgroup_lock:
        for parent in _hierarchies():
            group = parent / CGROUP_PARENT / name
            for _ in range(3):  # a twin in another process may remove the shared parent meanwhile
                with contextlib.suppress(FileNotFoundError):
                    for level in (group.parent, group):
                        level.mkdir(exist_ok=True)
                        # A new v1 cpuset accepts no process until it has CPUs and memory nodes.
                        for knob in ("cpuset.cpus", "cpuset.mems"):
                            if (level / knob).exists() and not (level / knob).read_text().strip():
                                (level / knob).write_text((level.parent / knob).read_text())
                    break
            made.append(group)
    return made


def _remove_cgroups(groups: list[Path]) -> list[Path]:
    """rmdir each group bottom-up (its systemd's sub-groups first); returns those that stayed."""
    stayed = []
    with _cgroup_lock:
        for group in groups:
            for _ in range(20):
                with contextlib.suppress(OSError):
                    for path, _, _ in os.walk(group, topdown=False):
                        os.rmdir(path)
                if not group.exists():
                    break
                time.sleep(0.1)  # a dead cgroup may take a moment to release
            else:
                stayed.append(group)
            with contextlib.suppress(OSError):
                group.parent.rmdir()  # the shared parent, once the last instance is gone
    return stayed


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Machine:
    """The machine behind instance ``instance_id``; ``on_exit(machine)`` runs when its PID 1 ends."""

    def __init__(self, instance_id: str, home: Path, *, hostname: str, user_data: bytes,
                 public_keys: list[str], image: Path | None, hide: tuple[str, ...],
                 on_exit: Callable[[Machine], None]):
        self.id = instance_id
        self.dir = home
        self.upper = home / "upper"
        self.console_path = home.parent.parent / "consoles" / f"{instance_id}.log"
        self.hostname = hostname
        self.addresses: list[str] = []
        self.want: str | None = None  # "stop" or "terminate" when the API asked for the power-off
        self.exit_code: int | None = None
        self._seed = {"user_data": user_data, "public_keys": public_keys}
        self._image, self._hide, self._on_exit = image, hide, on_exit
        self._proc: subprocess.Popen | None = None
        self._cgroups: list[Path] = []
        self._exited = threading.Event()
        self._exited.set()
        self._deadline: threading.Timer | None = None

    @property
    def address(self) -> str:
        """The private address (sshd listens on it and on the public one, if any)."""
        return self.addresses[0]

    @property
    def running(self) -> bool:
        return not self._exited.is_set()

    @property
    def init_pid(self) -> int | None:
        """The machine's PID 1 as this machine (the host) numbers it."""
        children = _children(self._proc.pid) if self.running else []
        return children[0] if children else None

    def _prepare(self) -> None:
        if self.upper.exists():
            return
        for part in ("upper", "work", "lower", "root"):
            (self.dir / part).mkdir(parents=True)
        if self._image is not None:
            # -a keeps what overlayfs stores in the upper layer: whiteouts, opaque xattrs, owners.
            subprocess.run(["cp", "-a", "--", f"{self._image}/.", str(self.upper)], check=True)
        else:
            rootfs.base_layer(self.upper, self._hide)
        rootfs.instance_layer(self.upper, instance_id=self.id, hostname=self.hostname,
                              address=self.addresses[0], **self._seed)

    def boot(self, addresses: list[str]) -> None:
        if self.running:
            raise TwinError(f"{self.id} is already running")
        self.addresses = addresses
        self._prepare()
        rootfs.boot_layer(self.upper, addresses)
        self.console_path.parent.mkdir(parents=True, exist_ok=True)
        self._cgroups = _make_cgroups(self.id)
        master, slave = os.openpty()
        tty.setraw(slave)  # the console log gets the bytes as written, without CR/LF translation
        argv = ["/bin/sh", str(BOOT_SH), "host", str(self.dir), self.hostname,
                os.readlink("/proc/self/ns/pid"), *(str(g / "cgroup.procs") for g in self._cgroups)]
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                          start_new_session=True)
        except BaseException:
            os.close(master)
            _remove_cgroups(self._cgroups)
            raise
        finally:
            os.close(slave)
        self.want, self.exit_code = None, None
        self._exited.clear()
        reader = threading.Thread(target=self._read_console, args=(master,), daemon=True)
        reader.start()
        threading.Thread(target=self._watch, args=(reader,), daemon=True).start()

    def _read_console(self, master: int) -> None:
        with open(self.console_path, "ab", buffering=0) as log:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the last writer (the machine) is gone
                    break
                if not chunk:
                    break
                log.write(chunk)
        os.close(master)

    def _watch(self, reader: threading.Thread) -> None:
        self.exit_code = self._proc.wait()
        if self._deadline is not None:
            self._deadline.cancel()
        reader.join(timeout=5)
        stayed = _remove_cgroups(self._cgroups)
        if stayed:
            with open(self.console_path, "a") as log:
                log.write(f"twin: cgroups still in use after the machine ended: {stayed}\n")
        self._exited.set()
        self._on_exit(self)

    def _signal_init(self, signum: int) -> bool:
        """Signal PID 1 through a pidfd, after checking the PID is still unshare's child."""
        pid = self.init_pid
        if pid is None:
            return False
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            if pid not in _children(self._proc.pid):
                return False
            signal.pidfd_send_signal(fd, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)

    def _init_is_systemd(self) -> bool:
        pid = self.init_pid
        with contextlib.suppress(OSError):
            return pid is not None and Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
        return False

    def power_off(self, grace: float) -> None:
        """Ask systemd to power off (a clean shutdown); kill the machine if it is not done in ``grace``
        seconds, or at once if systemd is not PID 1 yet (nothing to shut down cleanly)."""
        if not self.running:
            return
        if not (self._init_is_systemd() and self._signal_init(POWEROFF)):
            self.kill()
            return
        self._deadline = threading.Timer(grace, self.kill)
        self._deadline.daemon = True
        self._deadline.start()

    def kill(self) -> None:
        """SIGKILL to PID 1, which ends the namespace; unshare then exits only once all of it is gone.
        Before PID 1 exists, SIGKILL to unshare (its --kill-child takes PID 1 along)."""
        if self.running and not self._signal_init(signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)  # Popen checks first that it was not reaped

    def wait(self, timeout: float | None = None) -> bool:
        """True once the machine has ended (at once if it is not running)."""
        return self._exited.wait(timeout)

    def wait_ssh(self, timeout: float) -> bool:
        """True once sshd answers with its banner on the private address within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.running:
            with contextlib.suppress(OSError), socket.create_connection((self.address, 22), timeout=1) as s:
                s.settimeout(max(0.1, end - time.monotonic()))
                if s.recv(64).startswith(b"SSH-"):
                    return True
            time.sleep(0.1)
        return False

    def console(self) -> str:
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def destroy_disk(self) -> None:
        """Delete the disk (on termination); its mount points were only mounted in its namespace."""
        if self.running:
            raise TwinError(f"{self.id} is running; its disk stays")
        shutil.rmtree(self.dir, ignore_errors=True)
