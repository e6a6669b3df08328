"""The shell scripts a run sends to its hosts, each beside the parser of what it prints.

Every value that reaches a remote shell (benchmark names, run ids, directories, env values) is
shell-quoted here; the paths come from ``cloister.layout``.
"""

from __future__ import annotations

import re
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path

from .experiments import HOSTFILE, Benchmark, remote_dir
from ..layout import RUNS_DIR, run_dir
from .prepare import NodeFacts, directory_lines, node_lines, process_lines
from .record import Proc

LOG_MARKER = "\x1eLOG "  # an ASCII record separator, then the log's name: no log line starts with it
READY_TAIL_BYTES = 65536
TAIL_BYTES = 8192  # of a log, read when its process failed to start: the excerpt shown is picked from it
RUN_MARK = "CLOISTER_RUN_ID"  # in the environment of every process of a run
KILL_POLL = 0.05  # seconds between looks at whether the TERMed processes have ended
EXTRA_LOGS_DIR = "logs"  # where a benchmark's ``logs`` paths are copied in the run's folder


def log_name(role: str, index: int | None, run_id: str) -> str:
    """A process's log file name, as Clamor's released scripts name them (``master_{run}.log``)."""
    return f"{role}{'' if index is None else index}_{run_id}.log"


def _source_vars(bench: Benchmark) -> list[str]:
    if not bench.vars_file:
        return []
    vars_file = shlex.quote(bench.vars_file)
    return [f"if [ -f {vars_file} ]; then . ./{vars_file}; fi"]


def _exports(bench: Benchmark) -> list[str]:
    return [f"export {key}={shlex.quote(value)}" for key, value in bench.env.items()]


def local_command(bench: Benchmark, command: str, *, public: str) -> str:
    """``command`` for this machine's shell as a node would run it: in the benchmark's directory, with
    the per-process preparation, its vars file sourced, its env exported (no sysctl: that is the node's)."""
    prep = bench.prepare
    steps = [f"cd {remote_dir(bench.dir)}"]
    if prep.stack_limit:
        steps.append(f"{{ ulimit -s {prep.stack_limit} || true; }}")
    if prep.public_hostname:
        steps.append(f"export CLOISTER_PUBLIC_HOSTNAME={shlex.quote(public)}")
    inner = " && ".join([*steps, *process_lines(prep), *_exports(bench), *_source_vars(bench), command])
    if not prep.disable_aslr:
        return inner
    # One shell under setarch: the command and everything it starts inherit the personality.
    return (f'if setarch "$(uname -m)" -R true 2>/dev/null; then set -- setarch "$(uname -m)" -R; else set --; fi; '
            f'"$@" bash -c {shlex.quote(inner)}')


def build_command(bench: Benchmark) -> str:
    """The benchmark's build command in its directory, with its env exported and its vars file sourced."""
    return " && ".join([f"cd {remote_dir(bench.dir)}", *_exports(bench), *_source_vars(bench), bench.build])


# -- start ------------------------------------------------------------------

