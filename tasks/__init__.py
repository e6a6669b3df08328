"""cloister's Invoke tasks: ``inv --list`` shows them all."""

from invoke import Collection

from cloister.config import DEFAULTS
from cloister.transport.hosts import raise_nofile_limit
from cloister.settings import defaults

from . import ami, cluster, exp
from ._common import install_error_hook

# 128-host clusters: every connection, rsync and ssh needs descriptors; take what the hard limit allows.
raise_nofile_limit()
install_error_hook()

ns = Collection(cluster.ns, ami.ns, exp.ns)
ns.configure({"cloister": {**DEFAULTS, **defaults()}})
