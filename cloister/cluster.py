"""Provider-independent cluster operations: launch, destroy, status, run, copy-dns."""

from __future__ import annotations

import json
import os
import shlex
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import hosts
from .config import ClusterConfig
from .errors import CloisterError, HostsFailed, ProviderError
from .local import STATE_FILE, LocalCluster, claimed_local_clusters
from .settings import Settings
from .servers import ClusterInfo, Node, clear_servers, read_servers, text_files, write_servers

if TYPE_CHECKING:
    from . import ec2

REMOTE_DIR = "cloister"
TIMEOUT_EXIT = 124  # what coreutils timeout exits with when it had to stop the command
REMOTE_TIMEOUT_GRACE = 5.0
STATIC_SSH_TIMEOUT = 20.0
REMOTE_KEY = ".ssh/cloister_key"
# What cloister keeps on every node under ~/cloister (copy-dns, experiment runs): the default
# redeploy_paths include cloister/, and a redeploy must neither overwrite nor --delete these.
NODE_STATE = (f"{REMOTE_DIR}/servers/", f"{REMOTE_DIR}/known_hosts", f"{REMOTE_DIR}/runs/")


@dataclass(frozen=True)
class LaunchResult:
    info: ClusterInfo
    created: bool
    replaced: str | None = None  # the other cluster servers/ described before this launch


def local_cluster(cfg: ClusterConfig, settings: Settings) -> LocalCluster:
    return LocalCluster(state_root=settings.state_dir, cluster=cfg.cluster_name, user=cfg.user)


def _static_info(cfg: ClusterConfig, settings: Settings) -> ClusterInfo:
    names = cfg.hosts or []
    nodes = [Node(role="master" if i == 0 else "worker", id=h, host=h, private=h, public=h, name=h)
             for i, h in enumerate(names)]
    if cfg.ami_instance_ip:
        nodes.append(Node(role="dev", id=cfg.ami_instance_ip, host=cfg.ami_instance_ip,
                          public=cfg.ami_instance_ip, name="dev"))
    known = Path(settings.state_dir).resolve() / "static" / cfg.cluster_name / "known_hosts"
    return ClusterInfo(provider="static", cluster_name=cfg.cluster_name, user=cfg.user,
                       ssh_key=cfg.ssh_key or "", nodes=nodes, known_hosts=str(known))


def launch(cfg: ClusterConfig, *, settings: Settings, nworkers: int | None = None, wait: bool = True,
           confirm: Callable[[str], bool] | None = None,
           progress: Callable[[str, int, int], None] | None = None) -> LaunchResult:
    """Bring the cluster up (or find it), wait for SSH, write servers/ and copy it to every node.

    ec2: after a failure that follows the creation of instances, ``confirm`` is asked whether to
    terminate them (None: terminate without asking); ``progress`` sees every poll of the instances.
    """
    count = cfg.nworkers if nworkers is None else nworkers
    if cfg.provider == "local":
        lc = local_cluster(cfg, settings)
        created = not lc.exists()
        image = cfg.image
        if created and cfg.ami == "latest":
            from . import images

            image = images.latest(cfg, state_dir=settings.state_dir).id
        info = lc.launch(nworkers=count, dev=cfg.dev_host, image=image)
    elif cfg.provider == "static":
        created = False
        info = _static_info(cfg, settings)
    else:
        from . import ec2

        result = ec2.launch(cfg, nworkers=count, settings=settings, confirm=confirm, progress=progress)
        info, created = result.info, result.created
    # A cluster named by --name is not the one its config names; record that, so later tasks
    # given the same config find it (tasks/_common.load) instead of refusing or missing it.
    info = replace(info, extra={**info.extra, "config": str(Path(cfg.source).resolve()),
                                "named_by_flag": "cluster_name" in cfg.from_flags})
    try:
        previous = read_servers(settings.servers_dir).cluster_name
    except CloisterError:
        previous = None
    try:
        write_servers(settings.servers_dir, info)
        if wait:
            _wait_and_copy(info, settings)
    except BaseException as exc:
        # A cluster this call created and could not finish (an error, Ctrl-C) must not be left behind.
        if created and cfg.provider == "ec2":
            from . import ec2

            ec2.abandon(cfg, exc, settings=settings, ids=[n.id for n in info.nodes], confirm=confirm,
                        progress=progress)
        elif created and cfg.provider == "local":
            local_cluster(cfg, settings).destroy()
            clear_own_servers(cfg, settings)
        raise
    return LaunchResult(info=info, created=created,
                        replaced=previous if previous not in (None, info.cluster_name) else None)