def start_script(bench: Benchmark, run_id: str, procs: list[Proc], *, node: NodeFacts,
                 hostfile: str | None = None) -> str:
    """One shell command that prepares one host and starts ``procs`` detached on it, recording their PIDs.

    Prints the preparation report (``parse_report``), then ``PID ROLE INDEX PORT`` per process
    (``parse_pids``); each PID leads its own process group, ``{role}{i}.started`` holds the host's time
    (epoch seconds) when the process starts, ``{role}{i}.exit`` and ``{role}{i}.ended`` its exit code and
    time when it ends by itself. ``hostfile`` is written to the run's folder first (the master's ``{hostfile}``).
    """
    # The env first: the vars file may build on it (a PATH from a variable the benchmark sets).
    prelude = process_lines(bench.prepare) + _exports(bench) + _source_vars(bench)
    lines = [
        "set -e",
        f"R={run_dir(bench.name, run_id)}",
        'mkdir -p "$R"',
        *([f'printf %s {shlex.quote(hostfile)} > "$R"/{HOSTFILE}'] if hostfile is not None else []),
        *node_lines(bench.prepare, node),
        f"cd {remote_dir(bench.dir)} || {{ echo {shlex.quote(f'benchmark directory {bench.dir} not found')} >&2; "
        "exit 66; }",
        *directory_lines(bench),
        # Every process of the run carries its id, also those a launcher starts elsewhere when it passes the
        # variable on (mpirun -x CLOISTER_RUN_ID): the sampler counts them and the run's end stops them.
        f"export {RUN_MARK}={shlex.quote(run_id)} CLOISTER_RUN_DIR=\"$R\"",
    ]
    for proc in procs:
        # The host's own clock says when the process started and ended: a run finished later by someone
        # else (exp.attach) times it from these, not from when it was finished.
        at = f'"$CLOISTER_RUN_DIR"/{proc.key}'
        body = "; ".join([*prelude, f"date +%s.%N > {at}.started", proc.command,
                          f"echo $? > {at}.exit", f"date +%s.%N > {at}.ended"])
        logfile = log_name(proc.role, proc.index, run_id)
        # A subshell with redirected stdio: the session closes at once and the process survives it;
        # setsid makes the PID lead a process group that kill -- -PID ends. "$@" is the preparation's
        # prefix (setarch -R), which execs setsid in place, so $! is still the group leader.
        lines.append(f'("$@" setsid bash -c {shlex.quote(body)} > "$R"/{logfile} 2>&1 < /dev/null & '
                     f'echo "$! {proc.role} {"-" if proc.index is None else proc.index} '
                     f'{"-" if proc.port is None else proc.port}" >> "$R"/pids)')
    # A host may start no process of its own (the workers of a program that mpirun starts).
    lines.append('touch "$R"/pids; cat "$R"/pids')
    return "\n".join(lines)


def marked_pids(run_id: str) -> str:
    """Shell: the PIDs of this user's processes that carry the run's mark in their environment, one a line."""
    return (f"grep -lzxF {shlex.quote(f'{RUN_MARK}={run_id}')} /proc/[0-9]*/environ 2>/dev/null | "
            "cut -d/ -f3")


def parse_pids(text: str) -> dict[str, int]:
    """``start_script``'s output: process key (``worker3``, ``manager``) -> PID."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit():
            out[parts[1] + ("" if parts[2] == "-" else parts[2])] = int(parts[0])
    return out


# -- probe ------------------------------------------------------------------

def probe_script(bench: Benchmark, run_id: str, *, with_logs: bool, tails: bool = False) -> str:
    """What one host's part of a run is doing: every process of the run's process groups, the sockets
    they hold, the exit codes written so far and every listening TCP socket; with ``with_logs`` (and a
    ready log pattern) the tail of every worker log; with ``tails`` the end of the log of every recorded
    process (one that ended, one that runs but is not ready)."""
    lines = [
        f"R={run_dir(bench.name, run_id)}", 'cd "$R" 2>/dev/null || exit 0',
        "P=\" $(awk '{print $1}' pids 2>/dev/null | tr '\\n' ' ')\"",
        # "PID STATE GROUP" for every process of the run's groups, from one read of each /proc/PID/stat
        # (no procps needed): a process that ends meanwhile is missing, never half-read. The state and
        # the group follow the last ')' of the name.
        "M=$(cat /proc/[0-9]*/stat 2>/dev/null | "
        "awk -v P=\"$P\" '{p = $1; sub(/.*\\) /, \"\"); if (index(P, \" \" $3 \" \")) print p, $1, $3}')",
        'printf "%s\\n" "$M"',
        # The sockets each group's processes hold: a port is ready only when the run's own process holds it.
        'echo "--sock"',
        'printf "%s\\n" "$M" | while read -r q s g; do [ -n "$g" ] && ls -l /proc/$q/fd 2>/dev/null | '
        'sed -n "s/.*socket:\\[\\([0-9]*\\)\\]$/$g \\1/p"; done',
        'echo "--exit"', 'for f in *.exit; do [ -f "$f" ] && echo "$f $(cat "$f")"; done',
        'echo "--net"', "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk '$4==\"0A\"{print $2, $10}'",
    ]
    # The log sections come last because a log line may look like a marker or a section.
    marker = LOG_MARKER.replace("\x1e", "\\036")  # printf's octal escape for the separator
    if with_logs and bench.ready_log:
        # The tails come back and are matched here with Python's re, the syntax experiments.yaml is
        # validated with.
        lines.append(f'for f in worker*_*.log; do [ -f "$f" ] && printf "{marker}%s\\n" "$f" '
                     f'&& tail -c {READY_TAIL_BYTES} "$f" && echo; done')
    if tails:
        log = '"$r$i"' + shlex.quote(f"_{run_id}.log")
        lines.append('while read -r p r i o; do [ "$r" = sampler ] && continue; '
                     f'[ "$i" = - ] && i=; printf "{marker}%s\\n" {log}; tail -c {TAIL_BYTES} {log} 2>/dev/null; '
                     'echo; done < pids')
    # No worker log on this host is not an error of the probe.
    lines.append("true")
    return "\n".join(lines)


@dataclass
class Probe:
    """What ``probe_script`` saw on one host."""

    alive: set[int]  # the recorded PIDs (each leads its process group) still running
    exits: dict[str, int]  # process key -> the exit code it wrote
    listening: dict[int, tuple[str, int]]  # socket inode -> address, for every listening TCP socket
    sockets: dict[int, set[int]]  # process group -> inodes of the sockets its processes hold
    logs: dict[str, str]  # log name -> its tail

    def listens(self, group: int) -> set[tuple[str, int]]:
        """The addresses on which a process of ``group`` listens."""
        return {self.listening[inode] for inode in self.sockets.get(group, ()) if inode in self.listening}


def _decode_address(hex_addr: str) -> tuple[str, int] | None:
    """``/proc/net/tcp``'s ``0100007F:1F90`` as ``("127.0.0.1", 8080)``; None if it is not one."""
    ip_hex, sep, port_hex = hex_addr.partition(":")
    try:
        port = int(port_hex, 16)
        raw = bytes.fromhex(ip_hex)
    except ValueError:
        return None
    if not sep or len(raw) not in (4, 16):
        return None
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), port
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    ip = socket.inet_ntop(socket.AF_INET6, words)
    return (ip[7:] if ip.startswith("::ffff:") else ip), port


