"""A small rsync wrapper in the spirit of ``patchwork.transfers.rsync``, and what one rsync did.

patchwork cannot be installed beside Fabric 3 / Invoke 2, so cloister keeps this one module:
each function takes a Fabric Connection, honours its user, port and key, runs one rsync and
returns the Invoke Result (``warn=True``: the caller decides what a non-zero exit means).

- ``rsync(c, source, target)`` runs rsync HERE and copies between this machine and ``c.host``
  (``download=True`` pulls), exactly like patchwork's function.
- ``rsync_from(c, sources, dest_host, target)`` runs rsync ON ``c.host`` and pushes to another
  machine (the dev instance pushing to a node); the ssh it uses there is described by ``Ssh``.

``parse`` turns rsync's ``--stats`` and ``--itemize-changes`` output into ``Stats``; ``Transfer`` is
one node's outcome, which redeploy and put/get both report.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fabric import Connection
from invoke.exceptions import CommandTimedOut
from invoke.runners import Result

from . import remote
from .shared import CIPHERS, KEX

@dataclass(frozen=True)
class Ssh:
    """The ``ssh`` command rsync uses (``rsync -e``), built from a Connection's user, port and key.

    Host keys are always checked (``StrictHostKeyChecking yes``) against ``known_hosts`` when given.
    ``control_path`` turns on OpenSSH connection sharing (ControlMaster auto, ControlPersist); with
    ``control_master`` "no" it only uses a master that is already there (cloister's warm connections).
    """

    user: str | None = None
    port: int = 22
    key: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10
    control_path: str | None = None
    control_persist: str = "10m"
    control_master: str = "auto"
    options: tuple[str, ...] = ()

    @classmethod
    def of(cls, c: Connection, **kwargs) -> "Ssh":
        """The ssh a Connection describes: its user, port and first key file."""
        keys = c.connect_kwargs.get("key_filename") or []
        if isinstance(keys, str):
            keys = [keys]
        return cls(user=c.user, port=int(c.port or 22), key=keys[0] if keys else None, **kwargs)

    def argv(self) -> list[str]:
        argv = ["ssh", "-T", "-x", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", f"Ciphers={CIPHERS}", "-o", f"KexAlgorithms={KEX}",
                "-o", "StrictHostKeyChecking=yes"]
        if self.port and int(self.port) != 22:
            argv += ["-p", str(self.port)]
        if self.key:
            argv += ["-i", self.key, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.control_path:
            argv += ["-o", f"ControlMaster={self.control_master}", "-o", f"ControlPath={self.control_path}"]
            if self.control_master != "no":
                argv += ["-o", f"ControlPersist={self.control_persist}"]
        for option in self.options:
            argv += ["-o", option]
        for word in argv:
            # rsync splits -e on whitespace; none of ours may contain any.
            if any(ch.isspace() for ch in word):
                raise ValueError(f"ssh option {word!r} contains whitespace")
        return argv

    def command(self) -> str:
        return " ".join(self.argv())


#: rsync gives up after this many seconds without any I/O (a hung node), however long the transfer.
IO_TIMEOUT = 120


def command(sources: Sequence[str], dest: str, *, ssh: Ssh, delete: bool = False, dry_run: bool = False,
            relative: bool = False, exclude: Iterable[str] = (), mkdir: str | None = None,
            rsync_opts: Sequence[str] = (), io_timeout: int | None = IO_TIMEOUT) -> str:
    """One shell-quoted rsync command line (archive mode, ``--stats``, itemized changes)."""
    argv = ["rsync", "-a", "--stats", "--itemize-changes", "-e", ssh.command()]
    if io_timeout:
        argv.append(f"--timeout={int(io_timeout)}")
    if relative:
        argv.append("--relative")
    if delete:
        argv.append("--delete")
    if dry_run:
        argv.append("--dry-run")
    for pattern in exclude:
        argv.append(f"--exclude={pattern}")
    if mkdir:
        # The classic way to create the destination's parents on any rsync version.
        argv.append(f"--rsync-path=mkdir -p {shlex.quote(mkdir)} && rsync")
    argv += list(rsync_opts)
    argv.append("--")
    argv += list(sources)
    argv.append(dest)
    return " ".join(shlex.quote(a) for a in argv)


def remote_spec(user: str | None, host: str, path: str) -> str:
    """``user@host:path``; IPv6 addresses in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{user}@{host}:{path}" if user else f"{host}:{path}"


def local_path(path: str) -> str:
    """A local path rsync cannot mistake for ``host:path`` (keeps a trailing slash)."""
    full = os.path.abspath(os.path.expanduser(path))
    return full + "/" if path.endswith("/") and full != "/" else full


def rsync(c: Connection, source: str, target: str, *, download: bool = False, exclude: Iterable[str] = (),
          delete: bool = False, dry_run: bool = False, known_hosts: str | None = None, mkdir: str | None = None,
          rsync_opts: Sequence[str] = (), ssh_opts: Sequence[str] = (), timeout: float | None = None,
          stop: threading.Event | None = None) -> Result:
    """Run rsync on this machine between here and ``c.host`` (patchwork.transfers.rsync's shape).

    Push ``source`` (local) to ``target`` (on ``c.host``), or with ``download`` pull ``source`` (on
    ``c.host``) into ``target`` (local). Returns the Result; a non-zero exit is not raised. Once
    ``stop`` is set (Ctrl-C), rsync and its ssh are killed and Stopped is raised.
    """
    # A warm connection's master carries rsync's ssh too.
    control = c.socket() if isinstance(c, remote.SharedConnection) else None
    ssh = Ssh.of(c, known_hosts=known_hosts, options=tuple(ssh_opts), control_path=control, control_master="no")
    if download:
        sources, dest = [remote_spec(c.user, c.host, source)], local_path(target)
    else:
        sources, dest = [local_path(source)], remote_spec(c.user, c.host, target)
    cmd = command(sources, dest, ssh=ssh, delete=delete, dry_run=dry_run, exclude=exclude, mkdir=mkdir,
                  rsync_opts=rsync_opts)
    return _local(cmd, timeout=timeout, stop=stop)


def _local(cmd: str, *, timeout: float | None, stop: threading.Event | None) -> Result:
    """Run ``cmd`` here in a session of its own, so that rsync and the ssh it starts end together.

    Ctrl-C reaches the main thread only; the thread running this polls ``stop`` and kills the session.
    """
    proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=remote.POLL)
            return Result(stdout=out, stderr=err, command=cmd, exited=proc.returncode, hide=("stdout", "stderr"))
        except subprocess.TimeoutExpired:
            stopped = stop is not None and stop.is_set()
            if stopped or (deadline is not None and time.monotonic() > deadline):
                _kill_session(proc)
                raise remote.Stopped() if stopped else CommandTimedOut(Result(command=cmd), timeout)


