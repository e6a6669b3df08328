"""Shared fixtures: a real local cluster (sshd hosts in namespaces) and an `inv` runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloister.cluster import lifecycle as lib
from cloister.settings import Settings
from cloister.config import ClusterConfig, load_config
from cloister.cluster.servers import ClusterInfo

REPO = Path(__file__).resolve().parent.parent
INV = str(Path(sys.executable).parent / "inv")
# Whole EC2 twin lives that other tests cover in part keep CI under its time budget: opt-in.
slow = pytest.mark.skipif(os.environ.get("CLOISTER_SLOW") != "1",
                          reason="slow EC2 twin test; set CLOISTER_SLOW=1 to run it")


@dataclass
class ClusterEnv:
    """A running local cluster and everything needed to talk to it."""

    root: Path
    config_path: Path
    cfg: ClusterConfig
    settings: Settings
    info: ClusterInfo

    def env(self) -> dict[str, str]:
        """Environment for an `inv` subprocess aimed at this cluster."""
        env = dict(os.environ)
        env.update(INVOKE_CLOISTER_SERVERS_DIR=str(self.settings.servers_dir),
                   INVOKE_CLOISTER_STATE_DIR=str(self.settings.state_dir),
                   INVOKE_CLOISTER_CONFIG=str(self.config_path))
        return env

    def inv(self, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return run_inv(*args, env=self.env(), timeout=timeout, **kwargs)


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def one_line_error(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def run_inv(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    """Run `inv ARGS` from the repository root as a user would."""
    return subprocess.run([INV, *args], cwd=cwd, env=env if env is not None else dict(os.environ),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def make_cluster(root: Path, name: str, *, nworkers: int = 4, dev: bool = True, **keys) -> ClusterEnv:
    """Launch a local cluster under ``root`` (state, servers/ and config all inside it); ``keys``: more config."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / f"{name}.json"
    config_path.write_text(json.dumps({
        "cluster_name": name, "provider": "local", "nworkers": nworkers, "user": "ubuntu",
        "image": str(REPO / "examples" / "image"), "dev_host": dev, "ttl": 0, **keys,
    }))
    cfg = load_config(config_path)
    settings = Settings(servers_dir=str(root / "servers"), state_dir=str(root / "state"),
                        connect_timeout=5.0, ssh_timeout=60.0)
    try:
        info = lib.launch(cfg, settings=settings).info
    except BaseException:
        lib.destroy(cfg, settings=settings)
        raise
    return ClusterEnv(root=root, config_path=config_path, cfg=cfg, settings=settings, info=info)


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory) -> ClusterEnv:
    """One shared cluster for the session: a master, 4 workers and a dev host. Do not break it."""
    env = make_cluster(tmp_path_factory.mktemp("shared"), f"t{os.getpid() % 100000}")
    try:
        yield env
    finally:
        lib.destroy(env.cfg, settings=env.settings)


@pytest.fixture
def own_cluster(tmp_path):
    """A factory for clusters a test may break; each is destroyed at the end of the test."""
    made: list[ClusterEnv] = []

    def factory(name: str, *, nworkers: int = 2, dev: bool = False, **keys) -> ClusterEnv:
        env = make_cluster(tmp_path / name, f"{name}-{os.getpid() % 100000}", nworkers=nworkers, dev=dev, **keys)
        made.append(env)
        return env

    try:
        yield factory
    finally:
        for env in made:
            lib.destroy(env.cfg, settings=env.settings)
