"""Unit tests for cloister.config (SPEC section 3): load_config, precedence, legacy keys, parse_ttl."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import pytest

from cloister import config as config_mod
from cloister.config import DEFAULTS, LEGACY_KEYS, ClusterConfig, load_config, parse_ttl
from cloister.errors import CloisterError, ConfigError

DATA = Path(__file__).parent / "data" / "configs"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A private key file with safe permissions (0600)."""
    path = tmp_path / "keys" / "cluster.pem"
    path.parent.mkdir()
    path.write_text("-----BEGIN RSA PRIVATE KEY-----\nfake\n-----END RSA PRIVATE KEY-----\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def ec2(key_file: Path) -> dict[str, Any]:
    """A minimal valid ec2 config (as a dict to tweak per test)."""
    return {
        "cluster_name": "test-cluster",
        "region": "us-west-2",
        "ami": "ami-0123456789abcdef0",
        "key_name": "alice",
        "ssh_key": str(key_file),
        "nworkers": 2,
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake $HOME with ~/.ssh, so '~/...' key paths in fixture files resolve into tmp_path."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def write_cfg(tmp_path: Path, data: Any, name: str = "cluster.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def make_key(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("fake key\n")
    path.chmod(mode)
    return path


def load_error(path: Path | str, **kwargs: Any) -> ConfigError:
    """load_config must fail with a ConfigError whose message is one line; return it."""
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    err = info.value
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert "Traceback" not in msg
    assert msg.startswith(str(path)), f"message does not start with the file: {msg!r}"
    assert isinstance(err, CloisterError)
    return err


def bad(tmp_path: Path, data: Any, *parts: str, key: str | None = None, **kwargs: Any) -> str:
    """Write ``data``, expect a one-line ConfigError naming the file, ``key`` and each of ``parts``."""
    path = write_cfg(tmp_path, data)
    err = load_error(path, **kwargs)
    msg = str(err)
    assert str(path) in msg
    if key is not None:
        assert err.key == key
        assert f"key '{key}'" in msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- valid configs


def test_minimal_ec2_config_loads_with_defaults(tmp_path, ec2, key_file):
    path = write_cfg(tmp_path, ec2)
    cfg = load_config(path)
    assert isinstance(cfg, ClusterConfig)
    assert cfg.source == str(path)
    assert cfg.cluster_name == "test-cluster"
    assert cfg.provider == "ec2"
    assert cfg.region == "us-west-2"
    assert cfg.ami == "ami-0123456789abcdef0"
    assert cfg.key_name == "alice"
    assert cfg.ssh_key == str(key_file)
    assert cfg.nworkers == 2
    # built-in defaults
    assert cfg.instance_type == "m5.large"
    assert cfg.master_instance_type is None
    assert cfg.master_type == "m5.large"
    assert cfg.user == "ubuntu"
    assert cfg.root_size == 50
    assert cfg.spot is False
    assert cfg.ttl == "8h"
    assert cfg.ttl_seconds == 8 * 3600
    assert cfg.ssh_cidr == "auto"
    assert cfg.redeploy_paths == ["clamor/", "weld/", "cloister/", ".bashrc"]
    assert cfg.dev_host is True
    assert cfg.hosts is None
    assert cfg.notices == ()
    assert cfg.legacy == {}


def test_fixture_ec2_config_with_every_option(home):
    make_key(home / ".ssh" / "bob.pem")
    cfg = load_config(DATA / "ec2.json")
    assert cfg.cluster_name == "bob-bench"
    assert cfg.region == "us-east-1"
    assert cfg.instance_type == "c5.2xlarge"
    assert cfg.master_instance_type == "c5.4xlarge"
    assert cfg.master_type == "c5.4xlarge"
    assert cfg.nworkers == 4
    # '~' is expanded against $HOME
    assert cfg.ssh_key == str(home / ".ssh" / "bob.pem")
    assert cfg.root_size == 100
    assert cfg.placement_group == "bob-pg"
    assert cfg.spot == 0.25
    assert cfg.ttl_seconds == 6 * 3600
    assert cfg.ssh_cidr == "203.0.113.7/32"
    assert cfg.redeploy_paths == ["clamor/", "weld/"]
    assert cfg.notices == ()


def test_config_path_may_be_a_string(tmp_path, ec2):
    path = write_cfg(tmp_path, ec2)
    assert load_config(str(path)).source == str(path)


def test_static_fixture_config(home):
    cfg = load_config(DATA / "static.json")
    assert cfg.provider == "static"
    assert cfg.hosts == ["master.lab.example", "w1.lab.example", "w2.lab.example"]
    assert cfg.user == "clamor"
    assert cfg.region is None and cfg.ami is None  # not required outside ec2


def test_local_fixture_image_relative_to_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the config's folder: the image must still resolve
    cfg = load_config(DATA / "local.json")
    assert cfg.provider == "local"
    assert Path(cfg.image) == (DATA / "image").resolve()
    assert Path(cfg.image).is_absolute()


def test_local_image_absolute_path(tmp_path):
    image = tmp_path / "img"
    image.mkdir()
    cfg = load_config(write_cfg(tmp_path, {"cluster_name": "l", "provider": "local", "image": str(image)}))
    assert cfg.image == str(image)


def test_local_provider_needs_no_ec2_keys_and_does_not_check_ssh_key(tmp_path):
    cfg = load_config(write_cfg(tmp_path, {"cluster_name": "l", "provider": "local",
                                           "ssh_key": str(tmp_path / "nope.pem")}))
    assert cfg.provider == "local"
    assert cfg.ssh_key == str(tmp_path / "nope.pem")


def test_static_provider_checks_ssh_key(tmp_path):
    bad(tmp_path, {"cluster_name": "s", "provider": "static", "hosts": ["h1"],
                   "ssh_key": str(tmp_path / "nope.pem")},
        "does not exist", str(tmp_path / "nope.pem"), key="ssh_key")


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700], ids=oct)
def test_ssh_key_narrow_modes_accepted(tmp_path, ec2, mode):
    key = make_key(tmp_path / "k" / "narrow.pem", mode)
    cfg = load_config(write_cfg(tmp_path, {**ec2, "ssh_key": str(key)}))
    assert cfg.ssh_key == str(key)


def test_ami_latest_with_ami_tag(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, {**ec2, "ami": "latest", "ami_tag": "alice-clamor"}))
    assert (cfg.ami, cfg.ami_tag) == ("latest", "alice-clamor")


