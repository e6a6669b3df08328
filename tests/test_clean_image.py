"""ami.create (local provider) after a redeploy: the dev host's home then holds SSH control sockets, the
cluster key and cloister's own state; the image holds none of them, and says so."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cloister.cluster import images
from cloister import layout
from cloister.providers.local.images import dev_home


def kinds(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (relative path -> file, dir, link, socket, fifo or other)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            kind = next((k for k, test in (("link", stat.S_ISLNK), ("dir", stat.S_ISDIR), ("file", stat.S_ISREG),
                                           ("socket", stat.S_ISSOCK), ("fifo", stat.S_ISFIFO)) if test(mode)), "other")
            found[str(path.relative_to(root))] = kind
    return found


def test_an_image_after_redeploy_leaves_out_sockets_the_key_and_cloister_state(own_cluster):
    env = own_cluster("imgr", nworkers=1, dev=True)
    home = dev_home(env.cfg, state_dir=env.settings.state_dir)
    (home / "clamor" / "build-id").write_text("v7\n")
    (home / "clamor" / "latest").symlink_to("build-id")
    os.mkfifo(home / "clamor" / "a-fifo")
    redeployed = env.inv("cluster.redeploy", "--paths", "clamor/,.bashrc")
    assert redeployed.returncode == 0, redeployed.stderr
    # A run's logs on the dev host too, as exp.* leaves them on a node.
    (home / layout.RUNS_DIR / "dsum" / "r1").mkdir(parents=True)
    (home / layout.RUNS_DIR / "dsum" / "r1" / "master.log").write_text("log\n")
    before = kinds(home)
    assert "socket" in before.values(), "no SSH control socket on the dev host: the test proves nothing"
    assert {layout.KEY, layout.SSH_KNOWN_HOSTS, layout.KNOWN_HOSTS, f"{layout.SERVERS_DIR}/cluster.json"} <= set(before)

    made = env.inv("ami.create")
    assert made.returncode == 0, made.stderr
    assert "Traceback" not in made.stderr
    assert made.stderr.splitlines() == [
        "note: the image leaves out sockets, fifos and device files (such as SSH control sockets), the cluster key "
        "and cloister's state on the node: ~/.ssh/cloister_key, ~/.ssh/cloister_known_hosts, ~/.ssh/cloister_config, "
        "~/cloister/servers, ~/cloister/known_hosts, ~/cloister/runs"]
    (image,) = images.list_images(env.cfg, settings=env.settings)
    after = kinds(Path(image.id))
    left_out = layout.NOT_IN_IMAGES
    expected = {path: kind for path, kind in before.items() if kind in ("file", "dir", "link")
                and not any(path == p or path.startswith(p + "/") for p in left_out)}
    assert after == expected
    assert (Path(image.id) / "clamor" / "build-id").read_text() == "v7\n"
    assert os.readlink(Path(image.id) / "clamor" / "latest") == "build-id"
