"""ami.*: the dev instance and its images (EC2 AMIs, or directory images for the local provider)."""

from __future__ import annotations

import os
import sys

from invoke import Collection, Exit

from cloister.cluster import lifecycle as lib
from cloister.transport import hosts as hostlib
from cloister.cluster import images

from ._common import load, settings, task
from ._output import confirm, note, progress_bar, warning
from .cluster import CONFIG_HELP


def _describe(image: images.Image) -> str:
    return f"{image.id}  {image.name}  created {image.created:%Y-%m-%d %H:%M} UTC"


@task(help={"config": CONFIG_HELP})
def login(c, config=None):
    """Log in to the dev instance (ami_instance_ip), or the local cluster's dev host."""
    cfg = load(c, config)
    info, host = lib.provider(cfg, settings=settings(c)).dev_info()
    argv = hostlib.ssh_argv(info, host)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


@task(help={"config": CONFIG_HELP})
def latest(c, config=None):
    """Print the image that `ami: latest` resolves to (newest with the ami_tag prefix)."""
    cfg = load(c, config)
    print(_describe(images.latest(cfg, settings=settings(c))))


@task(name="list", help={"config": CONFIG_HELP})
def list_(c, config=None):
    """List your images whose name starts with ami_tag, newest first."""
    from rich.console import Console
    from rich.table import Table

    cfg = load(c, config)
    found = images.list_images(cfg, settings=settings(c))
    if not found:
        print(f"no images named '{images.pattern(cfg)}'")
        return
    table = Table(title=f"images named '{images.pattern(cfg)}', newest first")
    # Piped output is 80 columns wide: wrap long ids (local image paths) rather than cut them.
    table.add_column("name", no_wrap=True)
    table.add_column("id", overflow="fold")
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("state")
    for image in found:
        table.add_row(image.name, image.id, f"{image.created:%Y-%m-%d %H:%M}", image.state)
    Console().print(table)


@task(help={"config": CONFIG_HELP,
            "name": "image name (default: {ami_tag}-{UTC yyyymmdd-hhmm}; `ami: latest` only sees the prefix)",
            "no_reboot": "ec2: image the dev instance without EC2's restart (faster; files being written may "
                         "be inconsistent in the image)"})
def create(c, config=None, name=None, no_reboot=False):
    """Image the dev instance (local: the dev host's home) and wait until it is available."""
    cfg = load(c, config)
    if name and not images.matches(cfg, name):
        print(f"note: '{name}' does not match '{images.pattern(cfg)}', so `ami: latest` will not pick it",
              file=sys.stderr)
    conf = settings(c)
    if lib.provider(cfg, settings=conf).images().reboots and not no_reboot:
        warning("EC2 restarts the dev instance to image it (a consistent disk); --no-reboot images it running")
    with progress_bar() as bar:
        image = images.create(cfg, settings=conf, name=name, progress=bar.update, reboot=not no_reboot)
    print(f"created {_describe(image)}")
    left_out = lib.provider(cfg, settings=conf).images().left_out
    if left_out:
        note(left_out)


@task(help={"config": CONFIG_HELP, "keep": "how many of the newest images to keep (required)",
            "yes": "do not ask for confirmation"})
def prune(c, config=None, keep=None, yes=False):
    """Delete all but the newest --keep N images (and their snapshots)."""
    if keep is None:
        raise Exit("pass --keep N: how many of the newest images to keep", code=1)
    try:
        count = int(keep)
    except ValueError:
        raise Exit(f"--keep {keep!r}: expected an integer", code=1)
    cfg = load(c, config)
    doomed = images.prunable(cfg, settings=settings(c), keep=count)
    if not doomed:
        print(f"nothing to prune: at most {count} images named '{images.pattern(cfg)}'")
        return
    for image in doomed:
        print(f"will delete {_describe(image)}")
    if not yes and not confirm(f"Delete these {len(doomed)} images?"):
        raise Exit("not confirmed; pass --yes to prune without asking", code=1)
    for message in images.delete(cfg, settings=settings(c), doomed=doomed):
        print(message)


ns = Collection("ami", login, latest, list_, create, prune)
