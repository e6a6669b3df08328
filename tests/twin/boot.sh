#!/bin/sh
# Boots one twin instance (see machine.py). Each stage execs the next, so that the machine is exactly
# one process tree below `unshare`, whose PID the twin holds:
#   host DIR NAME PIDNS CGROUP_PROCS...  join the instance's cgroups, then enter new namespaces
#   init DIR NAME PIDNS                  PID 1 of the new PID namespace: build the instance's root
#   exec DIR PIDNS                       refuse unless isolated, then become systemd
# DIR holds upper/ work/ lower/ root/; stdout is the instance's console (a pty the twin reads).
set -eu

# Capabilities (name:bit) PID 1 and everything below it lose. Without sys_boot, systemd answers
# poweroff by exiting ("Exiting container."); the others would reach the shared kernel: modules, the
# clock, the network configuration (one network namespace), raw I/O, the kernel log, suspend, LSMs.
DROPPED="sys_boot:22 sys_module:16 sys_time:25 net_admin:12 sys_rawio:17 syslog:34 wake_alarm:35
block_suspend:36 mac_admin:33 mac_override:32"

refuse() {
    echo "twin: refusing to boot: $1" >&2
    exit 1
}

host() {
    dir=$1 name=$2 pidns=$3
    shift 3
    for procs in "$@"; do
        echo "$$" > "$procs"
    done
    # --kill-child: if the twin kills unshare, the whole PID namespace goes with it.
    exec unshare --mount --pid --fork --uts --ipc --cgroup --kill-child=SIGKILL \
        /bin/sh "$0" init "$dir" "$name" "$pidns"
}

overlay() {
    dir=$1
    # The previous boot's overlay may take a moment to be released after its namespace died.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        mount -t overlay twin-root -o "lowerdir=$dir/lower,upperdir=$dir/upper,workdir=$dir/work" \
            "$dir/root" && return 0
        sleep 0.2
    done
    refuse "cannot mount the overlay root"
}

devices() {
    root=$1
    # A private /dev: the machine's devices (its disks, its console) stay out of reach.
    mount -t tmpfs -o mode=755,size=1m,nosuid twin-dev "$root/dev"
    mknod -m 666 "$root/dev/null" c 1 3
    mknod -m 666 "$root/dev/zero" c 1 5
    mknod -m 666 "$root/dev/full" c 1 7
    mknod -m 666 "$root/dev/random" c 1 8
    mknod -m 666 "$root/dev/urandom" c 1 9
    mknod -m 666 "$root/dev/tty" c 5 0
    mkdir "$root/dev/pts" "$root/dev/shm"
    mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 twin-devpts "$root/dev/pts"
    ln -s pts/ptmx "$root/dev/ptmx"
    ln -s /proc/self/fd "$root/dev/fd"
    ln -s /proc/self/fd/0 "$root/dev/stdin"
    ln -s /proc/self/fd/1 "$root/dev/stdout"
    ln -s /proc/self/fd/2 "$root/dev/stderr"
    # The console is the pty on our stdout and stderr, so the twin records what EC2 would show as
    # console output (fd 2: inside $(...) fd 1 is a pipe).
    touch "$root/dev/console"
    mount --bind "$(readlink /proc/self/fd/2)" "$root/dev/console"
}

init() {
    dir=$1 name=$2 pidns=$3 root=$1/root
    mount --make-rprivate /
    mount --bind / "$dir/lower"
    overlay "$dir"
    devices "$root"
    mount -t proc -o nosuid,nodev,noexec twin-proc "$root/proc"
    # Read-only, so that sysctls and sysrq inside cannot reach the machine's kernel settings.
    for path in "$root/proc/sys" "$root/proc/sysrq-trigger"; do
        [ -e "$path" ] || continue
        mount --bind "$path" "$path"
        mount -o remount,bind,ro "$path"
    done
    mount -t sysfs -o ro,nosuid,nodev,noexec twin-sys "$root/sys"
    hostname "$name"
    drop=
    for cap in $DROPPED; do
        drop="$drop,-${cap%:*}"
    done
    exec setpriv --bounding-set "${drop#,}" /bin/sh "$0" exec "$dir" "$pidns"
}

boot() {
    dir=$1 pidns=$2
    [ "$$" = 1 ] || refuse "not PID 1 of a new PID namespace"
    [ "$(readlink /proc/self/ns/pid)" != "$pidns" ] || refuse "still in the machine's PID namespace"
    bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
    for cap in $DROPPED; do
        [ $(( 0x$bounding >> ${cap#*:} & 1 )) = 0 ] || refuse "capability ${cap%:*} is still in the bounding set"
    done
    exec env -i container=lxc /usr/sbin/chroot "$dir/root" /lib/systemd/systemd --system
}

stage=$1
shift
case "$stage" in
    host) host "$@" ;;
    init) init "$@" ;;
    exec) boot "$@" ;;
    *) refuse "unknown stage $stage" ;;
esac
