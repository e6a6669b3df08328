"""Who calls the twin, and what they call.

**Assume-role profiles.** Most people reach AWS through a profile that assumes a role
(``role_arn`` + ``source_profile``). botocore then asks STS for temporary credentials in every
process and names the session ``botocore-session-<epoch seconds>``, so GetCallerIdentity answers
another ARN in every process (``arn:aws:sts::ACCOUNT:assumed-role/ROLE/botocore-session-...``).
``profile_env`` gives an ``inv`` subprocess exactly that: a config and credentials file whose profile
assumes ``role`` through the twin's STS (moto's, which needs no IAM role to exist). The twin hands
each such session a name no earlier session had, as processes a second apart get on AWS, so two
processes started within one second differ too.

**Every request.** ``Requests`` records each request the twin's moto answers (service, action,
the caller's access key as moto reads it: a 20-character key id, else ``AKIAEXAMPLE``; whether it
was a DryRun), for tests that compare what the code sends with
the IAM policy it documents. ``twin.requests`` is the twin's.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from moto.core.responses import BaseResponse
from moto.sts.models import STSBackend, sts_backends

ACCOUNT = "123456789012"  # moto's default account: an assumed role of it sees the same EC2 resources
SOURCE_KEY = "AKIATWINSOURCE000001"  # the profile's long-term key, which only calls AssumeRole
BOTOCORE_SESSION = re.compile(r"botocore-session-(\d+)")


@dataclass(frozen=True)
class Request:
    service: str
    action: str
    access_key: str
    dry_run: bool


class Requests:
    """Every request answered while installed, in order (thread-safe: moto's server is threaded)."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self._lock = threading.Lock()

    def add(self, request: Request) -> None:
        with self._lock:
            self.seen.append(request)

    def actions(self, service: str, *, since: int = 0) -> set[str]:
        with self._lock:
            return {r.action for r in self.seen[since:] if r.service == service}

    def __len__(self) -> int:
        return len(self.seen)


def profile_env(base: dict[str, str], directory: Path, *, role: str, source_key: str = SOURCE_KEY) -> dict[str, str]:
    """``base`` (an environment for the twin, see ``Twin.env``) turned into one whose credentials come
    from a profile assuming ``role`` in the twin's account, with botocore's own session names."""
    directory.mkdir(parents=True, exist_ok=True)
    config, credentials = directory / "aws-config", directory / "aws-credentials"
    config.write_text(f"[profile source]\n[profile {role}]\nrole_arn = arn:aws:iam::{ACCOUNT}:role/{role}\n"
                      f"source_profile = source\n")
    credentials.write_text(f"[source]\naws_access_key_id = {source_key}\naws_secret_access_key = twin\n")
    env = {k: v for k, v in base.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_PROFILE=role, AWS_CONFIG_FILE=str(config), AWS_SHARED_CREDENTIALS_FILE=str(credentials))
    return env


def sessions(role: str) -> list[str]:
    """The ARN of every session of ``role`` that STS handed out so far, in order (one per process)."""
    return [r.arn for r in sts_backends[ACCOUNT]["aws"].assumed_roles if r.role_arn.endswith(f":role/{role}")]


@contextlib.contextmanager
def installed(requests: Requests) -> Iterator[None]:
    """moto patched to record every request in ``requests`` and to give every botocore session a name
    of its own."""
    call_action = BaseResponse.call_action
    assume_role = STSBackend.assume_role
    names: set[str] = set()
    names_lock = threading.Lock()

    def recorded(response: BaseResponse):
        try:
            action = response._get_action()
            key = response.get_access_key()
        except Exception:  # noqa: BLE001 - a request moto cannot read is not recorded, and moto answers it
            action, key = "?", "?"
        dry = str(response.querystring.get("DryRun", [""])[0]).lower() == "true" if response.querystring else False
        requests.add(Request(service=response.service_name or "?", action=action, access_key=key, dry_run=dry))
        return call_action(response)

    def fresh_session(backend: STSBackend, region_name: str, role_session_name: str, *args, **kwargs):
        found = BOTOCORE_SESSION.fullmatch(role_session_name)
        if found:
            with names_lock:
                number = int(found.group(1))
                while f"botocore-session-{number}" in names:
                    number += 1
                role_session_name = f"botocore-session-{number}"
                names.add(role_session_name)
        return assume_role(backend, region_name, role_session_name, *args, **kwargs)

    with mock.patch.object(BaseResponse, "call_action", recorded), \
            mock.patch.object(STSBackend, "assume_role", fresh_session):
        yield
