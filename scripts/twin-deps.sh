#!/usr/bin/env bash
# System packages the EC2 twin (tests/twin) needs on Debian/Ubuntu, on top of the local provider's:
# systemd as each instance's PID 1, Debian's cloud-init, OpenSSH and sudo inside (as on an Ubuntu AMI),
# setpriv/unshare from util-linux, rsync to record images.
# Usage: scripts/twin-deps.sh
set -euo pipefail
exec "$(dirname "$0")/system-deps.sh" systemd cloud-init openssh-server openssh-client sudo util-linux rsync
