#!/usr/bin/env bash
# The demo: a local cluster of real sshd hosts comes up, runs things, and goes away.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
CONFIG=configs/local.json
trap 'inv cluster.destroy --config "$CONFIG" --yes' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
step inv cluster.launch --config "$CONFIG"
step inv cluster.status --config "$CONFIG"
step inv cluster.run --config "$CONFIG" "hostname; uptime"
