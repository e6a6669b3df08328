"""moto's EC2 instance lifecycle, patched while a twin runs (and restored when it stops).

Each hook lets moto do its own bookkeeping first, then tells the twin: an instance was created
(give it loopback addresses and boot its machine), stopped, started, terminated, imaged. DNS names
are the addresses themselves, so they resolve (to loopback) everywhere, inside instances too.
GetConsoleOutput returns the machine's console.
One twin per process: moto's backends are global to the process.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any
from unittest import mock

from moto.core.responses import ActionResult
from moto.core.types import Base64EncodedString
from moto.core.utils import utcnow
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import elastic_network_interfaces
from moto.ec2.models.amis import AmiBackend
from moto.ec2.models.instances import Instance
from moto.ec2.responses.general import General

from .machine import TwinError

if TYPE_CHECKING:
    from .twin import Twin

# EC2 keeps the last 64 KiB of the console.
CONSOLE_BYTES = 64 * 1024
# moto's own methods, for the hooks and for the twin (a machine that powered itself off is stopped or
# terminated the way moto does it).
ORIGINAL = {"__init__": Instance.__init__, "start": Instance.start, "stop": Instance.stop,
            "terminate": Instance.terminate, "create_image": AmiBackend.create_image}
_twin: Twin | None = None


class IncorrectInstanceState(EC2ClientError):
    def __init__(self, instance_id: str, action: str):
        super().__init__("IncorrectInstanceState",
                         f"The instance '{instance_id}' is not in a state from which it can be {action}.")


def _init(instance: Instance, *args: Any, **kwargs: Any) -> None:
    ORIGINAL["__init__"](instance, *args, **kwargs)
    _twin.created(instance)


def _start(instance: Instance):
    if instance.state in ("stopping", "shutting-down", "terminated"):
        raise IncorrectInstanceState(instance.id, "started")
    was_running = instance.state == "running"
    previous = ORIGINAL["start"](instance)
    if not was_running:
        _twin.started(instance)
    return previous


def _stop(instance: Instance):
    if instance.state in ("shutting-down", "terminated"):
        raise IncorrectInstanceState(instance.id, "stopped")
    previous = ORIGINAL["stop"](instance)
    _twin.stopping(instance)
    return previous


def _terminate(instance: Instance):
    previous = ORIGINAL["terminate"](instance)
    _twin.terminating(instance)
    return previous


def _create_image(backend: AmiBackend, instance_id: str, name: str, description: str,
                  tag_specifications: list[dict[str, Any]]):
    # moto cannot tag the image's snapshot at creation (HTTP 500), EC2 can and cloister's ami.create
    # asks for it, also from `inv` subprocesses that no botocore handler of a test reaches.
    snapshot = [spec for spec in tag_specifications if spec["ResourceType"] == "snapshot"]
    rest = [spec for spec in tag_specifications if spec["ResourceType"] != "snapshot"]
    ami = ORIGINAL["create_image"](backend, instance_id, name, description, tag_specifications=rest)
    for spec in snapshot:
        ami.ebs_snapshot.add_tags({tag["Key"]: tag["Value"] for tag in spec["Tags"]})
    _twin.imaged(ami.id, instance_id)
    return ami


def _console_output(response: General) -> ActionResult:
    instance = response.ec2_backend.get_instance(response._get_param("InstanceId"))
    text = _twin.console(instance.id)[-CONSOLE_BYTES:]
    return ActionResult({"InstanceId": instance.id, "Timestamp": utcnow(),
                         "Output": Base64EncodedString.from_raw_string(text)})


PATCHES: list[tuple[Any, str, Any]] = [
    (Instance, "__init__", _init), (Instance, "start", _start), (Instance, "stop", _stop),
    (Instance, "terminate", _terminate),
    (Instance, "private_dns_name", property(lambda instance: instance.private_ip_address)),
    (Instance, "public_dns_name", property(lambda instance: instance.public_ip)),
    (elastic_network_interfaces, "generate_dns_from_ip", lambda ip, dns_type="internal": ip),
    (AmiBackend, "create_image", _create_image),
    (General, "get_console_output", _console_output),
]


@contextlib.contextmanager
def installed(twin: Twin):
    """moto patched for ``twin`` inside the block; refuses a second twin in the same process."""
    global _twin
    if _twin is not None:
        raise TwinError("another twin is running in this process (moto's backends are shared)")
    _twin = twin
    try:
        with contextlib.ExitStack() as stack:
            for target, name, value in PATCHES:
                stack.enter_context(mock.patch.object(target, name, value))
            yield
    finally:
        _twin = None
