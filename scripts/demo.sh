#!/usr/bin/env bash
# The demo: a local cluster of real sshd hosts comes up, runs the sample
# benchmark (examples/dsum) end to end, shows its logs, and goes away.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
CONFIG=configs/local.json
trap 'inv cluster.destroy --config "$CONFIG" --yes' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
step inv cluster.launch --config "$CONFIG"
step inv cluster.status --config "$CONFIG"
step inv cluster.run --config "$CONFIG" "hostname; uptime"
step inv exp.run --config "$CONFIG" --benchmark dsum -k 4 -p 2
run_dir=$(ls -d runs/dsum/*/ | sort | tail -n 1)
printf '\n\033[1mEvery log of that run, from every host, in one place:\033[0m\n'
find "$run_dir" -type f | sort
printf '\n\033[1mThe master log:\033[0m\n'
cat "$run_dir"/*/master_*.log
