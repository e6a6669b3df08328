"""The original Clamor config files through `inv cluster.launch --dry-run` against a moto EC2 server:
the oldest sample (no ami_tag) finds the user's clamor-* image, and `--label` (the old `-l`) names both the
cluster and the image prefix."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import moto_server as ms  # before anything imports moto
from conftest import REPO, run_inv

DATA = REPO / "tests" / "data" / "configs"


@pytest.fixture(scope="module")
def moto():
    server = ms.MotoEc2()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def account(moto, tmp_path):
    """A fresh account with the samples' key pair and two images of the user's: clamor-* and lbl-*."""
    moto.reset()
    saved = dict(os.environ)
    os.environ.update(ms.aws_env(moto.url))
    try:
        client = ms.client()
        ms.seed(client, key_name="alice-keypair")
        source = client.run_instances(ImageId=ms.UBUNTU_AMI, InstanceType="t3.micro", MinCount=1,
                                      MaxCount=1)["Instances"][0]["InstanceId"]
        images = {name: client.create_image(InstanceId=source, Name=name)["ImageId"]
                  for name in ("clamor-20240101-0000", "lbl-20240102-0000")}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return images


def dry_run(moto, tmp_path: Path, sample: str, *flags: str):
    """Launch ``sample`` dry from a working directory holding its relative key_pair, as the old scripts ran."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    key = work / json.loads((DATA / sample).read_text())["key_pair"]
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text("key\n")
    key.chmod(0o600)
    config = shutil.copy(DATA / sample, tmp_path / sample)
    env = {**ms.aws_env(moto.url), "INVOKE_CLOISTER_SERVERS_DIR": str(tmp_path / "servers"),
           "INVOKE_CLOISTER_STATE_DIR": str(tmp_path / "state"), "INVOKE_CLOISTER_SSH_CIDR": "198.51.100.7/32"}
    return run_inv("--search-root", str(REPO), "cluster.launch", "--config", str(config), "--dry-run", *flags,
                   env=env, cwd=work)


def test_the_oldest_sample_takes_the_users_clamor_image(moto, account, tmp_path):
    proc = dry_run(moto, tmp_path, "clamor_oldest.json")
    assert proc.returncode == 0, proc.stderr
    assert "plan for ec2 cluster 'clamor' in us-west-2" in proc.stdout
    assert f"image      {account['clamor-20240101-0000']} (clamor-20240101-0000," in proc.stdout
    assert "no ami_tag; 'ami: latest' takes your newest image named clamor-*" in proc.stderr
    # one notice line per legacy key, each naming the file
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 6 and all(str(tmp_path / "clamor_oldest.json") in line for line in notes), notes


def test_label_names_the_cluster_and_the_image_prefix(moto, account, tmp_path):
    proc = dry_run(moto, tmp_path, "clamor_driver.json", "--label", "lbl")
    assert proc.returncode == 0, proc.stderr
    assert "plan for ec2 cluster 'lbl' in us-west-2" in proc.stdout
    assert f"image      {account['lbl-20240102-0000']} (lbl-20240102-0000," in proc.stdout
    assert "master     1 x r5.4xlarge" in proc.stdout and "workers    8 x r5.2xlarge" in proc.stdout


def test_label_and_name_together_is_one_line(moto, tmp_path):
    proc = dry_run(moto, tmp_path, "clamor_driver.json", "--label", "lbl", "--name", "other")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "--label: sets the cluster name and ami_tag; give --label or --name, not both"
