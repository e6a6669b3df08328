"""Boot watching: a node that never answers SSH is not waited for blind. Its console (GetConsoleOutput)
tells whether the boot still moves; a console that has not changed for ``stall`` seconds before sshd
answered is a boot that hangs (a cloud-init stage waiting forever, say), and the launch fails with the
console's last words instead of running out its whole SSH timeout.

A console also stops moving once a boot has ended well (on Nitro instances nothing is written after
the login prompt): one that shows cloud-init finished, or a login prompt, is a node that booted and
that SSH cannot reach, which is the network's or the key's doing, not the boot's.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .aws import error_code

# cloud-init's network tables say nothing about where a boot stopped.
NOISE = ("ci-info:",)
# What a console shows once boot has ended: cloud-init's last stage done, a login prompt, systemd's sum-up.
BOOTED = re.compile(r"Cloud-init v\. \S+ finished at|^\S+ login: *$|Startup finished in |"
                    r"Reached target .*Multi-User System", re.MULTILINE)
UNREACHABLE = ("booted (its console shows {evidence}), but SSH does not get in: check that ssh_cidr lets this "
               "machine in (a VPN or a proxy may show AWS another address), and that ssh_key is the private key "
               "of key pair {key_name}")


@dataclass
class BootWatch:
    """Console fingerprints of the nodes not answering yet, and since when each has not changed."""

    stall: float
    key_name: str = ""
    clock: Callable[[], float] = time.monotonic
    seen: dict[str, tuple[str, float]] = field(default_factory=dict)

    def stalled(self, client, instance_id: str) -> str | None:
        """Why this node's boot hangs, or None while its console still moves (or cannot be read)."""
        text = read_console(client, instance_id)
        if text is None:
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()
        now = self.clock()
        last, since = self.seen.get(instance_id, ("", now))
        if digest != last:
            self.seen[instance_id] = (digest, now)
            return None
        if now - since < self.stall:
            return None
        booted = BOOTED.search(text)
        if booted:
            return UNREACHABLE.format(evidence=repr(" ".join(booted.group(0).split())), key_name=self.key_name or "-")
        return f"boot hangs: no SSH, and its console has not moved for {now - since:.0f}s; last: {last_words(text)}"


def read_console(client, instance_id: str) -> str | None:
    """The latest console text, or None where EC2 cannot give it (older instance types, no output yet)."""
    try:
        answer = client.get_console_output(InstanceId=instance_id, Latest=True)
    except Exception as exc:  # noqa: BLE001 - without a console the wait stays the plain SSH wait
        if error_code(exc):
            return None
        raise
    # botocore decodes the base64 EC2 sends.
    return answer.get("Output") or None


def last_words(text: str, limit: int = 160) -> str:
    """The console's last meaningful line, shortened."""
    for line in reversed(text.splitlines()):
        words = line.split("] ", 1)[-1].strip()
        if words and not any(noise in words for noise in NOISE) and set(words) - set("+-| "):
            return words if len(words) <= limit else words[: limit - 1] + "…"
    return "(empty console)"
