"""Run the twin as a server of its own, for a demo or by hand (as root, from tests/ or with it on
PYTHONPATH):

    python -m twin --import-key NAME PUBLIC_KEY_FILE --env-file twin.env &
    . twin.env          # once it exists: AWS_ENDPOINT_URL_EC2 and friends, as shell exports
    inv cluster.launch ...

It serves until SIGINT or SIGTERM, then ends every machine, cleans up and removes the env file.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import threading
from pathlib import Path

from . import Twin, reclaim
from .faults import ENV, Faults, SpecError


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m twin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--import-key", nargs=2, action="append", default=[], metavar=("NAME", "PUBLIC_KEY_FILE"),
                        help="import an EC2 key pair (repeatable)")
    parser.add_argument("--faults", default=os.environ.get(ENV, ""), metavar="SPEC",
                        help=f"inject EC2's failures, e.g. 'hide_new=5 no_capacity=us-west-2a vcpu_quota=64 "
                             f"throttle=5/2' (default: ${ENV}; see tests/twin/faults.py)")
    parser.add_argument("--env-file", type=Path, help="also write the exports there, once the twin serves")
    parser.add_argument("--assume-role", metavar="ROLE",
                        help="the exports make boto3 assume ROLE through a profile, a new session name per process")
    parser.add_argument("--reclaim-spot-after", type=float, metavar="SECONDS",
                        help="EC2 reclaims every spot instance SECONDS after its launch")
    args = parser.parse_args()
    try:
        faults = Faults.parse(args.faults)
    except SpecError as exc:
        parser.error(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with Twin(faults=faults) as twin:
        ec2 = twin.client()
        for name, public_key in args.import_key:
            ec2.import_key_pair(KeyName=name, PublicKeyMaterial=Path(public_key).read_bytes())
        if args.reclaim_spot_after is not None:
            reclaim.reclaim_after(twin, args.reclaim_spot_after)
        env = twin.profile_env(twin.dir / "profile", role=args.assume_role) if args.assume_role else twin.env()
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()) if k.startswith("AWS_"))
        if args.env_file:
            # Written whole and then renamed, so whoever waits for the file never reads half of it.
            partial = args.env_file.with_name(args.env_file.name + ".partial")
            partial.write_text(exports)
            os.replace(partial, args.env_file)
        print(exports, end="", flush=True)
        try:
            stop.wait()
        finally:
            if args.env_file:
                args.env_file.unlink(missing_ok=True)  # it names a server that is gone


if __name__ == "__main__":
    main()