@pytest.mark.parametrize("value", [True, False, 0.5, 2])
def test_spot_values_accepted(tmp_path, ec2, value):
    assert load_config(write_cfg(tmp_path, {**ec2, "spot": value})).spot == value


@pytest.mark.parametrize("value", ["auto", "203.0.113.7/32", "10.0.0.0/8", "2001:db8::/64", "sg-0abc123"])
def test_ssh_cidr_values_accepted(tmp_path, ec2, value):
    assert load_config(write_cfg(tmp_path, {**ec2, "ssh_cidr": value})).ssh_cidr == value


@pytest.mark.parametrize("value", ["6h", "90m", 0, 12, "0", "2d"])
def test_ttl_values_accepted(tmp_path, ec2, value):
    assert load_config(write_cfg(tmp_path, {**ec2, "ttl": value})).ttl == value


@pytest.mark.parametrize("value", [8, 16384, None])
def test_root_size_bounds_accepted(tmp_path, ec2, value):
    assert load_config(write_cfg(tmp_path, {**ec2, "root_size": value})).root_size == value


def test_nworkers_zero_is_valid(tmp_path, ec2):
    assert load_config(write_cfg(tmp_path, {**ec2, "nworkers": 0})).nworkers == 0


def test_config_is_frozen_and_replace_returns_copy(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, ec2))
    with pytest.raises(Exception):
        cfg.nworkers = 9  # type: ignore[misc]
    other = cfg.replace(nworkers=9)
    assert other.nworkers == 9 and cfg.nworkers == 2


def test_load_does_not_mutate_builtin_defaults(tmp_path, ec2):
    before = json.dumps(DEFAULTS, sort_keys=True)
    load_config(write_cfg(tmp_path, {**ec2, "redeploy_paths": ["x/"]}),
                defaults={"instance_type": "c5.large"}, overrides={"nworkers": 3})
    assert json.dumps(DEFAULTS, sort_keys=True) == before


# --------------------------------------------------------------------------- bad configs: the file itself


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "absent.json"
    err = load_error(path)
    assert err.file == str(path)
    assert "no such config file" in str(err)
    assert "--config" in str(err)  # says how to point at another file


def test_directory_instead_of_file(tmp_path):
    err = load_error(tmp_path)
    assert "is a directory" in str(err)
    assert "JSON config file" in str(err)


def test_invalid_json_names_line_and_column(tmp_path):
    text = '{\n  "cluster_name": "a",\n  "nworkers": ,\n  "region": "us-west-2"\n}\n'
    msg = bad(tmp_path, text, "invalid JSON", "line 3", "column 15", "Expecting value")
    assert "key '" not in msg