def parse_probe(text: str) -> Probe:
    """``probe_script``'s output; lines it does not understand are skipped."""
    section = "ps"
    probe = Probe(alive=set(), exits={}, listening={}, sockets={}, logs={})
    text, *logs = text.split(LOG_MARKER)
    for chunk in logs:
        name, _, body = chunk.partition("\n")
        probe.logs[name] = body
    for line in text.splitlines():
        if line.startswith("--"):
            section = line[2:]
            continue
        parts = line.split()
        numbers = [int(part) for part in parts if part.isdigit()]
        if section == "ps" and len(parts) == 3 and len(numbers) == 2:
            if parts[1] != "Z" and numbers[0] == numbers[1]:
                probe.alive.add(numbers[0])
        elif section == "sock" and len(parts) == 2 and len(numbers) == 2:
            probe.sockets.setdefault(numbers[0], set()).add(numbers[1])
        elif section == "exit" and len(parts) == 2 and parts[1].lstrip("-").isdigit():
            probe.exits[parts[0].removesuffix(".exit")] = int(parts[1])
        elif section == "net" and len(parts) == 2 and parts[1].isdigit() and (address := _decode_address(parts[0])):
            probe.listening[int(parts[1])] = address
    return probe


# -- kill -------------------------------------------------------------------

def _grace_steps(bench: Benchmark) -> int:
    return max(1, round(bench.stop_grace / KILL_POLL))


def kill_script(bench: Benchmark, run_id: str) -> str:
    """End every process group this run recorded on a host, and every process that carries the run's mark:
    TERM, up to the benchmark's ``stop_grace`` for them to end (servers remove their own lock files), then KILL.

    Prints ``killed N``, the groups and marked processes that were still alive.
    """
    return "\n".join([
        f"R={run_dir(bench.name, run_id)}", 'cd "$R" 2>/dev/null || exit 0', "P=$(awk '{print $1}' pids 2>/dev/null)",
        f"M=$({marked_pids(run_id)})",
        'n=0; for p in $P; do kill -0 -- -$p 2>/dev/null && n=$((n+1)); kill -TERM -- -$p 2>/dev/null; done',
        'for q in $M; do kill -TERM $q 2>/dev/null && n=$((n+1)); done',
        f'for i in $(seq {_grace_steps(bench)}); do a=; for p in $P; do kill -0 -- -$p 2>/dev/null && a=1; done; '
        f'for q in $M; do kill -0 $q 2>/dev/null && a=1; done; [ -z "$a" ] && break; sleep {KILL_POLL}; done',
        'for p in $P; do kill -KILL -- -$p 2>/dev/null; done',
        f'for q in $M $({marked_pids(run_id)}); do kill -KILL $q 2>/dev/null; done', 'echo "killed $n"',
    ])


