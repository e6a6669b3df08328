"""An instance's disk: the upper layer of an overlay whose lower layer is this machine's ``/``.

Files are written into the upper directory while the overlay is not mounted (before a boot), which
overlayfs allows. ``base_layer`` makes this machine look like a fresh AMI (no login user yet, the
machine's own services masked, cloud-init configured as on a cloud image); ``instance_layer`` is
what EC2 hands one instance (its NoCloud seed, hostname, machine id); ``boot_layer`` what may change
between boots (sshd's addresses: the public one changes on stop/start, as on EC2).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path

LOGIN_USER = "ubuntu"

# Units that cannot work in a container or would reach beyond it (devices, kernel modules, sysctls,
# clocks, consoles, kernel file systems) or only cost time in a test (timers, apt, scrubbing).
MASKED = (
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-modules-load.service",
    "kmod-static-nodes.service", "systemd-sysctl.service", "systemd-remount-fs.service",
    "systemd-timesyncd.service", "hwclock.service", "systemd-pstore.service", "systemd-binfmt.service",
    "getty.target", "getty@.service", "console-getty.service", "serial-getty@.service",
    "networking.service", "apt-daily.timer", "apt-daily.service", "apt-daily-upgrade.timer",
    "apt-daily-upgrade.service", "unattended-upgrades.service", "man-db.timer", "man-db.service",
    "fstrim.timer", "fstrim.service", "e2scrub_all.timer", "e2scrub_reap.service", "dpkg-db-backup.timer",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "proc-sys-fs-binfmt_misc.automount",
    "systemd-journald-audit.socket", "cloud-init-hotplugd.socket",
)
# What this machine enables that an instance needs; everything else it enables is masked.
KEEP_ENABLED = {"ssh.service", "cloud-init-local.service", "cloud-init.service", "cloud-config.service",
                "cloud-final.service"}

# Directories the instance starts without (opaque in the upper layer): a fresh AMI has no homes, no
# temporary files and no cloud-init state of this machine.
HIDDEN = ("/home", "/root", "/tmp", "/var/lib/cloud")

CLOUD_CFG = f"""\
# Written by the cloister EC2 twin: what the image carries (as on an Ubuntu AMI), not user data.
datasource_list: [ NoCloud, None ]
network: {{config: disabled}}
locale: C.UTF-8
ssh_genkeytypes: [rsa, ecdsa, ed25519]
system_info:
  default_user:
    name: {LOGIN_USER}
    lock_passwd: true
    gecos: Ubuntu
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
"""

# The journal stays in memory: less disk and CPU per boot; the console keeps the boot's story.
JOURNALD_CONF = "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n"


def _mkdirs(upper: Path, path: str) -> Path:
    """``upper/path`` with each new directory's mode and owner copied from this machine's (a merged
    directory takes the upper one's, so a 0755 /tmp would break the instance's /tmp)."""
    target = upper
    for part in Path(path).relative_to("/").parts:
        target = target / part
        if not target.exists():
            target.mkdir(mode=0o755)
            with contextlib.suppress(FileNotFoundError):  # new on the instance: root's 0755 it is
                like = os.stat(Path("/") / target.relative_to(upper))
                os.chmod(target, like.st_mode & 0o7777)
                os.chown(target, like.st_uid, like.st_gid)
    return target


def _write(upper: Path, path: str, text: str | bytes, mode: int = 0o644) -> None:
    target = _mkdirs(upper, os.path.dirname(path)) / os.path.basename(path)
    target.unlink(missing_ok=True)
    target.write_bytes(text.encode() if isinstance(text, str) else text)
    os.chmod(target, mode)


def _without_login_user(path: str) -> str:
    """An account database (passwd, group, shadow, gshadow) of this machine without the login user,
    which cloud-init must create as on a fresh AMI (the local provider may have made one here)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == LOGIN_USER:
            continue
        if path.endswith(("group", "gshadow")) and len(fields) > 3:  # the members field
            fields[-1] = ",".join(m for m in fields[-1].split(",") if m and m != LOGIN_USER)
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


def _enabled_here() -> set[str]:
    wants = Path("/etc/systemd/system")
    return {unit.name for d in wants.glob("*.wants") for unit in d.iterdir()}


def base_layer(upper: Path, hide: tuple[str, ...] = ()) -> None:
    """Turn this machine into the image of a fresh instance; ``hide`` adds directories to leave out."""
    for path in HIDDEN + tuple(p for p in hide if not any(Path(p).is_relative_to(h) for h in HIDDEN)):
        os.setxattr(_mkdirs(upper, path), "trusted.overlay.opaque", b"y")
    units = _mkdirs(upper, "/etc/systemd/system")
    for unit in sorted(set(MASKED) | (_enabled_here() - KEEP_ENABLED)):
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    shadow_gid = os.stat("/etc/shadow").st_gid
    for name, mode in (("passwd", 0o644), ("group", 0o644), ("shadow", 0o640), ("gshadow", 0o640)):
        _write(upper, f"/etc/{name}", _without_login_user(f"/etc/{name}"), mode)
        if mode == 0o640:
            os.chown(upper / "etc" / name, 0, shadow_gid)
    _write(upper, "/etc/cloud/cloud.cfg.d/90_cloister_twin.cfg", CLOUD_CFG)
    _write(upper, "/etc/systemd/journald.conf.d/90-cloister-twin.conf", JOURNALD_CONF)


def instance_layer(upper: Path, *, instance_id: str, hostname: str, address: str, user_data: bytes,
                   public_keys: list[str]) -> None:
    """What EC2 gives one instance: NoCloud seed (user data byte for byte), hostname, machine id."""
    meta = [f"instance-id: {instance_id}", f"local-hostname: {hostname}", "public-keys:"]
    meta += [f"  - {json.dumps(key.strip())}" for key in public_keys]  # a JSON string is YAML, quoted
    seed = "/var/lib/cloud/seed/nocloud"
    _write(upper, f"{seed}/meta-data", "\n".join(meta) + "\n", 0o600)
    _write(upper, f"{seed}/user-data", user_data, 0o600)
    _write(upper, "/etc/hostname", hostname + "\n")
    # The VPC resolver would answer for the instance's own name; here /etc/hosts does.
    _write(upper, "/etc/hosts", f"127.0.0.1 localhost\n{address} {hostname}\n::1 localhost ip6-localhost\n")
    _write(upper, "/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)


def boot_layer(upper: Path, addresses: list[str]) -> None:
    """sshd listens on the instance's addresses only (sshd_config includes sshd_config.d/*.conf)."""
    listen = "".join(f"ListenAddress {address}\n" for address in addresses)
    _write(upper, "/etc/ssh/sshd_config.d/90-cloister-twin.conf", listen)