def _kill_session(proc: subprocess.Popen) -> None:
    """TERM the session, and KILL it if it is still there KILL_GRACE seconds later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.communicate(timeout=remote.KILL_GRACE)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def rsync_from(c: Connection, sources: Sequence[str], dest_host: str, target: str = "", *, ssh: Ssh,
               cwd: str | None = None, relative: bool = True, delete: bool = False, dry_run: bool = False,
               exclude: Iterable[str] = (), timeout: float | None = None,
               stop: threading.Event | None = None) -> Result:
    """Run rsync ON ``c.host`` (in ``cwd``, default its home) pushing ``sources`` to ``dest_host:target``.

    ``ssh`` is the ssh that rsync uses on ``c.host``: its key and known_hosts are paths there. The
    rsync ends with the SSH session (``remote.guarded``): Ctrl-C (``stop``) or a lost link stops it.
    """
    dest = remote_spec(ssh.user, dest_host, target)
    cmd = command(sources, dest, ssh=ssh, delete=delete, dry_run=dry_run, relative=relative, exclude=exclude)
    return remote.run_result(c, (f"cd {shlex.quote(cwd)} && " if cwd else "") + cmd, timeout=timeout, stop=stop)


# -- output ----------------------------------------------------------------

_NUMBER = r"([\d,.]+)([KMGT]?)"
_STATS = {
    "files": re.compile(rf"^Number of regular files transferred:\s*{_NUMBER}", re.M),
    "deleted": re.compile(rf"^Number of deleted files:\s*{_NUMBER}", re.M),
    "size": re.compile(rf"^Total transferred file size:\s*{_NUMBER}", re.M),
    "total_size": re.compile(rf"^Total file size:\s*{_NUMBER}", re.M),
    "sent": re.compile(rf"^Total bytes sent:\s*{_NUMBER}", re.M),
    "received": re.compile(rf"^Total bytes received:\s*{_NUMBER}", re.M),
}
_ITEM = re.compile(r"^(\*deleting|[<>ch.][fdLDS][.+?a-zA-Z ]{9}) (.+)$")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _number(match: re.Match | None) -> int:
    if not match:
        return 0
    digits, unit = match.groups()
    return int(float(digits.replace(",", "")) * _UNITS[unit])


@dataclass(frozen=True)
class Stats:
    """What one rsync did (or, in a dry run, would do)."""

    files: int = 0          # regular files transferred
    deleted: int = 0        # files deleted on the receiver
    size: int = 0           # bytes of file data transferred
    total_size: int = 0     # bytes of every file in the transfer
    sent: int = 0           # bytes the sender put on the wire
    received: int = 0
    items: tuple[str, ...] = field(default=())   # itemized changes, e.g. ">f+++++++++ clamor/x"

    @property
    def changed(self) -> int:
        return len(self.items)


def parse(output: str) -> Stats:
    """Stats from rsync ``--stats --itemize-changes`` output."""
    values = {key: _number(rx.search(output)) for key, rx in _STATS.items()}
    items = tuple(line for line in output.splitlines() if _ITEM.match(line))
    return Stats(items=items, **values)


def error_line(result: Result) -> str:
    """One line for a failed rsync: its exit code and the most telling stderr line."""
    lines = [ln.strip() for ln in (result.stderr or "").splitlines() if ln.strip()]
    # The first line that is not one of rsync's generic follow-ups names the cause
    # (ssh's "connect to host ...", "Host key verification failed.", "link_stat ... failed").
    useful = [ln for ln in lines if not _GENERIC.search(ln)]
    text = (useful or lines or [""])[0]
    stderr = result.stderr or ""
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return "ssh failed: host key does not match known_hosts (changed or spoofed); refusing to connect"
    if "Host key verification failed" in stderr:
        unknown = next((ln for ln in lines if ln.startswith("No ") and "host key is known" in ln), "")
        return "ssh failed: " + (unknown or "Host key verification failed.") + " (strict host key checking)"
    if _SSH_FAILURE.search(text):
        # rsync exits 255 or 12 for the same refused connection, depending on timing: say what happened.
        return f"ssh failed: {text}"
    meaning = EXIT_MEANINGS.get(result.exited, "")
    head = f"rsync exit {result.exited}" + (f" ({meaning})" if meaning else "")
    return f"{head}: {text}" if text else head


_GENERIC = re.compile(r"^rsync error:|connection unexpectedly closed|write error: Broken pipe|"
                      r"error in rsync protocol data stream|^rsync: \[\w+\] read error")

_SSH_FAILURE = re.compile(r"^ssh: |^Permission denied \(|^kex_exchange_identification|"
                          r"^Connection (closed|reset) by |^banner exchange")

EXIT_MEANINGS = {
    1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting files",
    5: "error starting client-server protocol", 10: "error in socket I/O", 11: "error in file I/O",
    12: "error in rsync protocol data stream", 20: "interrupted", 23: "partial transfer due to error",
    24: "some source files vanished", 30: "timeout in data send/receive", 35: "timeout waiting for daemon",
    127: "rsync not found", 255: "ssh failed",
}


# -- per-node outcomes ----------------------------------------------------------

@dataclass(frozen=True)
class Transfer:
    """One node's outcome: what moved, how long it took, or why it failed."""

    host: str
    name: str
    source: str                       # the host that sent it (the dev instance, a node, or "local")
    ok: bool
    duration: float
    stats: Stats = field(default_factory=Stats)
    error: str | None = None
    attempts: int = 1


OnResult = Callable[[Transfer], None]


def outcome(result: Result, *, host: str, name: str, source: str, duration: float, attempts: int = 1,
            context: str = "") -> Transfer:
    """The Transfer of one finished rsync; ``context`` leads its error (e.g. which node relayed it)."""
    ok = result.exited == 0
    return Transfer(host=host, name=name, source=source, ok=ok, stats=parse(result.stdout), duration=duration,
                    attempts=attempts, error=None if ok else context + error_line(result))


def failures(transfers: Iterable[Transfer]) -> dict[str, str]:
    """Why each failed node failed, by host."""
    return {t.host: t.error or "failed" for t in transfers if not t.ok}
