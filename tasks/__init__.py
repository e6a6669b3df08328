"""cloister's Invoke tasks: ``inv --list`` shows them all."""

from invoke import Collection

from cloister.config import DEFAULTS
from cloister.hosts import raise_nofile_limit

from . import ami, cluster, exp
from ._common import install_error_hook

# 128-host clusters: every connection, rsync and ssh needs descriptors; take what the hard limit allows.
raise_nofile_limit()
install_error_hook()

# Settings that are not cluster-config keys; mirrored in invoke.yaml.
SETTINGS = {
    "config": "configs/local.json",
    "servers_dir": "servers",
    "state_dir": ".cloister",
    "concurrency": 64,
    "connect_timeout": 10.0,
    "ssh_timeout": 600.0,
    "redeploy_concurrency": 8,
    "experiments": "experiments.yaml",
    "runs_dir": "runs",
}

ns = Collection(cluster.ns, ami.ns, exp.ns)
ns.configure({"cloister": {**DEFAULTS, **SETTINGS}})
