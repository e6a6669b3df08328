"""A moto EC2 server over HTTP on loopback, for the tests and benchmarks/launch_calls.py.

Import this module before anything imports moto: moto reads its validation switches at import
time, and with them it rejects unknown AMI ids, instance types and key names as EC2 does.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode

for _flag in ("MOTO_ENABLE_AMI_VALIDATION", "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION",
              "MOTO_ENABLE_KEYPAIR_VALIDATION"):
    os.environ[_flag] = "true"

from moto.server import ThreadedMotoServer  # noqa: E402 - after the switches above

REGION = "us-west-2"
# An Ubuntu AMI from moto's built-in catalogue (present in every region).
UBUNTU_AMI = "ami-785db401"
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBd4EnC6JEsRBwhXeqxRkq9jVDDbMgsnwhz4nHmPLddC cloister-test"


def aws_env(endpoint: str) -> dict[str, str]:
    """os.environ without the developer's AWS settings, pointed at ``endpoint`` with fake credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_EC2=endpoint,
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=REGION,
        AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        # botocore would otherwise ask 169.254.169.254 for credentials when none are set.
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


class MotoEc2:
    """A running ThreadedMotoServer; ``url`` is its endpoint."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every resource (terminated instances would otherwise pile up and slow describes)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", data=b"", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        self.server.stop()


def client(region: str = REGION):
    """A boto3 EC2 client for arranging and checking state, from its own session so that handlers on
    the default session (which cloister's clients use) neither see nor count its requests."""
    import boto3

    return boto3.session.Session().client("ec2", region_name=region)


def seed(ec2, *, key_name: str = "alice") -> None:
    """What a real account has before cloister runs: a key pair."""
    ec2.import_key_pair(KeyName=key_name, PublicKeyMaterial=PUBLIC_KEY.encode())


# -- botocore before-send injection: what moto does not implement ---------------------------


class Raw:
    """The minimal urllib3-like body botocore reads from an AWSResponse."""

    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_: Any):
        yield self.body


def error_response(request, code: str, message: str, status: int = 400):
    from botocore.awsrequest import AWSResponse

    body = (f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            f"<RequestID>injected</RequestID></Response>").encode()
    return AWSResponse(request.url, status, {}, Raw(body))


def ok_response(request, body: str):
    from botocore.awsrequest import AWSResponse

    return AWSResponse(request.url, 200, {}, Raw(body.encode()))


def params(request) -> dict[str, str]:
    """The form parameters of an EC2 query-protocol request."""
    body = request.body or b""
    if isinstance(body, bytes):
        body = body.decode()
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def forward(request, form: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Send ``request`` (or the same call with the parameters ``form``) on to the server itself."""
    data = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    if form is not None:
        data = urlencode(form).encode()
    forwarded = urllib.request.Request(request.url, data=data, headers=headers, method=request.method)
    with urllib.request.urlopen(forwarded, timeout=30) as answer:
        return answer.status, answer.read()


class Injector:
    """Handlers registered first on boto3's default session's ``before-send`` events.

    cloister makes its clients from boto3's default session, and a client copies the session's
    handlers when it is created, so handlers registered here reach every client cloister makes
    afterwards. ``calls`` records every request the clients send (operation, parameters);
    ``close`` unregisters every handler, so the session (and its loaded service model) is reused.
    """

    def __init__(self) -> None:
        import boto3

        if boto3.DEFAULT_SESSION is None:
            boto3.setup_default_session()
        self.events = boto3.DEFAULT_SESSION.events
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.handlers: list[tuple[str, Callable]] = []
        self.on("before-send.ec2", self._record)

    def _record(self, request, **_: Any):
        p = params(request)
        self.calls.append((p.get("Action", "?"), p))

    def on(self, event: str, handler: Callable) -> None:
        self.events.register_first(event, handler)
        self.handlers.append((event, handler))

    def count(self, action: str | None = None) -> int:
        return sum(1 for a, _ in self.calls if action is None or a == action)

    def close(self) -> None:
        for event, handler in self.handlers:
            self.events.unregister(event, handler)


def placement_groups_handler(store: dict[str, dict[str, str]]):
    """moto answers placement-group calls with HTTP 500; emulate Create/Describe/Delete in ``store``."""

    def handler(request, **_: Any):
        p = params(request)
        action = p.get("Action")
        if action == "CreatePlacementGroup":
            name = p["GroupName"]
            if name in store:
                return error_response(request, "InvalidPlacementGroup.Duplicate", f"group {name} exists")
            tags = {p[k]: p[k.replace(".Key", ".Value")] for k in p if k.startswith("TagSpecification.1.Tag.")
                    and k.endswith(".Key")}
            store[name] = {"strategy": p.get("Strategy", ""), "tags": json.dumps(tags)}
            return ok_response(request, "<CreatePlacementGroupResponse><return>true</return>"
                                        "</CreatePlacementGroupResponse>")
        if action == "DescribePlacementGroups":
            filters = {p[k]: p[k[: -len("Name")] + "Value.1"] for k in p
                       if k.startswith("Filter.") and k.endswith(".Name")}
            items = ""
            for name, group in store.items():
                tags = json.loads(group["tags"])
                if all(tags.get(f[len("tag:"):]) == value for f, value in filters.items() if f.startswith("tag:")):
                    items += (f"<item><groupName>{name}</groupName><strategy>{group['strategy']}</strategy>"
                              f"<state>available</state></item>")
            return ok_response(request, f"<DescribePlacementGroupsResponse><placementGroupSet>{items}"
                                        f"</placementGroupSet></DescribePlacementGroupsResponse>")
        if action == "DeletePlacementGroup":
            store.pop(p["GroupName"], None)
            return ok_response(request, "<DeletePlacementGroupResponse><return>true</return>"
                                        "</DeletePlacementGroupResponse>")
        return None

    return handler


def snapshot_tags_handler(requested: list[dict[str, str]]):
    """moto cannot tag snapshots in CreateImage (HTTP 500): record that tags were asked for, send the rest."""

    def handler(request, **_: Any):
        form = params(request)
        prefixes = [k[: -len("ResourceType")] for k, v in form.items()
                    if k.startswith("TagSpecification.") and k.endswith(".ResourceType") and v == "snapshot"]
        if not prefixes:
            return None
        requested.append({k: v for k, v in form.items() if k.startswith(prefixes[0])})
        status, body = forward(request, {k: v for k, v in form.items() if not k.startswith(prefixes[0])})
        return ok_response(request, body.decode()) if status == 200 else None

    return handler
