"""cloister's Invoke tasks: ``inv --list`` shows them all."""

from invoke import Collection

from cloister.config import DEFAULTS

from . import cluster, exp

# Settings that are not cluster-config keys; mirrored in invoke.yaml.
SETTINGS = {
    "config": "configs/local.json",
    "servers_dir": "servers",
    "state_dir": ".cloister",
    "concurrency": 64,
    "connect_timeout": 10.0,
    "ssh_timeout": 600.0,
    "experiments": "experiments.yaml",
    "runs_dir": "runs",
}

ns = Collection(cluster.ns, exp.ns)
ns.configure({"cloister": {**DEFAULTS, **SETTINGS}})
