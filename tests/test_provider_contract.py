"""The provider interface is real: a provider defined here, registered here, runs through the public
functions and the `inv` tasks with no change to any file of cloister."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloister.cluster import lifecycle as lib
from cloister import providers
from cloister.config import PROVIDERS, load_config
from cloister.errors import ConfigError, ProviderError
from cloister.providers.base import ClusterRow, Launched, NodeStatus, Provider
from cloister.cluster.servers import ClusterInfo, Node, read_servers
from cloister.settings import Settings

from conftest import REPO

# The in-memory "cloud": cluster name -> its nodes.
CLOUD: dict[str, list[Node]] = {}


class FakeProvider(Provider):
    name = "fake"

    def launch(self, *, nworkers, confirm=None, progress=None) -> Launched:
        name = self.cfg.cluster_name
        created = name not in CLOUD
        if created:
            CLOUD[name] = [Node(role="master", id="m-0", host="127.0.0.1", name=f"{name}-master")] + [
                Node(role="worker", id=f"w-{i}", host="127.0.0.1", name=f"{name}-worker-{i}")
                for i in range(1, nworkers + 1)]
        info = ClusterInfo(provider=self.name, cluster_name=name, user=self.cfg.user, ssh_key="",
                           nodes=list(CLOUD[name]))
        return Launched(info=info, created=created)

    def rollback(self, cause, *, info, confirm=None, progress=None) -> None:
        CLOUD.pop(self.cfg.cluster_name, None)

    def destroy(self, *, confirm=None, progress=None) -> list[str]:
        gone = CLOUD.pop(self.cfg.cluster_name, [])
        return [f"fake: ended {len(gone)} nodes"]

    def status(self) -> list[NodeStatus]:
        return [NodeStatus(role=n.role, id=n.id, host=n.host, state="running", uptime_s=1.0)
                for n in CLOUD.get(self.cfg.cluster_name, [])]

    def list_clusters(self) -> list[ClusterRow]:
        return [ClusterRow(cluster=name, masters=1, workers=len(nodes) - 1, states=f"{len(nodes)} running")
                for name, nodes in sorted(CLOUD.items())]


@pytest.fixture
def fake(tmp_path):
    providers.register(FakeProvider)
    config = tmp_path / "fake.json"
    config.write_text(json.dumps({"cluster_name": "imaginary", "provider": "fake", "nworkers": 3}))
    settings = Settings(servers_dir=str(tmp_path / "servers"), state_dir=str(tmp_path / "state"))
    try:
        yield load_config(config, providers=providers.names()), settings, config
    finally:
        providers.REGISTRY.pop("fake", None)
        CLOUD.clear()


def test_a_registered_provider_runs_through_launch_status_and_destroy(fake):
    cfg, settings, _ = fake
    result = lib.launch(cfg, settings=settings, wait=False)
    assert result.created and len(result.info.workers) == 3
    assert read_servers(settings.servers_dir, cluster_name="imaginary").provider == "fake"
    assert lib.launch(cfg, settings=settings, wait=False).created is False
    assert [r.state for r in lib.status(cfg, settings=settings)] == ["running"] * 4
    assert [r.cluster for r in lib.list_clusters(cfg, settings=settings)] == ["imaginary"]
    assert lib.destroy(cfg, settings=settings) == ["fake: ended 4 nodes"]
    assert lib.status(cfg, settings=settings) == [] and not Path(settings.servers_dir, "cluster.json").exists()


def test_capabilities_it_lacks_are_one_clear_error(fake):
    cfg, settings, _ = fake
    for call, what in ((lambda: lib.stop(cfg, settings=settings), "stop a cluster"),
                       (lambda: lib.plan(cfg, settings=settings), "plan a launch"),
                       (lambda: lib.start(cfg, settings=settings), "start a stopped cluster")):
        with pytest.raises(ProviderError, match=f"provider fake cannot {what}"):
            call()


def test_inv_cluster_status_drives_it_in_process(fake, capsys):
    """`inv cluster.status` through Invoke's own Program, in this process, where the provider is registered."""
    from invoke import Program

    import tasks

    cfg, settings, config = fake
    lib.launch(cfg, settings=settings, wait=False)
    program = Program(namespace=tasks.ns, version="test")
    env = {"INVOKE_CLOISTER_SERVERS_DIR": settings.servers_dir, "INVOKE_CLOISTER_STATE_DIR": settings.state_dir}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        program.run(["inv", "cluster.status", "--config", str(config)], exit=False)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = capsys.readouterr().out
    assert "fake cluster 'imaginary'" in out and out.count("running") == 4 and "w-3" in out


def test_an_unregistered_provider_is_a_config_error(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"cluster_name": "x", "provider": "fake"}))
    with pytest.raises(ConfigError, match="key 'provider': expected one of ec2, local, static"):
        load_config(config, providers=providers.names())


def test_the_registry_knows_the_builtin_providers():
    assert providers.names() == PROVIDERS


def test_inv_list_stays_light():
    """Listing tasks imports neither boto3 nor matplotlib: providers import them only when used."""
    code = "import sys, tasks; print(sorted(m for m in ('boto3', 'matplotlib') if m in sys.modules))"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", (out.stdout, time.monotonic() - start)