def _wait_and_copy(info: ClusterInfo, settings: Settings) -> None:
    # New instances need minutes to boot; machines that already exist (static) answer now or not at all.
    timeout = min(settings.ssh_timeout, STATIC_SSH_TIMEOUT) if info.provider == "static" else settings.ssh_timeout
    hosts.wait_ssh(info, info.nodes, timeout=timeout, concurrency=settings.concurrency,
                   probe_timeout=min(settings.connect_timeout, 5.0))
    copy_dns(info, settings=settings)


def current(cfg: ClusterConfig, *, settings: Settings) -> ClusterInfo:
    """The cluster recorded in servers/, refusing one that belongs to another config."""
    return read_servers(settings.servers_dir, cluster_name=cfg.cluster_name)


def destroy(cfg: ClusterConfig, *, settings: Settings, confirm: Callable[[str], bool] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Tear the cluster down; return what was done, one line each.

    ec2: ``confirm`` is asked with what will be terminated (None: do not ask).
    """
    messages: list[str] = []
    if cfg.provider == "local":
        lc = local_cluster(cfg, settings)
        if not lc.exists():
            messages.append(f"no local cluster '{cfg.cluster_name}' is running; nothing to destroy")
        else:
            running = lc.destroy()
            messages.append(f"destroyed local cluster '{cfg.cluster_name}' ({running} hosts were running)")
    elif cfg.provider == "static":
        messages.append(f"static cluster '{cfg.cluster_name}': machines are not ours to stop; forgot servers/")
    else:
        from . import ec2

        messages.extend(ec2.destroy(cfg, settings=settings, confirm=confirm, progress=progress))
    clear_own_servers(cfg, settings)
    return messages


def clear_own_servers(cfg: ClusterConfig, settings: Settings) -> None:
    """Clear servers/ if it describes this config's cluster; leave another cluster's alone."""
    try:
        read_servers(settings.servers_dir, cluster_name=cfg.cluster_name)
    except CloisterError:
        return
    clear_servers(settings.servers_dir)


def status(cfg: ClusterConfig, *, settings: Settings) -> list[dict[str, Any]]:
    """One row per node: role, id, host, state, uptime and what else the provider knows."""
    if cfg.provider == "local":
        lc = local_cluster(cfg, settings)
        if not lc.exists():
            return []
        return lc.status()
    if cfg.provider == "static":
        info = _static_info(cfg, settings)
        grp = hosts.group(info, info.nodes, concurrency=settings.concurrency,
                          connect_timeout=min(settings.connect_timeout, 5.0))
        result = hosts.call(grp, lambda cxn: cxn.run("cat /proc/uptime", timeout=10))
        grp.close()
        failed = hosts.failures(result)
        rows = []
        for cxn, value in result.items():
            node = next(n for n in info.nodes if n.host == cxn.host)
            up = None if cxn.host in failed else float(value.stdout.split()[0])
            rows.append({"role": node.role, "id": node.id, "host": node.host,
                         "state": "reachable" if up is not None else failed[cxn.host], "uptime_s": up})
        return rows
    from . import ec2

    return ec2.status(cfg, settings=settings)


def node_cluster_json(info: ClusterInfo) -> str:
    """cluster.json as seen from a node: the key and known_hosts at their copied places."""
    moved = replace(info, ssh_key="~/" + REMOTE_KEY, known_hosts=f"~/{REMOTE_DIR}/known_hosts")
    return json.dumps(moved.to_json(), indent=2) + "\n"


def copy_dns(info: ClusterInfo, *, settings: Settings) -> int:
    """Copy servers/*.txt, cluster.json and known_hosts to ~/cloister/ on every node, the key to the master."""
    files = {f"{REMOTE_DIR}/servers/{name}": (text.encode(), 0o644) for name, text in text_files(info).items()}
    files[f"{REMOTE_DIR}/servers/cluster.json"] = (node_cluster_json(info).encode(), 0o644)
    known = Path(os.path.expanduser(info.known_hosts)) if info.known_hosts else None
    if known and known.exists():
        files[f"{REMOTE_DIR}/known_hosts"] = (known.read_bytes(), 0o644)
    on_master = dict(files)
    if info.ssh_key:
        on_master[REMOTE_KEY] = (Path(os.path.expanduser(info.ssh_key)).read_bytes(), 0o600)
    master = info.master.host if info.master else None

    def push(cxn) -> None:
        cxn.run(f"mkdir -p {REMOTE_DIR}/servers .ssh && chmod 700 .ssh", warn=False, timeout=30)
        hosts.put_files(cxn, on_master if cxn.host == master else files)

    nodes = info.nodes
    grp = hosts.group(info, nodes, concurrency=settings.concurrency, connect_timeout=settings.connect_timeout)
    try:
        hosts.check(hosts.call(grp, push), what="copy-dns")
    finally:
        grp.close()
    return len(nodes)


@dataclass(frozen=True)
class HostOutput:
    host: str
    stdout: str
    stderr: str
    exited: int | None
    error: str | None = None


def run(info: ClusterInfo, command: str, *, nodes: list[Node], settings: Settings, stream: TextIO | None = None,
        timeout: float | None = None) -> list[HostOutput]:
    """Run ``command`` on ``nodes`` in parallel; with ``stream``, lines go there live as ``[host] line``.

    With ``timeout``, the remote side ends the command itself (coreutils ``timeout``) so nothing is
    left running on a host; the local timeout, a little later, only covers a host that stops answering.
    """
    lock = threading.Lock()
    if timeout is not None:
        command = f"timeout -k 2 {timeout:g} bash -c {shlex.quote(command)}"

    def one(cxn):
        kwargs: dict[str, Any] = {"timeout": None if timeout is None else timeout + REMOTE_TIMEOUT_GRACE}
        if stream is not None:
            out, err = hosts.PrefixWriter(cxn.host, stream, lock), hosts.PrefixWriter(cxn.host, stream, lock)
            kwargs.update(out_stream=out, err_stream=err)
            try:
                return cxn.run(command, **kwargs)
            finally:
                out.flush()
                err.flush()
        return cxn.run(command, **kwargs)

    grp = hosts.group(info, nodes, concurrency=settings.concurrency, connect_timeout=settings.connect_timeout)
    try:
        result = hosts.call(grp, one)
    finally:
        grp.close()
    outputs = []
    by_host = {cxn.host: value for cxn, value in result.items()}
    for node in nodes:
        value = by_host[node.host]
        if isinstance(value, BaseException):
            outputs.append(HostOutput(node.host, "", "", None, hosts.describe_error(value)))
        elif timeout is not None and value.exited == TIMEOUT_EXIT:
            outputs.append(HostOutput(node.host, value.stdout, value.stderr, value.exited,
                                      f"timed out after {timeout:g}s"))
        else:
            outputs.append(HostOutput(node.host, value.stdout, value.stderr, value.exited))
    return outputs


def fold(outputs: list[HostOutput]) -> list[tuple[list[str], HostOutput]]:
    """Group hosts whose output, exit code and error are identical (like ``clush -b``)."""
    groups: dict[tuple, list[str]] = {}
    first: dict[tuple, HostOutput] = {}
    for out in outputs:
        key = (out.stdout, out.stderr, out.exited, out.error)
        groups.setdefault(key, []).append(out.host)
        first.setdefault(key, out)
    return [(hosts_, first[key]) for key, hosts_ in groups.items()]


def run_failures(outputs: list[HostOutput]) -> HostsFailed | None:
    failed = {o.host: (o.error or f"exit {o.exited}") for o in outputs if o.error or o.exited != 0}
    return HostsFailed(failed, total=len(outputs)) if failed else None


def ensure_running(cfg: ClusterConfig, *, settings: Settings) -> ClusterInfo:
    """servers/ for this config's cluster; a clear error if the provider says it is gone."""
    info = current(cfg, settings=settings)
    if cfg.provider == "local":
        lc = local_cluster(cfg, settings)
        if not lc.exists():
            raise ProviderError(f"local cluster '{cfg.cluster_name}' is not running; run inv cluster.launch",
                                provider="local", cluster=cfg.cluster_name)
    return info


def _ec2_only(cfg: ClusterConfig, what: str) -> None:
    if cfg.provider != "ec2":
        raise ProviderError(f"{what} is for ec2 clusters; '{cfg.cluster_name}' uses the {cfg.provider} provider",
                            provider=cfg.provider, cluster=cfg.cluster_name)


def plan(cfg: ClusterConfig, *, nworkers: int | None = None) -> ec2.Plan:
    """What an ec2 launch would create, checked with EC2's DryRun; creates nothing."""
    _ec2_only(cfg, "--dry-run")
    from . import ec2

    return ec2.plan(cfg, nworkers=cfg.nworkers if nworkers is None else nworkers)


def stop(cfg: ClusterConfig, *, settings: Settings,
         progress: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Stop an EBS-backed ec2 cluster; its disks stay and cost little while stopped."""
    _ec2_only(cfg, "cluster.stop")
    from . import ec2

    return ec2.stop(cfg, settings=settings, progress=progress)


def start(cfg: ClusterConfig, *, settings: Settings, wait: bool = True,
          progress: Callable[[str, int, int], None] | None = None) -> ClusterInfo:
    """Start a stopped ec2 cluster; rewrite servers/ (addresses change) and, with ``wait``, copy-dns again."""
    _ec2_only(cfg, "cluster.start")
    from . import ec2

    info = ec2.start(cfg, settings=settings, progress=progress)
    write_servers(settings.servers_dir, info)
    if wait:
        _wait_and_copy(info, settings)
    return info


def list_clusters(cfg: ClusterConfig, *, settings: Settings) -> list[dict[str, Any]]:
    """Every cluster of the config's provider: ec2 clusters in its region, local clusters under state_dir."""
    if cfg.provider == "ec2":
        from . import ec2

        return ec2.list_clusters(cfg)
    if cfg.provider == "static":
        return [{"cluster": cfg.cluster_name, "masters": 1, "workers": len(cfg.hosts or []) - 1, "states": "static"}]
    rows = []
    # Every local cluster on this machine: this state_dir's, and any other whose addresses are claimed.
    found = {state.parent.resolve() for state in (Path(settings.state_dir) / "local").glob(f"*/{STATE_FILE}")}
    found |= {folder for folder in claimed_local_clusters() if (folder / STATE_FILE).exists()}
    for folder in sorted(found):
        lc = LocalCluster(state_root=folder.parent.parent, cluster=folder.name)
        nodes = lc.status()
        states = Counter(node["state"] for node in nodes)
        rows.append({"cluster": lc.cluster if folder.parent.parent == Path(settings.state_dir).resolve()
                     else f"{lc.cluster} ({folder})", "masters": sum(n["role"] == "master" for n in nodes),
                     "workers": sum(n["role"] == "worker" for n in nodes),
                     "states": ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
                     "age_s": max((n["uptime_s"] or 0 for n in nodes), default=None)})
    return rows
