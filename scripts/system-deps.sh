#!/usr/bin/env bash
# Make sure the system tools the local provider needs are present (Debian/Ubuntu).
# Usage: scripts/system-deps.sh [extra apt packages...]
set -euo pipefail
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v ps >/dev/null 2>&1 || need+=(procps)
# ip and tc: each local host's own network (bridge, veth, shaping).
for tool in ss ip tc; do command -v $tool >/dev/null 2>&1 || { need+=(iproute2); break; }; done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "cloister: missing system packages: ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cloister: missing system packages: ${need[*]}; install them with your package manager" >&2
    exit 1
fi
echo "cloister: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
