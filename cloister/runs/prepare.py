"""A benchmark's process preparation as shell, and the report each node sends back for run.json.

``node_lines`` run once in a host's start script, before its processes start; what they set (the
stack limit, the no-ASLR personality given to each process, CLOISTER_PUBLIC_HOSTNAME) is inherited
by the processes. ``process_lines`` run in each process's own shell, in the old scripts' order. Every
item prints one report line: ``prep<TAB>ITEM<TAB>done|skipped|failed<TAB>DETAIL``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .experiments import Benchmark, remote_dir
from .preparation import Preparation

REPORT_TAG = "prep"
STATUSES = ("done", "skipped", "failed")
# ClusterInfo.extra: true when the nodes run on this machine's kernel (the local provider), so a
# sysctl there would change this machine.
SHARED_KERNEL = "shared_kernel"
OFF = "off in experiments.yaml"
IMDS = "http://169.254.169.254/latest"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
SAME_KERNEL = "the node runs on this machine's kernel; never changed there"


@dataclass(frozen=True, kw_only=True)
class NodeFacts:
    """What cloister knows about a node that its preparation needs."""

    public: str  # the public address recorded in servers/
    shared_kernel: bool  # the provider says its nodes run on this machine's kernel
    boot_id: str = ""  # this machine's kernel boot id: a node reporting the same one runs on this kernel


def this_boot_id() -> str:
    """The boot id of the kernel cloister runs on ("" where there is none to read)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def q(text: str) -> str:
    return shlex.quote(text)


def say(item: str, status: str, detail: str) -> str:
    """Shell that prints one report line; ``detail`` is a shell word (quoted, or with "$expansions")."""
    return f"printf '{REPORT_TAG}\\t%s\\t%s\\t%s\\n' {q(item)} {status} {detail}"


def _sysctl(prep: Preparation, node: NodeFacts) -> list[str]:
    if not prep.sysctl:
        return [say("sysctl", "skipped", q("none declared"))]
    if node.shared_kernel:
        return [say(f"sysctl {key}={value}", "skipped", q(SAME_KERNEL)) for key, value in prep.sysctl.items()]
    # A node whose provider does not say so may still share this kernel (a static host that is this
    # machine, a container): the kernel's boot id tells, whatever the provider.
    lines = ["B=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || true)"]
    same = f'[ "$B" = {q(node.boot_id)} ]' if node.boot_id else "false"
    for key, value in prep.sysctl.items():
        setting = f"{key}={value}"
        item = f"sysctl {setting}"
        applied = say(item, "done", q(f"sudo sysctl -w {setting}"))
        refused = say(item, "failed", '"$E"')
        lines.append(f"if {same}; then {say(item, 'skipped', q(SAME_KERNEL))}; "
                     f"elif E=$(sudo -n sysctl -w {q(setting)} 2>&1 < /dev/null); then {applied}; "
                     f"else E=$(printf '%s\\n' \"$E\" | tail -n 1); {refused}; fi")
    return lines


def _aslr(prep: Preparation) -> list[str]:
    # The positional parameters become the prefix of every process's command line ("$@" setsid ...).
    if not prep.disable_aslr:
        return ["set --", say("disable_aslr", "skipped", q(OFF))]
    return ['M=$(uname -m)',
            'if setarch "$M" -R true 2>/dev/null; then set -- setarch "$M" -R; '
            + say("disable_aslr", "done", "'setarch '\"$M\"' -R on every process'")
            + '; else E=$(setarch "$M" -R true 2>&1 | tail -n 1); set --; '
            + say("disable_aslr", "failed", "'setarch '\"$M\"' -R: '\"$E\"") + "; fi"]


def _stack(prep: Preparation) -> list[str]:
    if prep.stack_limit is None:
        return [say("stack_limit", "skipped", q(OFF))]
    command = f"ulimit -s {prep.stack_limit}"
    refused = q(f"{command} refused; the hard limit is ") + '"$(ulimit -H -s)"'
    return [f"if {command} 2>/dev/null; then {say('stack_limit', 'done', q(command))}; "
            f"else {say('stack_limit', 'failed', refused)}; fi"]


def _local_vars(prep: Preparation) -> list[str]:
    if not prep.local_vars:
        return [say("local_vars", "skipped", q(OFF))]
    sourced = say("local_vars", "done", q(f"{prep.local_vars} sourced by every process"))
    absent = say("local_vars", "skipped", q(f"{prep.local_vars} not present"))
    return [f"if [ -f {remote_dir(prep.local_vars)} ]; then {sourced}; else {absent}; fi"]


def _public_hostname(prep: Preparation, node: NodeFacts) -> list[str]:
    if not prep.public_hostname:
        return [say("public_hostname", "skipped", q(OFF))]
    recorded = "the address recorded in servers/"
    if prep.public_hostname == "recorded":
        return [f"H={q(node.public)}; S={q(recorded)}"]
    token = "X-aws-ec2-metadata-token"
    # IMDSv2: a token first; a node elsewhere answers nothing within the 1 s limits.
    return [f"H=$(T=$(curl -sf -m 1 -X PUT -H '{token}-ttl-seconds: 60' {IMDS}/api/token 2>/dev/null) && "
            f"curl -sf -m 1 -H \"{token}: $T\" {IMDS}/meta-data/public-hostname 2>/dev/null) || H=",
            f"if [ -n \"$H\" ]; then S='from IMDSv2'; else H={q(node.public)}; "
            f"S={q('IMDS did not answer; ' + recorded)}; fi"]


def node_lines(prep: Preparation, node: NodeFacts) -> list[str]:
    """The node's part of the preparation, in the old scripts' order; each item reports itself."""
    lines = [*_sysctl(prep, node), *_aslr(prep), *_stack(prep), *_local_vars(prep), *_public_hostname(prep, node)]
    if prep.public_hostname:
        lines += ['export CLOISTER_PUBLIC_HOSTNAME="$H"',
                  say("public_hostname", "done", "'PUBLIC_HOSTNAME='\"$H\"' ('\"$S\"')'")]
    return lines


def directory_lines(bench: Benchmark) -> list[str]:
    """Report the benchmark directory (the start script is in it by now) and its vars file."""
    lines = [say("dir", "done", q(f"cd {bench.dir}"))]
    if not bench.vars_file:
        return [*lines, say("vars_file", "skipped", q(OFF))]
    sourced = say("vars_file", "done", q(f"{bench.vars_file} sourced by every process"))
    absent = say("vars_file", "skipped", q(f"{bench.vars_file} not in {bench.dir}"))
    return [*lines, f"if [ -f {q(bench.vars_file)} ]; then {sourced}; else {absent}; fi"]


def process_lines(prep: Preparation) -> list[str]:
    """What each process's own shell does first: ~/.local_vars, then PUBLIC_HOSTNAME (the old order)."""
    lines = []
    if prep.local_vars:
        path = remote_dir(prep.local_vars)
        lines.append(f"if [ -f {path} ]; then . {path}; fi")
    if prep.public_hostname:
        lines.append('export PUBLIC_HOSTNAME="$CLOISTER_PUBLIC_HOSTNAME"')
    return lines


def parse_report(text: str) -> list[dict[str, str]]:
    """The report lines in a start script's output, as run.json lists them."""
    steps = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0] == REPORT_TAG and parts[2] in STATUSES:
            steps.append({"item": parts[1], "status": parts[2], "detail": parts[3]})
    return steps
