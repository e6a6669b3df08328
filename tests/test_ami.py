"""ami.* with the local provider: directory images of the dev host's home, on real sshd hosts.

The EC2 side of ami.* (CreateImage, latest, prune with snapshots) is in test_ec2.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from cloister.cluster import lifecycle as lib
from cloister.cluster import images
from cloister.settings import Settings
from cloister.config import load_config
from cloister.errors import ProviderError
from cloister.providers.local.images import dev_home

from conftest import REPO, run_inv


def test_create_list_latest_launch_and_prune(own_cluster, tmp_path):
    env = own_cluster("img", nworkers=1, dev=True)
    prefix = env.cfg.cluster_name
    home = dev_home(env.cfg, state_dir=env.settings.state_dir)
    (home / "build-id").write_text("v1\n")

    made = env.inv("ami.create")
    assert made.returncode == 0, made.stderr
    (first,) = images.list_images(env.cfg, settings=env.settings)
    assert re.fullmatch(rf"{prefix}-\d{{8}}-\d{{4}}", first.name) and f"created {first.id}" in made.stdout
    assert Path(first.id).parent == Path(env.settings.state_dir).resolve() / "images"
    assert (Path(first.id) / "build-id").read_text() == "v1\n"

    (home / "build-id").write_text("v2\n")
    assert env.inv("ami.create", "--name", f"{prefix}-v2").returncode == 0
    assert env.inv("ami.latest").stdout.split()[1] == f"{prefix}-v2"
    listed = env.inv("ami.list").stdout
    assert listed.index(f"{prefix}-v2") < listed.index(first.name)

    # A new cluster whose config says `ami: latest` starts from the newest image.
    config = tmp_path / "from-image.json"
    config.write_text(json.dumps({"cluster_name": f"from-img-{os.getpid() % 100000}", "provider": "local",
                                  "nworkers": 1, "dev_host": False, "ami": "latest", "ami_tag": prefix, "ttl": 0}))
    cfg = load_config(config)
    settings = Settings(servers_dir=str(tmp_path / "servers"), state_dir=env.settings.state_dir)
    try:
        info = lib.launch(cfg, settings=settings, wait=False).info
        master_home = Path(settings.state_dir).resolve() / "local" / cfg.cluster_name / "hosts" / info.master.name
        assert (master_home / "home" / "build-id").read_text() == "v2\n"
        with pytest.raises(ProviderError, match="no dev host home at .*: launch the local cluster"):
            images.create(cfg, settings=settings)
    finally:
        lib.destroy(cfg, settings=settings)

    # The other cluster is gone; this one is listed, and it is not an EBS cluster to stop.
    # Other clusters on this machine (other tests' state dirs) are listed too, with their folder.
    rows = {r.cluster: asdict(r) for r in lib.list_clusters(env.cfg, settings=env.settings)}
    row = rows[prefix]
    assert (row["masters"], row["workers"], row["states"]) == (1, 1, "3 running")
    assert not any(name.startswith(f"{cfg.cluster_name} ") or name == cfg.cluster_name for name in rows)
    with pytest.raises(ProviderError, match="provider local cannot stop a cluster"):
        lib.stop(env.cfg, settings=env.settings)

    refused = env.inv("ami.prune", "--keep", "1")
    assert refused.returncode == 1 and refused.stderr.strip() == "not confirmed; pass --yes to prune without asking"
    assert f"will delete {first.id}" in refused.stdout
    pruned = env.inv("ami.prune", "--keep", "1", "--yes")
    assert pruned.returncode == 0 and f"deleted {first.name}" in pruned.stdout
    assert [i.name for i in images.list_images(env.cfg, settings=env.settings)] == [f"{prefix}-v2"]


def test_ami_errors_are_one_line(tmp_path):
    config = tmp_path / "lonely.json"
    config.write_text(json.dumps({"cluster_name": "lonely", "provider": "local", "ami_tag": "nothing"}))
    env = {**os.environ, "INVOKE_CLOISTER_CONFIG": str(config), "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "s")}

    latest = run_inv("ami.latest", env=env)
    assert latest.returncode == 1 and latest.stderr.strip() == (
        f"no available image named 'nothing-*' under {tmp_path.resolve() / 's' / 'images'}; run inv ami.create "
        f"first (or check ami_tag in {config})")
    prune = run_inv("ami.prune", env=env)
    assert prune.returncode == 1 and prune.stderr.strip() == "pass --keep N: how many of the newest images to keep"
    create = run_inv("ami.create", env=env)
    assert create.returncode == 1 and create.stderr.strip().startswith("no dev host home at ")

    static = load_config(REPO / "tests" / "data" / "configs" / "static.json")
    with pytest.raises(ProviderError, match="ami.* needs the ec2 or local provider"):
        images.list_images(static, settings=Settings(state_dir=str(tmp_path)))
