#!/usr/bin/env bash
# A Python environment that the hosts of a local cluster can run: a virtualenv outside every home and
# /tmp (local hosts see this machine's files but have homes and /tmp of their own), made from a Python
# that every user may execute (not one under /root, such as pyenv's), with Dask's distributed for
# examples/dask_sum. Usage: scripts/hosts-venv.sh [DIR]   (default: /opt/cloister/hosts-venv)
set -euo pipefail
dir=${1:-/opt/cloister/hosts-venv}
[ -x "$dir/bin/dask" ] && exit 0
python=
for candidate in /usr/bin/python3 /usr/local/bin/python3; do
    if [ -x "$candidate" ]; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
    echo "cloister: no system python3 (/usr/bin/python3) for the hosts' environment; apt-get install python3-venv" >&2
    exit 1
fi
"$python" -m venv "$dir"
"$dir/bin/pip" install -q distributed
chmod -R a+rX "$dir"
