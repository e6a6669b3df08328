"""One command on one host over a channel that cloister reads itself: stoppable, any output size.

Fabric's runner cannot be stopped from another thread (Ctrl-C reaches only the main thread) and its
watchers re-scan the whole captured output on every chunk, so a large output costs the square of its
size. ``execute`` reads the channel in 64 KiB chunks, hands them to the caller, polls a stop event
and a deadline, and closes the channel when either fires. ``guarded`` makes the remote side end
with the channel: sshd does not signal a command whose session closed without a pty.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit
from invoke.runners import Result

from ..errors import CloisterError
from ..poll import retry
from . import shared

T = TypeVar("T")

CHUNK = 1 << 16
POLL = 0.1                  # seconds between checks of the stop event and the deadline
SPILL_LIMIT = 1 << 20       # bytes of one stream kept in memory before it goes to a file
TAIL = 4096                 # bytes of a spilled stream still kept in memory: its last lines
KILL_GRACE = 1              # seconds between TERM and KILL for the command's process group
RECONNECT_TIMEOUT = 30.0    # seconds a host whose session was lost gets to take a new one


class Stopped(CloisterError):
    """The caller stopped the command (Ctrl-C) before it ended; the channel is closed."""

    def __init__(self) -> None:
        super().__init__("interrupted")


class SessionLost(CloisterError):
    """The SSH session ended before the command reported an exit status."""

    def __init__(self) -> None:
        super().__init__("SSH session lost before the command ended")


def connection_lost(exc: BaseException) -> bool:
    """Whether a new connection may cure ``exc``: the session or the link went away, or the host's sshd
    refused for a moment. A refused key or host key, a timeout or a command's own failure may not."""
    if isinstance(exc, (paramiko.AuthenticationException, paramiko.BadHostKeyException, CommandTimedOut)):
        return False
    if isinstance(exc, paramiko.SSHException) and "known_hosts" in str(exc):
        return False
    return isinstance(exc, (SessionLost, EOFError, ConnectionError, TimeoutError, paramiko.SSHException,
                            paramiko.ssh_exception.NoValidConnectionsError))


def reconnecting(call: Callable[[], T], *, timeout: float = RECONNECT_TIMEOUT) -> T:
    """``call`` (which opens its Connection itself), again with backoff while the connection is lost:
    a Connection whose session died reconnects on its next use."""
    return retry(call, transient=connection_lost, timeout=timeout, initial=0.2, maximum=2.0)


