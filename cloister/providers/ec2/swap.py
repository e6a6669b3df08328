"""Swap for the master: an extra EBS volume in the launch request itself (so it can never outlive its
instance), made swap and enabled by the user data at every boot.

The boot script picks the one disk of exactly the volume's size that has no partition table, no file
system and no mount: the root disk always has a partition table, so it can never be taken.
"""

from __future__ import annotations

from typing import Any

DEVICE = "/dev/sdf"
GIB = 1 << 30

BOOT = """\
( for d in $(lsblk -dnbo NAME,SIZE,TYPE | awk -v s={size} '$2 == s && $3 == "disk" {{print "/dev/" $1}}'); do
    [ "$(lsblk -no NAME "$d" | wc -l)" -eq 1 ] || continue
    [ -z "$(blkid -p -o value -s PTTYPE "$d" 2>/dev/null)" ] || continue
    grep -q "^$d " /proc/mounts && continue
    kind=$(blkid -p -o value -s TYPE "$d" 2>/dev/null || true)
    [ -n "$kind" ] || {{ mkswap -L cloister-swap "$d" >/dev/null && kind=swap; }}
    [ "$kind" = swap ] && {{ swapon "$d" 2>/dev/null || grep -q "^$d " /proc/swaps; exit; }}
  done )
"""


def volume(gigabytes: int) -> dict[str, Any]:
    return {"DeviceName": DEVICE,
            "Ebs": {"VolumeSize": gigabytes, "VolumeType": "gp3", "DeleteOnTermination": True}}


def boot_command(gigabytes: int) -> str:
    return BOOT.format(size=gigabytes * GIB)