def test_invalid_json_trailing_comma(tmp_path):
    bad(tmp_path, '{"cluster_name": "a",}', "invalid JSON", "line 1", "column 22")


def test_empty_file_is_invalid_json(tmp_path):
    bad(tmp_path, "", "invalid JSON", "line 1", "column 1")


@pytest.mark.parametrize("text", ['["cluster_name", "a"]', '"a"', "42", "null"])
def test_top_level_not_an_object(tmp_path, text):
    bad(tmp_path, text, "expected a JSON object")


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"cluster_name": "caf\u00e9"}'.encode("latin-1"))
    load_error(path)


# --------------------------------------------------------------------------- bad configs: keys


@pytest.mark.parametrize("typo, suggestion", [
    ("nworker", "nworkers"),
    ("cluser_name", "cluster_name"),
    ("instance-type", "instance_type"),
    ("regoin", "region"),
    ("key_pairs", "key_pair"),  # legacy names are valid keys too
])
def test_unknown_key_suggests_closest(tmp_path, ec2, typo, suggestion):
    bad(tmp_path, {**ec2, typo: 1}, "unknown key", f"did you mean '{suggestion}'?", key=typo)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path, ec2):
    msg = bad(tmp_path, {**ec2, "zzqqxx": 1}, "unknown key", "valid keys:", key="zzqqxx")
    assert "did you mean" not in msg
    for key in DEFAULTS:
        assert key in msg


def test_unknown_key_with_newline_still_one_line(tmp_path, ec2):
    bad(tmp_path, {**ec2, "foo\nbar": 1}, "unknown key")


# --------------------------------------------------------------------------- bad configs: values


@pytest.mark.parametrize("value, shown", [
    ("4", '"4"'),       # a string in the file is not coerced
    (-1, "-1"),
    (True, "true"),     # bool is not an int here
    (2.5, "2.5"),
    (None, "null"),
])
def test_bad_nworkers(tmp_path, ec2, value, shown):
    bad(tmp_path, {**ec2, "nworkers": value}, "expected a non-negative integer", f"got {shown}",
        key="nworkers")


@pytest.mark.parametrize("name", ["MyCluster", "a" * 41, "my cluster", "under_score", "", "dot.name", 42])
def test_bad_cluster_name(tmp_path, ec2, name):
    bad(tmp_path, {**ec2, "cluster_name": name}, "1-40 characters", "a-z, 0-9 and '-'",
        f"got {json.dumps(name)}", key="cluster_name")


def test_cluster_name_of_40_characters_is_fine(tmp_path, ec2):
    assert load_config(write_cfg(tmp_path, {**ec2, "cluster_name": "a" * 40})).cluster_name == "a" * 40


def test_cluster_name_with_trailing_newline_rejected(tmp_path, ec2):
    bad(tmp_path, {**ec2, "cluster_name": "abc\n"}, "1-40 characters", key="cluster_name")


def test_missing_cluster_name(tmp_path, ec2):
    del ec2["cluster_name"]
    bad(tmp_path, ec2, "missing", "needs a name", key="cluster_name")


def test_null_cluster_name_is_missing(tmp_path, ec2):
    bad(tmp_path, {**ec2, "cluster_name": None}, "missing", key="cluster_name")


@pytest.mark.parametrize("provider", ["gcp", "EC2", "", None])
def test_bad_provider(tmp_path, ec2, provider):
    bad(tmp_path, {**ec2, "provider": provider}, "one of ec2, local, static",
        f"got {json.dumps(provider)}", key="provider")


@pytest.mark.parametrize("key", ["region", "ami", "key_name", "ssh_key"])
def test_ec2_requires_key(tmp_path, ec2, key):
    del ec2[key]
    bad(tmp_path, ec2, "missing", "required by the ec2 provider", key=key)


@pytest.mark.parametrize("key", ["region", "ami", "key_name", "ssh_key"])
def test_ec2_required_key_null(tmp_path, ec2, key):
    bad(tmp_path, {**ec2, key: None}, "missing", "required by the ec2 provider", key=key)


def test_ami_latest_without_ami_tag_uses_the_old_prefix_with_a_notice(tmp_path, ec2):
    path = write_cfg(tmp_path, {**ec2, "ami": "latest"})
    cfg = load_config(path)
    assert cfg.ami_tag == "clamor"
    [notice] = cfg.notices
    assert notice.startswith(f"{path}: no ami_tag") and "clamor" in notice and "\n" not in notice


def test_ami_latest_with_an_ami_tag_has_no_notice(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, {**ec2, "ami": "latest", "ami_tag": "bob-img"}))
    assert cfg.ami_tag == "bob-img" and cfg.notices == ()