class SharedConnection(Connection):
    """A Connection whose commands run over the host's OpenSSH master (``shared``), opened on first use
    and kept for later invocations. ``run`` takes Fabric's arguments that cloister uses (warn, timeout;
    output is always captured, stdin never read) and returns the same Result; SFTP still opens a
    Paramiko connection of its own."""

    sharing: shared.Sharing | None = None
    ssh_options: list[str] | None = None
    _ready_lock: threading.Lock | None = None
    _socket: str | None = None
    _keeper: subprocess.Popen | None = None
    _keeper_pid: str | None = None

    def share(self, sharing: shared.Sharing, ssh_options: list[str]) -> "SharedConnection":
        self.sharing, self.ssh_options, self._ready_lock = sharing, ssh_options, threading.Lock()
        return self

    @property
    def destination(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if int(self.port or 22) == 22 else f"ssh://{self.user}@{host}:{self.port}"

    socket_path = property(lambda self: self.sharing.socket(self.user, self.host, int(self.port or 22)))

    def socket(self) -> str:
        """This host's master socket, the master opened here if it is not up (or its socket is stale)."""
        with self._ready_lock:
            path = self.socket_path
            if self._socket is None or not shared.alive(path):
                shared.open_master(path, destination=self.destination, ssh_options=self.ssh_options,
                                   idle=self.sharing.idle, timeout=self.connect_timeout or 10)
                self._socket = path
        return path

    def open(self) -> None:
        """Make sure the host's master is up (a handshake up front, as Paramiko's ``open`` does), with a
        session of this connection's own on it: it keeps the master from going idle while this
        connection is in use, and its end tells that the link was lost (``lost_session``)."""
        self.socket()
        self.session_pid()

    def lost(self) -> str | None:
        """Why this connection's own session ended under it, or None (none started, or it lives)."""
        keeper = self._keeper
        if keeper is None:
            return None
        if keeper.poll() is None:
            if shared.alive(self.socket_path):
                return None
            try:  # the master is gone: its sessions' ssh processes end a moment later
                keeper.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                pass
        return "connection closed by the host"

    def sftp(self):
        """SFTP over a Paramiko connection of its own (opened now): OpenSSH's master does not serve it."""
        super().open()
        return super().sftp()

    def argv(self, command: str) -> list[str]:
        """The ssh command line of ``command`` over this host's master."""
        return shared.client(self.socket(), destination=self.destination, ssh_options=self.ssh_options,
                             command=command)

    def session_pid(self) -> str:
        """The PID of a process on the host that lives exactly as long as this connection (see
        ``session_pid``): a ``cat`` of this session's stdin, started on first use."""
        with self._ready_lock:
            if self._keeper_pid is not None:
                return self._keeper_pid
        keeper = subprocess.Popen(self.argv(f"echo $$; exec bash -c 'exec -a {SESSION_KEEPER} cat >/dev/null'"),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        ready, _, _ = select.select([keeper.stdout], [], [], max(self.connect_timeout or 10, 10))
        line = keeper.stdout.readline().decode(errors="replace").strip() if ready else ""
        if not line.isdigit():
            keeper.kill(), keeper.wait()
            raise SessionLost()
        with self._ready_lock:
            self._keeper, self._keeper_pid = keeper, line
        return line

    def close(self) -> None:
        keeper, self._keeper, self._keeper_pid = self._keeper, None, None
        if keeper is not None:
            keeper.stdin.close()  # the session's stdin ends: its cat, and so the session, ends
            try:
                keeper.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                keeper.kill(), keeper.wait()
            keeper.stdout.close()
        super().close()

    def run(self, command: str, **kwargs) -> Result:
        unknown = set(kwargs) - {"warn", "timeout", "hide", "in_stream"}
        if unknown:
            raise TypeError(f"SharedConnection.run: unsupported arguments {sorted(unknown)}")
        result = run_result(self, command, timeout=kwargs.get("timeout"), guard=False)
        if result.exited != 0 and not kwargs.get("warn", self.config.run.warn):
            raise UnexpectedExit(result)
        return result


#: The name a shared connection's session process has on the host, beside sshd's for Paramiko's.
SESSION_KEEPER = "cloister-session"
#: A ``case`` pattern matching the command line of a session process (``session_pid``) of either kind.
SESSION_PATTERN = f"sshd*|{SESSION_KEEPER}*"


def session_pid(cxn: Connection) -> str:
    """A shell word for the PID of a host process that lives while ``cxn``'s session does: what a run
    lock or a run's follower records. Over Paramiko that is the connection's sshd process (``$PPID`` of
    any command); a shared master outlives the invocation, so there a keeper process stands for it."""
    return cxn.session_pid() if isinstance(cxn, SharedConnection) else '"$PPID"'


def lost_session(cxn: Connection) -> str | None:
    """Why ``cxn``'s SSH session died under it, or None if it lives or was closed on purpose (a closed
    client drops its transport; a dead one keeps it, inactive, until the next use reconnects)."""
    if isinstance(cxn, SharedConnection):
        return cxn.lost()
    transport = cxn.client.get_transport()
    if transport is None or transport.is_active():
        return None
    reason = transport.saved_exception
    if reason is None or isinstance(reason, EOFError):
        return "connection closed by the host"
    return str(reason).strip() or reason.__class__.__name__


def guarded(command: str) -> str:
    """``command`` in its own process group, killed with its group when the SSH session goes away.

    The session's stdin stays open while the session lives (nothing is ever sent on it), so a watcher
    reading it sees EOF exactly when the session ends (Ctrl-C, a lost link) and then kills the whole
    group, children included; SIGHUP or TERM to the wrapper does the same. A command that ends on its
    own stops the watcher first, and its exit status is the wrapper's. setsid in a background job of a
    shell without job control does not fork, so ``$!`` is the group's id.
    """
    kill = (f"kill -TERM -$pid 2>/dev/null; for i in $(seq {KILL_GRACE * 20}); do kill -0 -$pid 2>/dev/null || break; "
            "sleep 0.05; done; kill -KILL -$pid 2>/dev/null")  # the grace lasts only while the group lives
    return ("exec 3<&0; "   # background jobs get /dev/null as stdin: keep the session's on fd 3
            f'setsid "${{SHELL:-/bin/sh}}" -c {shlex.quote(command)} </dev/null 3<&- & pid=$!; '
            # Past EOF the watcher ignores TERM: the wrapper's "kill $watch" must not cut its KILL short.
            f"{{ cat <&3 >/dev/null 2>&1; trap '' TERM; {kill}; }} >/dev/null 2>&1 & watch=$!; "
            f"exec 3<&-; trap '{kill}; exit 129' HUP TERM; "
            "wait $pid; rc=$?; kill $watch 2>/dev/null; exit $rc")


def execute(cxn: Connection, command: str, *, stdout: Callable[[bytes], None], stderr: Callable[[bytes], None],
            timeout: float | None = None, stop: threading.Event | None = None, guard: bool = True,
            data: bytes | None = None) -> int:
    """Run ``command`` (under ``guarded``) and pass its output to ``stdout``/``stderr`` as it arrives.

    Returns the exit status. Raises CommandTimedOut after ``timeout`` seconds, Stopped once ``stop``
    is set and SessionLost when the connection drops; each closes the channel, which ends the command.
    ``data`` is sent on the command's stdin, which is then closed (never with ``guard``: the guard
    reads stdin's end as the session's).
    """
    if stop is not None and stop.is_set():
        raise Stopped()
    remote_command = guarded(command) if guard else command
    if isinstance(cxn, SharedConnection):
        return _execute_shared(cxn, remote_command, stdout=stdout, stderr=stderr, timeout=timeout, stop=stop,
                               data=data)
    cxn.open()
    channel = cxn.client.get_transport().open_session(timeout=cxn.connect_timeout)
    deadline = None if timeout is None else time.monotonic() + timeout

    def check() -> None:
        if stop is not None and stop.is_set():
            raise Stopped()
        if deadline is not None and time.monotonic() > deadline:
            raise CommandTimedOut(None, timeout)

    try:
        channel.exec_command(remote_command)
        if data is not None:
            channel.sendall(data)
            channel.shutdown_write()
        # A closed channel may still hold output that arrived before the close: drain it first.
        while channel.recv_ready() or channel.recv_stderr_ready() or not (channel.eof_received or channel.closed):
            check()
            # One chunk of each per round: a fast producer must not keep this loop from its checks.
            if channel.recv_ready():
                stdout(channel.recv(CHUNK))
            if channel.recv_stderr_ready():
                stderr(channel.recv_stderr(CHUNK))
            if not (channel.recv_ready() or channel.recv_stderr_ready()):
                select.select([channel], [], [], POLL)
        # The exit status may follow the end of the output.
        while not channel.status_event.wait(POLL):
            check()
        if channel.exit_status < 0:
            raise SessionLost()
        return channel.exit_status
    finally:
        channel.close()


def _execute_shared(cxn: SharedConnection, command: str, *, stdout: Callable[[bytes], None],
                    stderr: Callable[[bytes], None], timeout: float | None, stop: threading.Event | None,
                    data: bytes | None) -> int:
    """``execute`` as an ssh process over the host's master. Its stdin stays open until the command
    ends (the guard's session); closing it and ending the process closes the session, so a stop or a
    timeout ends the remote command as a closed channel does. ssh's own failures (exit 255, the master
    gone) are raised as the errors Paramiko would have raised."""
    deadline = None if timeout is None else time.monotonic() + timeout
    proc = subprocess.Popen(cxn.argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    tail = bytearray()
    try:
        if data is not None:
            proc.stdin.write(data)
            proc.stdin.close()
        streams = {proc.stdout.fileno(): stdout, proc.stderr.fileno(): stderr}
        while streams:
            if stop is not None and stop.is_set():
                raise Stopped()
            if deadline is not None and time.monotonic() > deadline:
                raise CommandTimedOut(None, timeout)
            ready, _, _ = select.select(list(streams), [], [], POLL)
            for fd in ready:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    del streams[fd]
                    continue
                if fd == proc.stderr.fileno():
                    tail[:] = (tail + chunk)[-TAIL:]
                streams[fd](chunk)
        code = proc.wait()
    finally:
        if not proc.stdin.closed:
            proc.stdin.close()
        if proc.poll() is None:
            proc.kill(), proc.wait()
        proc.stdout.close(), proc.stderr.close()
    # 255 is also what a remote command may exit with (rsync whose own ssh failed): it is ssh's failure
    # only when the master is gone with it.
    if code == 255 and not shared.alive(cxn.socket_path):
        raise shared.failure(tail.decode(errors="replace")) or SessionLost()
    return code


def run_result(cxn: Connection, command: str, *, timeout: float | None = None,
               stop: threading.Event | None = None, guard: bool = True) -> Result:
    """``execute`` with the output kept in memory, as the Invoke Result that ``cxn.run`` would give."""
    out, err = bytearray(), bytearray()
    code = execute(cxn, command, stdout=out.extend, stderr=err.extend, timeout=timeout, stop=stop, guard=guard)
    return Result(stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"), command=command,
                  exited=code, hide=("stdout", "stderr"))


@dataclass(frozen=True)
class Captured:
    """One output stream of one host: its text when small and printable, else the file that holds it."""

    size: int
    digest: str              # sha256 of the bytes: equal outputs fold without comparing files
    text: str = ""           # all of it; when it is in ``path``, its last lines (for error messages)
    path: str | None = None
    binary: bool = False     # not text a terminal can show as it is: saved to ``path``, ``text`` empty


# Colour (SGR) sequences are text; any other control character (the rest of the escape sequences a
# terminal obeys, NUL, backspace) or bytes that are not UTF-8 make an output binary.
_COLOUR = re.compile(rb"\x1b\[[0-9;]*m")
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


# In streamed lines: every control character but a colour sequence's ESC, shown as \xNN instead of obeyed.
_UNPRINTABLE = re.compile(r"\x1b(?!\[[0-9;]*m)|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]")


def is_binary(data: bytes) -> bool:
    """Whether ``data`` would do anything but show as text on a terminal."""
    plain = _COLOUR.sub(b"", bytes(data))
    if _CONTROL.search(plain):
        return True
    try:
        plain.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


class Capture:
    """A sink for one stream: bytes in memory up to ``limit``, then everything in ``path`` (and the
    last TAIL bytes in memory). The file is created only when the output outgrows the limit, so small
    outputs leave nothing behind.
    """

    def __init__(self, path: Path, *, limit: int = SPILL_LIMIT):
        self.path = path
        self.limit = limit
        self.buffer = bytearray()
        self.file = None
        self.size = 0
        self.hash = hashlib.sha256()
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.size += len(data)
            self.hash.update(data)
            if self.file is None and len(self.buffer) + len(data) > self.limit:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "wb")
                self.file.write(self.buffer)
            if self.file is not None:
                self.file.write(data)
                self.buffer = self.buffer[-TAIL:] + data[-TAIL:]
            else:
                self.buffer += data

    def result(self) -> Captured:
        """What was captured so far; closes the file, so call it once, after the last write. A small
        output that is not printable text goes to the file too."""
        with self.lock:
            if self.file is None and is_binary(self.buffer):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_bytes(self.buffer)
                return Captured(size=self.size, digest=self.hash.hexdigest(), path=str(self.path), binary=True)
            text = self.buffer.decode(errors="replace")
            if self.file is None:
                return Captured(size=self.size, digest=self.hash.hexdigest(), text=text)
            self.file.close()
            # The tail starts at a line: the first one in it is most likely cut.
            return Captured(size=self.size, digest=self.hash.hexdigest(), text=text[-TAIL:].partition("\n")[2],
                            path=str(self.path))


class LineWriter:
    """A sink that writes whole lines of one host's output as ``[label] line`` to a text stream, control
    characters (but colours) escaped so that no output can drive the terminal.

    Lines are cut from each chunk as it comes (no re-scan of what came before), so a long output
    streams at the rate it arrives; a line still open at the end is written by ``flush``.
    """

    def __init__(self, label: str, sink, lock: threading.Lock):
        self.prefix = f"[{label}] "
        self.sink = sink
        self.lock = lock
        self.partial: list[str] = []
        self.decode = _decoder()

    def write(self, data: bytes) -> None:
        text = self.decode(data, False)
        cut = text.rfind("\n")
        if cut < 0:
            self.partial.append(text)
            return
        block = "".join(self.partial) + text[:cut]
        self.partial = [text[cut + 1:]]
        self._emit(block)

    def flush(self) -> None:
        rest = "".join(self.partial) + self.decode(b"", True)
        self.partial = []
        if rest:
            self._emit(rest)

    def _emit(self, block: str) -> None:
        block = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", block)
        with self.lock:
            self.sink.write(self.prefix + block.replace("\n", "\n" + self.prefix) + "\n")
            self.sink.flush()


def _decoder() -> Callable[[bytes, bool], str]:
    """UTF-8 decoding across chunk boundaries (a character may be split between two chunks)."""
    import codecs

    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode
