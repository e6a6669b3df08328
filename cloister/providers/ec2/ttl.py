"""The TTL: every node powers itself off at the cluster's expiry, even if the laptop that launched it is gone.

The user data arms a transient systemd timer from cloud-init's ``bootcmd``, on every boot, so a
stopped and restarted node keeps its expiry. ``bootcmd`` runs in cloud-init's init stage, which is
ordered before sysinit.target: a timer with systemd's default dependencies would wait for
sysinit.target, and systemd-run for the timer, so boot would never finish. ``DefaultDependencies=no``
and ``--no-block`` keep the timer out of boot's way; ``AccuracySec=1s`` because systemd's default
accuracy is a minute. After the SSH wait, ``CHECK_SCRIPT`` proves the timer is armed on every node.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from ...transport import hosts
from ...errors import HostsFailed
from ...poll import Backoff
from ...cluster.servers import ClusterInfo, Node
from ...settings import Settings

# cloud-init's final stage can take a while after sshd answers (packages, the user's own runcmd).
ARM_TIMEOUT = 300.0

UNIT = "cloister-ttl"
# The expiry lives on the node's disk, so a stop/start keeps it and `cluster.extend` can move it
# (user data cannot change while an instance runs). The file names its instance (cloud-init sets
# INSTANCE_ID for bootcmd): an image made from a node carries the file, and a new instance must
# not inherit that node's expiry.
EXPIRY_FILE = "/var/lib/cloister/ttl-expires"

# stderr is redirected before the file is opened: at first boot the file is missing, and the shell's
# "cannot open" would otherwise land on the console (and in a hung boot's last words).
BOOT = """\
read -r owner _ 2>/dev/null < {expiry_file} || owner=
[ "$owner" = "$INSTANCE_ID" ] || {{ mkdir -p {expiry_dir}; echo "$INSTANCE_ID {epoch}" > {expiry_file}; }}
{arm}"""

# Arms the timer from the expiry file; the same lines run at boot and in `cluster.extend`.
ARM = """\
left=$(( $(cut -d' ' -f2 {expiry_file}) - $(date +%s) ))
[ "$left" -gt 60 ] || left=60
systemctl stop {unit}.timer 2>/dev/null || true
systemd-run --no-block --unit={unit} --timer-property=DefaultDependencies=no \\
  --timer-property=AccuracySec=1s --on-active="$left" /bin/systemctl poweroff
"""

# One line: "armed", "booting" (cloud-init has not finished), or "missing <cloud-init status>".
CHECK_SCRIPT = f"""\
if systemctl is-active --quiet {UNIT}.timer 2>/dev/null; then echo armed; exit 0; fi
if ! command -v cloud-init >/dev/null 2>&1; then echo "missing no-cloud-init"; exit 0; fi
state=$(cloud-init status 2>/dev/null | sed -n 's/^status: //p')
case "$state" in running|not*run*|"") echo booting ;; *) echo "missing $state" ;; esac
"""


def boot_command(*, epoch: int) -> str:
    """The bootcmd entry that keeps the node's expiry and arms its timer, on every boot."""
    arm = ARM.format(expiry_file=EXPIRY_FILE, unit=UNIT)
    return BOOT.format(epoch=int(epoch), expiry_file=EXPIRY_FILE, expiry_dir=EXPIRY_FILE.rsplit("/", 1)[0],
                       arm=arm)


def extend_script(epoch: int) -> str:
    """Move the node's expiry to ``epoch`` and re-arm its timer (as root: the timer is the system's)."""
    # Not --no-block here: the timer must be armed when the script returns.
    arm = ARM.format(expiry_file=EXPIRY_FILE, unit=UNIT).replace("--no-block ", "")
    move = f"read -r owner _ < {EXPIRY_FILE} && echo \"$owner {int(epoch)}\" > {EXPIRY_FILE}\n"
    return f"sudo -n sh -c {shlex.quote(move + arm)} && systemctl is-active --quiet {UNIT}.timer"


@dataclass(frozen=True)
class TimerState:
    armed: bool
    pending: bool  # cloud-init is still running: ask again
    reason: str = ""


def parse_check(output: str) -> TimerState:
    """Read CHECK_SCRIPT's line; anything unexpected is a missing timer with that text as the reason."""
    words = output.strip().split(None, 1)
    if words[:1] == ["armed"]:
        return TimerState(armed=True, pending=False)
    if words[:1] == ["booting"]:
        return TimerState(armed=False, pending=True)
    if words[:1] == ["missing"] and len(words) == 2 and words[1] == "no-cloud-init":
        return TimerState(armed=False, pending=False,
                          reason=f"no TTL timer ({UNIT}.timer): the image has no cloud-init to run the user data")
    status = words[1] if words[:1] == ["missing"] and len(words) == 2 else (output.strip() or "no answer")
    return TimerState(armed=False, pending=False,
                      reason=f"no TTL timer ({UNIT}.timer) after cloud-init finished (status: {status})")


def wait_armed(info: ClusterInfo, nodes: list[Node], *, settings: Settings, timeout: float = ARM_TIMEOUT) -> None:
    """Return once every node's TTL timer is armed; raise HostsFailed naming each node without one."""
    pending = list(nodes)
    failed: dict[str, str] = {}
    backoff = Backoff(timeout, initial=0.2, maximum=5.0)
    while pending:
        with hosts.group(info, pending, concurrency=settings.concurrency,
                         connect_timeout=settings.connect_timeout) as grp:
            result = hosts.call(grp, lambda cxn: cxn.run(CHECK_SCRIPT, timeout=30))
        errors = hosts.failures(result)
        still = []
        for cxn, value in result.items():
            node = next(n for n in pending if n.host == cxn.host)
            if cxn.host in errors:
                failed[cxn.host] = f"cannot check the TTL timer: {errors[cxn.host]}"
                continue
            state = parse_check(value.stdout)
            if state.pending:
                still.append(node)
            elif not state.armed:
                failed[cxn.host] = state.reason
        pending = still
        if pending and not backoff.wait():
            failed.update({n.host: f"cloud-init still running after {timeout:.0f}s; the TTL timer is not armed"
                           for n in pending})
            break
    if failed:
        raise HostsFailed(failed, total=len(nodes), what="TTL not armed")


def rearm(info: ClusterInfo, nodes: list[Node], *, settings: Settings, epoch: int) -> None:
    """Move every node's expiry to ``epoch`` and re-arm its timer; raise HostsFailed naming each node that failed."""
    with hosts.group(info, nodes, concurrency=settings.concurrency, connect_timeout=settings.connect_timeout) as grp:
        hosts.check(hosts.call(grp, lambda cxn: cxn.run(extend_script(epoch), timeout=60)), what="TTL not moved")
