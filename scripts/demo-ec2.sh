#!/usr/bin/env bash
# The EC2 rehearsal without an AWS account: the cluster life of "Use it on AWS" (launch, status, run,
# the sample benchmark with exp.run, destroy) against the EC2 twin on this machine (tests/twin: moto's
# EC2 API on 127.0.0.1, instances that really boot systemd, cloud-init and sshd on 127.0.2xx.y).
#
# Run as root from anywhere (make demo-ec2 installs what it needs first). TWIN_ARGS go to the twin, e.g.
# "--assume-role lab" (credentials from a profile that assumes a role, a new session per process) or
# "--reclaim-spot-after 60" (with spot workers in the config). Everything it talks to is in
# 127.0.0.0/8: the endpoint is the twin's, ssh_cidr is explicit (no address lookup), proxies are unset.
# On any exit (an error, Ctrl-C) the twin is stopped, which ends every instance it booted, and the
# demo's key and state (.cloister/demo-ec2/) are removed; the run's logs stay in runs/dsum/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
PYTHON="$PWD/.venv/bin/python"
CONFIG=configs/twin.json
KEY_NAME=demo-ec2               # the EC2 key pair the config names
WORK=.cloister/demo-ec2         # the key, the twin's env file and log, servers/ and state (ssh_key in $CONFIG)

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
die() { echo "demo-ec2: $*" >&2; exit 1; }

mkdir -p .cloister
exec 9>.cloister/demo-ec2.lock
flock -n 9 || die "another demo-ec2 is running in this checkout"

twin_pid=""
cleanup() {
    local code=$?
    trap '' INT TERM            # a second Ctrl-C must not cut the clean-up short
    if [ -n "$twin_pid" ] && kill -0 "$twin_pid" 2>/dev/null; then
        say "Stopping the EC2 twin (ends every instance it booted)"
        kill -TERM "$twin_pid" 2>/dev/null || true
        for _ in $(seq 120); do kill -0 "$twin_pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$twin_pid" 2>/dev/null; then
            echo "demo-ec2: the twin (PID $twin_pid) is still stopping; see $WORK/twin.log" >&2
            code=1
        else
            wait "$twin_pid" 2>/dev/null || true
        fi
    fi
    if [ -s "$WORK/twin.log" ]; then
        echo "demo-ec2: the twin said:" >&2
        tail -n 20 "$WORK/twin.log" >&2
    fi
    [ -n "$twin_pid" ] && kill -0 "$twin_pid" 2>/dev/null || rm -rf "$WORK"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" -eq 0 ] || die "the EC2 twin boots machines in namespaces: run as root"
# boto3 must reach the twin directly, never through a proxy elsewhere.
unset HTTP_PROXY HTTPS_PROXY ALL_PROXY http_proxy https_proxy all_proxy
rm -rf "$WORK"
mkdir -p "$WORK"
ssh-keygen -q -t ed25519 -N '' -C "$KEY_NAME" -f "$WORK/key"

say "Starting the EC2 twin on 127.0.0.1 (key pair $KEY_NAME imported)"
# Its own session: Ctrl-C reaches the demo's steps, and the clean-up above stops the twin in order.
(cd tests && exec setsid "$PYTHON" -m twin --import-key "$KEY_NAME" "../$WORK/key.pub" \
    --env-file "../$WORK/twin.env" ${TWIN_ARGS:-}) >/dev/null 2>"$WORK/twin.log" </dev/null &
twin_pid=$!
for _ in $(seq 600); do
    [ -f "$WORK/twin.env" ] && break
    kill -0 "$twin_pid" 2>/dev/null || die "the twin did not start"
    sleep 0.1
done
[ -f "$WORK/twin.env" ] || die "the twin did not serve within 60s"
# Only the twin's AWS settings: your own (keys, a profile) must not mix with them.
for var in $(compgen -e | grep '^AWS_' || true); do unset "$var"; done
# shellcheck disable=SC1091
. "$WORK/twin.env"
case "$AWS_ENDPOINT_URL_EC2" in
    http://127.*) echo "endpoint $AWS_ENDPOINT_URL_EC2 (AWS_* exports in $WORK/twin.env)" ;;
    *) die "the twin serves at $AWS_ENDPOINT_URL_EC2, not on loopback" ;;
esac
export INVOKE_CLOISTER_CONFIG="$CONFIG" INVOKE_CLOISTER_SERVERS_DIR="$WORK/servers" \
    INVOKE_CLOISTER_STATE_DIR="$WORK/state"

step inv cluster.launch --dry-run
step inv cluster.launch --yes
if grep -hv '^127\.' "$WORK"/servers/*.txt; then die "servers/ holds an address outside 127.0.0.0/8"; fi
step inv cluster.status
step inv cluster.run "hostname; uptime"
step inv cluster.put examples/dsum/ clamor/experiments/cpp/dsum/
step inv exp.run --benchmark dsum -k 2 -p 2
run_dir=$(ls -d runs/dsum/*/ | sort | tail -n 1)
say "Every log of that run, from every instance, in one place:"
find "$run_dir" -type f | sort
step inv cluster.destroy --yes
step inv cluster.list