def extra_logs_script(bench: Benchmark, run_id: str) -> str:
    """Copy the benchmark's ``logs`` paths on a host into the run's folder there (``logs/NAME``), so they come
    back with the run; a path the host does not have is skipped."""
    lines = [f"R={run_dir(bench.name, run_id)}", 'cd "$R" 2>/dev/null || exit 0']
    for path in bench.logs:
        name = shlex.quote(re.sub(r"[^A-Za-z0-9_.-]", "_", path.removeprefix("~/").strip("/")))
        source = remote_dir(path)
        lines.append(f'if [ -e {source} ]; then mkdir -p {EXTRA_LOGS_DIR} && rm -rf -- {EXTRA_LOGS_DIR}/{name} && '
                     f'cp -RL -- {source} {EXTRA_LOGS_DIR}/{name} 2>/dev/null; fi')
    lines.append("true")
    return "\n".join(lines)


def killall_script(bench: Benchmark, *, max_procs: int = 64) -> str:
    """Kill a benchmark's processes on one host: recorded process groups, then its binaries
    running in its directory, then listeners on its ports that are its binaries (TERM, up to the
    benchmark's ``stop_grace``, then KILL); print how many."""
    runs = f'"$HOME"/{RUNS_DIR}/{shlex.quote(bench.name)}'
    names = sorted({Path(bench.binary).name, Path(bench.worker_binary).name})
    pattern = "|".join(f"*{shlex.quote(n)}*" for n in names)
    ports = [bench.manager_port, bench.master_port, *range(bench.worker_base, bench.worker_base + max_procs)]
    port_re = "|".join(f":{p}" for p in ports)
    return "\n".join([
        "K=; G=; me=$$",
        'cmd() { tr "\\0" " " < /proc/$1/cmdline 2>/dev/null; }',
        f'owned() {{ case "$(cmd $1)" in {pattern}) return 0;; esac; return 1; }}',
        # A recorded PID is trusted only while it is still a wrapper cloister started (PIDs get reused).
        "started() { tr '\\0' '\\n' < /proc/$1/environ 2>/dev/null | grep '^CLOISTER_RUN_DIR=' | "
        f"grep -qF {shlex.quote(f'/{RUNS_DIR}/{bench.name}/')}; }}",
        f'for f in {runs}/*/pids; do [ -f "$f" ] || continue; '
        'for p in $(awk \'{print $1}\' "$f"); do kill -0 -- -$p 2>/dev/null && started $p && '
        '{ kill -TERM -- -$p 2>/dev/null; G="$G $p"; }; done; done',
        f"D=$(cd {remote_dir(bench.dir)} 2>/dev/null && pwd -P)",
        'in_dir() { [ -n "$D" ] && [ "$(readlink /proc/$1/cwd 2>/dev/null)" = "$D" ]; }',
        'for p in /proc/[0-9]*; do q=${p#/proc/}; [ "$q" = "$me" ] && continue; '
        'in_dir $q && owned $q && { kill -TERM $q 2>/dev/null && K="$K $q"; }; done',
        'if command -v ss >/dev/null; then '
        f"for q in $(ss -ltnpH 2>/dev/null | grep -E '({port_re}) ' | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u); do "
        'owned $q && { kill -TERM $q 2>/dev/null && K="$K $q"; }; done; fi',
        # The grace: what was TERMed may end by itself, cleaning up after itself.
        f'for i in $(seq {_grace_steps(bench)}); do a=; for p in $G; do kill -0 -- -$p 2>/dev/null && a=1; done; '
        f'for q in $K; do kill -0 $q 2>/dev/null && a=1; done; [ -z "$a" ] && break; sleep {KILL_POLL}; done',
        'for p in $G; do kill -KILL -- -$p 2>/dev/null; done; for q in $K; do kill -KILL $q 2>/dev/null; done',
        "for i in $(seq 40); do a=; "
        'for p in /proc/[0-9]*; do q=${p#/proc/}; [ "$q" = "$me" ] && continue; '
        'in_dir $q && owned $q && { a=1; kill -KILL $q 2>/dev/null; }; done; '
        '[ -z "$a" ] && break; sleep 0.05; done',
        'echo $G $K | tr " " "\\n" | sort -u | grep -c . || true',
    ])


def parse_killed(text: str) -> int:
    """``killall_script``'s output: how many processes it signalled."""
    return int((text.strip().splitlines() or ["0"])[-1])