@pytest.mark.parametrize("ami", ["ami123", "0123456789", "Latest", "", 12])
def test_bad_ami_id(tmp_path, ec2, ami):
    bad(tmp_path, {**ec2, "ami": ami}, "an AMI id ('ami-...') or 'latest'", f"got {json.dumps(ami)}", key="ami")


def test_ssh_key_file_missing(tmp_path, ec2):
    missing = tmp_path / "keys" / "missing.pem"
    bad(tmp_path, {**ec2, "ssh_key": str(missing)}, "key file", str(missing), "does not exist", key="ssh_key")


def test_ssh_key_is_a_directory(tmp_path, ec2):
    bad(tmp_path, {**ec2, "ssh_key": str(tmp_path)}, str(tmp_path), "not a regular file", key="ssh_key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o666, 0o610], ids=oct)
def test_ssh_key_too_open(tmp_path, ec2, mode):
    key = make_key(tmp_path / "k" / "open.pem", mode)
    bad(tmp_path, {**ec2, "ssh_key": str(key)}, str(key), f"mode {mode:04o}", "0600",
        f"chmod 600 {key}", key="ssh_key")


@pytest.mark.parametrize("ttl", ["6 hours", "-1", -1, "1.5h", "6x", "h", True, 1.5, None, ""])
def test_bad_ttl(tmp_path, ec2, ttl):
    bad(tmp_path, {**ec2, "ttl": ttl}, "a duration such as '6h'", "0 to disable", f"got {json.dumps(ttl)}",
        key="ttl")


@pytest.mark.parametrize("cidr", ["0.0.0.0", "203.0.113.7", "everyone", "10.0.0.300/32", "", None, 32])
def test_bad_ssh_cidr(tmp_path, ec2, cidr):
    bad(tmp_path, {**ec2, "ssh_cidr": cidr}, "'auto', a CIDR", f"got {json.dumps(cidr)}", key="ssh_cidr")


@pytest.mark.parametrize("spot", [-0.5, -1, "yes", "0.3", None])
def test_bad_spot(tmp_path, ec2, spot):
    bad(tmp_path, {**ec2, "spot": spot}, "false, true, or a maximum price", f"got {json.dumps(spot)}",
        key="spot")


@pytest.mark.parametrize("paths", ["clamor/", ["clamor/", ""], ["clamor/", 3], {"a": 1}, None])
def test_bad_redeploy_paths(tmp_path, ec2, paths):
    bad(tmp_path, {**ec2, "redeploy_paths": paths}, "a list of paths", f"got {json.dumps(paths)}",
        key="redeploy_paths")


@pytest.mark.parametrize("size", [7, 0, -50, 16385, "50", 50.5])
def test_bad_root_size(tmp_path, ec2, size):
    bad(tmp_path, {**ec2, "root_size": size}, "volume size in GiB (8-16384)", f"got {json.dumps(size)}",
        key="root_size")


@pytest.mark.parametrize("user", ["Ubuntu", "", "a b", "1user", None])
def test_bad_user(tmp_path, ec2, user):
    bad(tmp_path, {**ec2, "user": user}, "a login user name", key="user")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_dev_host(tmp_path, ec2, value):
    bad(tmp_path, {**ec2, "dev_host": value}, "true or false", key="dev_host")


@pytest.mark.parametrize("key", ["instance_type", "region", "key_name", "master_instance_type", "ami_tag"])
def test_empty_string_values_rejected(tmp_path, ec2, key):
    bad(tmp_path, {**ec2, key: ""}, 'got ""', key=key)


@pytest.mark.parametrize("legacy, new, legacy_value, new_value", [
    ("key_pair", "ssh_key", "/tmp/old.pem", None),
    ("identity_file", "key_name", "old", "new"),
    ("driver_instance_type", "master_instance_type", "r5.large", "c5.large"),
    ("num_workers", "nworkers", 3, 4),
])
def test_legacy_key_together_with_new_name(tmp_path, ec2, legacy, new, legacy_value, new_value):
    data = {**ec2, legacy: legacy_value}
    if new_value is not None:
        data[new] = new_value
    assert new in data
    bad(tmp_path, data, f"legacy name of '{new}'", "also set", "keep one", key=legacy)


def test_legacy_conflict_regardless_of_order(tmp_path, ec2):
    ec2.pop("ssh_key")
    data = {"key_pair": "/tmp/a.pem", **ec2, "ssh_key": "/tmp/b.pem"}
    bad(tmp_path, data, "legacy name of 'ssh_key'", key="key_pair")


@pytest.mark.parametrize("hosts", ["__absent__", None, []])
def test_static_provider_without_hosts(tmp_path, hosts):
    data = {"cluster_name": "s", "provider": "static"}
    if hosts != "__absent__":
        data["hosts"] = hosts
    bad(tmp_path, data, "host", key="hosts")


@pytest.mark.parametrize("hosts", ["h1,h2", ["h1", ""], ["h1", 2]])
def test_static_hosts_bad_shape(tmp_path, hosts):
    bad(tmp_path, {"cluster_name": "s", "provider": "static", "hosts": hosts},
        "a list of host names, the master first", key="hosts")


def test_local_provider_image_dir_missing(tmp_path):
    bad(tmp_path, {"cluster_name": "l", "provider": "local", "image": "no-such-image"},
        "directory no-such-image does not exist", key="image")


def test_local_provider_image_is_a_file_not_dir(tmp_path):
    (tmp_path / "imgfile").write_text("x")
    bad(tmp_path, {"cluster_name": "l", "provider": "local", "image": str(tmp_path / "imgfile")},
        "does not exist", key="image")


def test_value_errors_from_the_file_do_not_claim_another_source(tmp_path, ec2):
    msg = bad(tmp_path, {**ec2, "nworkers": -2}, key="nworkers")
    assert "(from" not in msg


# --------------------------------------------------------------------------- legacy configs


LEGACY_MAPPED = {"identity_file": "key_name", "key_pair": "ssh_key", "driver_instance_type": "master_instance_type",
                 "swap_size_driver": "swap_size"}
LEGACY_IGNORED = {
    "driver_file": "servers/driver",
    "servers_file": "servers/servers",
    "datagen_instance_ip": "ec2-54-0-0-1.us-west-2.compute.amazonaws.com",
}


def check_legacy(cfg: ClusterConfig, source: str, pem: Path) -> None:
    assert cfg.cluster_name == "alice-clamor-test"
    assert cfg.region == "us-west-2"
    assert cfg.ami == "latest"
    assert cfg.ami_tag == "alice-clamor"
    assert cfg.nworkers == 8
    assert cfg.ami_instance_ip == "ec2-54-0-0-2.us-west-2.compute.amazonaws.com"
    # mapped keys
    assert cfg.key_name == "alice-keypair"
    assert cfg.ssh_key == str(pem)
    assert cfg.master_instance_type == "r5.4xlarge"
    assert cfg.master_type == "r5.4xlarge"
    assert cfg.instance_type == "m5.large"
    assert cfg.swap_size == 64
    # ignored keys are kept
    assert cfg.legacy == LEGACY_IGNORED
    check_notices(cfg, source, mapped=LEGACY_MAPPED, ignored=LEGACY_IGNORED)


def check_notices(cfg: ClusterConfig, source: str, *, mapped: dict, ignored: Iterable[str], more: int = 0) -> None:
    """One notice per legacy key (plus ``more``), each one line naming the file and the key."""
    assert len(cfg.notices) == len(mapped) + len(list(ignored)) + more, cfg.notices
    for old, new in mapped.items():
        matching = [n for n in cfg.notices if f"'{old}'" in n]
        assert len(matching) == 1
        assert f"legacy key '{old}' read as '{new}'" in matching[0]
    for old in ignored:
        matching = [n for n in cfg.notices if f"'{old}'" in n]
        assert len(matching) == 1
        assert f"legacy key '{old}' accepted and not used" in matching[0]
    for notice in cfg.notices:
        assert "\n" not in notice
        assert notice.startswith(source + ":")


def test_legacy_fixture_loads_unchanged(home):
    pem = make_key(home / ".ssh" / "alice-keypair.pem", 0o600)
    path = DATA / "legacy.json"
    check_legacy(load_config(path), str(path), pem)


def test_legacy_config_in_tmp_path(tmp_path):
    pem = make_key(tmp_path / "alice-keypair.pem", 0o600)
    data = json.loads((DATA / "legacy.json").read_text())
    data["key_pair"] = str(pem)
    path = write_cfg(tmp_path, data, "old_config.json")
    check_legacy(load_config(path), str(path), pem)


# The original scripts' files: the "driver" branch, the later "master" branch and the oldest sample
# (master_file, no ami_tag). Their key_pair is relative to the directory the scripts were run from.
CLAMOR_IGNORED = {"clamor_driver.json": ["driver_file", "servers_file", "datagen_instance_ip"],
                  "clamor_master.json": ["master_file", "servers_file", "datagen_instance_ip"],
                  "clamor_oldest.json": ["master_file", "servers_file"]}
CLAMOR_MAPPED = {"clamor_driver.json": {"identity_file": "key_name", "key_pair": "ssh_key",
                                        "driver_instance_type": "master_instance_type",
                                        "swap_size_driver": "swap_size"},
                 "clamor_master.json": {"identity_file": "key_name", "key_pair": "ssh_key",
                                        "swap_size_master": "swap_size"},
                 "clamor_oldest.json": {"identity_file": "key_name", "key_pair": "ssh_key",
                                        "swap_size_master": "swap_size"}}


@pytest.fixture
def old_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the key files the original samples name relatively."""
    cwd = tmp_path / "work"
    make_key(cwd / "keys" / "alice-keypair.pem")
    make_key(cwd / "alice-keypair.pem")
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("name", sorted(CLAMOR_MAPPED))
def test_original_clamor_configs_load_unchanged(old_cwd, name):
    path = DATA / name
    data = json.loads(path.read_text())
    cfg = load_config(path)
    assert (cfg.provider, cfg.cluster_name, cfg.region, cfg.user) == ("ec2", data["cluster_name"], data["region"], "ubuntu")
    assert (cfg.instance_type, cfg.nworkers, cfg.root_size) == (data["instance_type"], data["nworkers"], data["root_size"])
    assert cfg.ami == data["ami"] and cfg.ami_instance_ip == data["ami_instance_ip"]
    assert cfg.key_name == data["identity_file"]
    # relative to the working directory (not to the config file's folder), and absolute from then on
    assert cfg.ssh_key == str(old_cwd / data["key_pair"])
    assert cfg.master_type == (data.get("driver_instance_type") or data.get("master_instance_type") or data["instance_type"])
    assert cfg.swap_size == data.get("swap_size_driver", data.get("swap_size_master"))
    assert cfg.legacy == {key: data[key] for key in CLAMOR_IGNORED[name]}
    oldest = name == "clamor_oldest.json"
    assert cfg.ami_tag == ("clamor" if oldest else data["ami_tag"])
    check_notices(cfg, str(path), mapped=CLAMOR_MAPPED[name], ignored=CLAMOR_IGNORED[name], more=int(oldest))
    if oldest:
        [notice] = [n for n in cfg.notices if "ami_tag" in n]
        assert "'ami: latest'" in notice and "clamor" in notice


def test_relative_key_pair_is_not_looked_for_beside_the_config(tmp_path, monkeypatch):
    make_key(tmp_path / "cfgdir" / "keys" / "alice-keypair.pem")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    path = write_cfg(tmp_path / "cfgdir", json.loads((DATA / "clamor_driver.json").read_text()))
    bad(tmp_path / "cfgdir", json.loads(path.read_text()), str(tmp_path / "elsewhere" / "keys" / "alice-keypair.pem"),
        "does not exist", key="ssh_key")


def test_relative_ssh_key_is_made_absolute_from_the_working_directory(tmp_path, ec2, monkeypatch):
    make_key(tmp_path / "k.pem")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_cfg(tmp_path, {**ec2, "ssh_key": "k.pem"}))
    assert cfg.ssh_key == str(tmp_path / "k.pem")


@pytest.mark.parametrize("data, key, also", [
    ({"swap_size_master": 8, "swap_size_driver": 16}, "swap_size_driver", "(as 'swap_size_master')"),
    ({"swap_size": 8, "swap_size_master": 16}, "swap_size_master", "which is also set;"),
])
def test_two_names_of_swap_size_are_refused(tmp_path, ec2, data, key, also):
    bad(tmp_path, {**ec2, **data}, "legacy name of 'swap_size'", also, "keep one", key=key)


@pytest.mark.parametrize("value", [-1, "32", 1.5, True, 20000])
def test_bad_swap_size(tmp_path, ec2, value):
    bad(tmp_path, {**ec2, "swap_size": value}, "GiB of swap", key="swap_size")


def test_swap_size_defaults_to_none_and_is_read_from_env_strings(tmp_path, ec2):
    path = write_cfg(tmp_path, ec2)
    assert load_config(path).swap_size is None and DEFAULTS["swap_size"] is None
    assert load_config(path, defaults={"swap_size": "16"}).swap_size == 16


def test_label_names_the_cluster_and_its_images(tmp_path, ec2):
    overrides = config_mod.label_overrides(label="exp-7", name=None)
    cfg = load_config(write_cfg(tmp_path, {**ec2, "ami": "latest", "ami_tag": "old"}), overrides=overrides)
    assert (cfg.cluster_name, cfg.ami_tag) == ("exp-7", "exp-7")
    assert set(cfg.from_flags) == {"cluster_name", "ami_tag"}
    assert config_mod.label_overrides(label=None, name="n") == {"cluster_name": "n"}
    with pytest.raises(ConfigError, match="give --label or --name, not both"):
        config_mod.label_overrides(label="a", name="b")


def test_legacy_key_pair_mode_checked_under_new_name(tmp_path, ec2):
    pem = make_key(tmp_path / "open.pem", 0o644)
    ec2.pop("ssh_key")
    bad(tmp_path, {**ec2, "key_pair": str(pem)}, "mode 0644", "chmod 600", key="ssh_key")


def test_num_workers_read_as_nworkers(tmp_path, ec2):
    ec2.pop("nworkers")
    cfg = load_config(write_cfg(tmp_path, {**ec2, "num_workers": 6}))
    assert cfg.nworkers == 6
    assert len(cfg.notices) == 1 and "read as 'nworkers'" in cfg.notices[0]


@pytest.mark.parametrize("old", sorted(k for k, v in LEGACY_KEYS.items() if v is None))
def test_every_ignored_legacy_key_is_accepted(tmp_path, ec2, old):
    cfg = load_config(write_cfg(tmp_path, {**ec2, old: "whatever"}))
    assert cfg.legacy == {old: "whatever"}
    assert len(cfg.notices) == 1 and f"'{old}'" in cfg.notices[0]


def test_every_key_of_the_original_scripts_is_known():
    for key in ("identity_file", "key_pair", "cluster_name", "master_file", "driver_file", "servers_file", "user",
                "instance_type", "master_instance_type", "driver_instance_type", "ami", "ami_tag", "ami_instance_ip",
                "datagen_instance_ip", "region", "nworkers", "root_size", "swap_size_master", "swap_size_driver"):
        assert key in LEGACY_KEYS or key in DEFAULTS


# --------------------------------------------------------------------------- precedence


def test_builtin_default_lowest(tmp_path, ec2):
    assert load_config(write_cfg(tmp_path, ec2)).instance_type == DEFAULTS["instance_type"]


def test_defaults_mapping_beats_builtin(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, ec2), defaults={"instance_type": "c5.large", "user": "ec2-user"})
    assert cfg.instance_type == "c5.large"
    assert cfg.user == "ec2-user"


def test_file_beats_defaults_mapping(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, {**ec2, "instance_type": "r5.large"}),
                      defaults={"instance_type": "c5.large", "nworkers": 9})
    assert cfg.instance_type == "r5.large"
    assert cfg.nworkers == 2


def test_overrides_beat_file(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, {**ec2, "instance_type": "r5.large"}),
                      defaults={"instance_type": "c5.large"},
                      overrides={"instance_type": "x1.large", "nworkers": 16})
    assert cfg.instance_type == "x1.large"
    assert cfg.nworkers == 16


def test_full_precedence_chain_per_key(tmp_path, ec2):
    ec2.pop("nworkers")
    data = {**ec2, "ttl": "3h", "root_size": 80}
    cfg = load_config(write_cfg(tmp_path, data),
                      defaults={"user": "alice", "ttl": "4h", "root_size": 60, "spot": True},
                      overrides={"root_size": 120})
    assert cfg.instance_type == "m5.large"  # built-in
    assert cfg.nworkers == 1                # built-in
    assert cfg.user == "alice"              # defaults mapping
    assert cfg.spot is True                 # defaults mapping
    assert cfg.ttl == "3h"                  # file over defaults
    assert cfg.root_size == 120             # overrides over file and defaults


def test_none_values_are_ignored(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, ec2),
                      defaults={"user": None, "instance_type": None, "region": None},
                      overrides={"nworkers": None, "region": None, "cluster_name": None})
    assert cfg.user == "ubuntu"
    assert cfg.instance_type == "m5.large"
    assert cfg.region == "us-west-2"
    assert cfg.nworkers == 2
    assert cfg.cluster_name == "test-cluster"


def test_falsy_override_not_mistaken_for_none(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, ec2), overrides={"nworkers": 0, "dev_host": False})
    assert cfg.nworkers == 0
    assert cfg.dev_host is False


def test_defaults_supply_required_ec2_keys(tmp_path, key_file):
    cfg = load_config(write_cfg(tmp_path, {"cluster_name": "c", "ami": "ami-1"}),
                      defaults={"region": "eu-west-1", "key_name": "k", "ssh_key": str(key_file)})
    assert (cfg.region, cfg.key_name, cfg.ssh_key) == ("eu-west-1", "k", str(key_file))


def test_defaults_mapping_extra_keys_ignored(tmp_path, ec2):
    # c.cloister also holds non-cluster settings such as the default config path
    cfg = load_config(write_cfg(tmp_path, ec2), defaults={"config": "configs/a.json", "servers_dir": "servers"})
    assert cfg.cluster_name == "test-cluster"


def test_env_string_nworkers_becomes_int(tmp_path, ec2):
    ec2.pop("nworkers")
    cfg = load_config(write_cfg(tmp_path, ec2), defaults={"nworkers": "7"})
    assert cfg.nworkers == 7
    assert isinstance(cfg.nworkers, int)


def test_env_string_root_size_becomes_int(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, ec2), defaults={"root_size": "120"})
    assert cfg.root_size == 120


@pytest.mark.parametrize("value", ["-3", "seven", "7.5"])
def test_defaults_layer_error_names_its_source(tmp_path, ec2, value):
    ec2.pop("nworkers")
    path = write_cfg(tmp_path, ec2)
    msg = bad(tmp_path, ec2, "(from cloister.nworkers)", "non-negative integer", f"got {json.dumps(value)}",
              key="nworkers", defaults={"nworkers": value})
    assert msg.startswith(f"{path} (from cloister.nworkers): key 'nworkers'")


def test_defaults_layer_bad_ttl_names_its_source(tmp_path, ec2):
    bad(tmp_path, ec2, "(from cloister.ttl)", "a duration", key="ttl", defaults={"ttl": "forever"})


def test_file_value_shadows_bad_defaults_value(tmp_path, ec2):
    # the bad env value is overridden by the file, so there is nothing to report
    cfg = load_config(write_cfg(tmp_path, ec2), defaults={"nworkers": "-3"})
    assert cfg.nworkers == 2


def test_override_error_names_the_flag(tmp_path, ec2):
    bad(tmp_path, ec2, "(from --nworkers)", "non-negative integer", key="nworkers", overrides={"nworkers": -1})
    bad(tmp_path, ec2, "(from --master-instance-type)", key="master_instance_type",
        overrides={"master_instance_type": ""})


def test_inputs_not_mutated(tmp_path, ec2):
    defaults = {"instance_type": "c5.large", "nworkers": "3"}
    overrides = {"nworkers": 5, "user": None}
    load_config(write_cfg(tmp_path, ec2), defaults=defaults, overrides=overrides)
    assert defaults == {"instance_type": "c5.large", "nworkers": "3"}
    assert overrides == {"nworkers": 5, "user": None}


def test_defaults_layer_ssh_key_error_names_its_source(tmp_path, ec2):
    ec2.pop("ssh_key")
    bad(tmp_path, ec2, "(from cloister.ssh_key)", "does not exist", key="ssh_key",
        defaults={"ssh_key": str(tmp_path / "absent.pem")})


def test_default_redeploy_paths_not_shared_with_defaults(tmp_path, ec2):
    cfg = load_config(write_cfg(tmp_path, ec2))
    assert cfg.redeploy_paths is not DEFAULTS["redeploy_paths"]


# --------------------------------------------------------------------------- parse_ttl


@pytest.mark.parametrize("value, seconds", [
    ("6h", 6 * 3600),
    ("90m", 90 * 60),
    ("30s", 30),
    ("2d", 2 * 86400),
    (0, 0),
    (5, 5 * 3600),      # a bare number means hours
    ("0", 0),
    ("12", 12 * 3600),  # a bare numeric string too
    (" 6h ", 6 * 3600),
    ("6 h", 6 * 3600),
])
def test_parse_ttl(value, seconds):
    assert parse_ttl(value) == seconds


def test_ttl_seconds_property(tmp_path, ec2):
    assert load_config(write_cfg(tmp_path, {**ec2, "ttl": "90m"})).ttl_seconds == 5400
    assert load_config(write_cfg(tmp_path, {**ec2, "ttl": 0})).ttl_seconds == 0


def test_config_error_attributes():
    err = ConfigError(file="a.json", key="nworkers", expected="expected x")
    assert (err.file, err.key, err.expected) == ("a.json", "nworkers", "expected x")
    assert str(err) == "a.json: key 'nworkers': expected x"
    assert str(ConfigError(file="a.json", expected="boom")) == "a.json: boom"


def test_module_defaults_and_checks_cover_same_keys():
    assert set(config_mod._CHECKS) == set(DEFAULTS)
    fields = {f.name for f in config_mod.dataclasses.fields(ClusterConfig)}
    assert set(DEFAULTS) <= fields
