"""EC2 as it fails: faults the twin (and the tests' moto server) answer with, as AWS does every day.

A ``Faults`` is installed into moto's request handling of this process (``installed``); its fields
may be changed while it is installed (a test turns throttling off before it counts what leaked).

- ``hide_new``: for this many seconds after CreateSecurityGroup, RunInstances or CreateImage, every call
  that names the new id answers InvalidGroup.NotFound / InvalidInstanceID.NotFound / InvalidAMIID.NotFound
  (EC2's eventual consistency: the id exists, the next call's server has not heard of it yet). Describe
  calls by filter are not affected.
- ``no_capacity``: zones (``us-west-2a``) or ``type@zone`` where RunInstances answers
  InsufficientInstanceCapacity (HTTP 500, as EC2 does, naming the zones that have capacity).
- ``vcpu_quota`` / ``spot_vcpu_quota``: the account's Running On-Demand / Spot Standard (A, C, D, H, I,
  M, R, T, Z) vCPU quotas: GetServiceQuota answers them (L-1216C47A, L-34B43A08) and RunInstances
  refuses a launch that would pass them (VcpuLimitExceeded, MaxSpotInstanceCountExceeded).
- ``throttle``: (burst, per second) of a token bucket over every EC2 request; an empty bucket answers
  RequestLimitExceeded (HTTP 503).
- ``refuse``: action -> error code, answered to every such call (PendingVerification, OptInRequired,
  UnfulfillableCapacity, InsufficientReservedInstanceCapacity, ...).

From the command line (``python -m twin --faults SPEC``, or ``CLOISTER_TWIN_FAULTS=SPEC`` for the twin
and ``make demo-ec2``) a SPEC is space-separated ``key=value`` items, e.g.
``hide_new=5 no_capacity=us-west-2a vcpu_quota=64 throttle=5/2 refuse=RunInstances:PendingVerification``.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock
from xml.sax.saxutils import escape

from moto.core.responses import BaseResponse
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.responses import EC2Response
from moto.servicequotas.models import ServiceQuotasBackend

ENV = "CLOISTER_TWIN_FAULTS"
ON_DEMAND_QUOTA, SPOT_QUOTA = "L-1216C47A", "L-34B43A08"
QUOTA_NAMES = {ON_DEMAND_QUOTA: "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances",
               SPOT_QUOTA: "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests"}
STANDARD_FAMILIES = "acdhimrtz"
# A default account's quotas are larger than anything a test launches, unless a test says otherwise.
DEFAULT_QUOTA = 1152
NOT_FOUND = {"sg-": ("InvalidGroup.NotFound", "The security group '{}' does not exist"),
             "i-": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
             "ami-": ("InvalidAMIID.NotFound", "The image id '[{}]' does not exist")}
# What EC2 says with each code it may refuse a launch with (HTTP status, message).
REFUSALS = {
    "PendingVerification": (400, "Your request for accessing resources in this region is being validated, and "
                                 "you will not be able to launch additional resources in this region until the "
                                 "validation is complete."),
    "OptInRequired": (401, "You are not subscribed to this service. Please go to http://aws.amazon.com to "
                           "subscribe."),
    "UnfulfillableCapacity": (500, "There is no Spot capacity available that matches your request."),
    "InsufficientReservedInstanceCapacity": (500, "There is not enough capacity to fulfill your reserved "
                                                  "instance request."),
    "MaxSpotInstanceCountExceeded": (400, "Max spot instance count exceeded"),
    "VcpuLimitExceeded": (400, "You have requested more vCPU capacity than your current vCPU limit allows."),
    "InsufficientInstanceCapacity": (500, "We currently do not have sufficient capacity in the Availability Zone "
                                          "you requested."),
}
_CREATED = {"CreateSecurityGroup": r"<groupId>(sg-[0-9a-f]+)</groupId>",
            "RunInstances": r"<instanceId>(i-[0-9a-f]+)</instanceId>",
            "CreateImage": r"<imageId>(ami-[0-9a-f]+)</imageId>"}


class SpecError(ValueError):
    pass


@dataclass
class Faults:
    hide_new: float = 0.0
    no_capacity: tuple[str, ...] = ()
    vcpu_quota: int = DEFAULT_QUOTA
    spot_vcpu_quota: int = DEFAULT_QUOTA
    throttle: tuple[int, float] | None = None
    refuse: dict[str, str] = field(default_factory=dict)
    # What was answered, for the tests: (action, code) of every injected error.
    injected: list[tuple[str, str]] = field(default_factory=list)
    _new: dict[str, float] = field(default_factory=dict)
    _tokens: float = 0.0
    _refilled: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """Faults from a SPEC of space-separated key=value items (see the module doc)."""
        faults = cls()
        for item in spec.split():
            key, _, value = item.partition("=")
            try:
                if key == "hide_new":
                    faults.hide_new = float(value)
                elif key == "no_capacity":
                    faults.no_capacity = tuple(v for v in value.split(",") if v)
                elif key in ("vcpu_quota", "spot_vcpu_quota"):
                    setattr(faults, key, int(value))
                elif key == "throttle":
                    burst, rate = value.split("/")
                    faults.throttle = (int(burst), float(rate))
                elif key == "refuse":
                    action, code = value.split(":")
                    faults.refuse[action] = code
                else:
                    raise SpecError(f"unknown fault '{key}'")
            except ValueError as exc:
                raise SpecError(f"{ENV} / --faults: '{item}': {exc}") from None
        return faults

    # -- the request path ------------------------------------------------------------------

    def before(self, response: EC2Response) -> tuple[int, dict[str, str], str] | None:
        """An error to answer instead of the action, or None to let moto answer."""
        action = response._get_action()
        params = {k: v[0] if isinstance(v, list) else v for k, v in response.querystring.items()}
        with self._lock:
            # A DryRun checks permissions and parameters, never capacity or quotas.
            launch = action == "RunInstances" and params.get("DryRun") != "true"
            error = (self._throttled() or self._refused(action) or self._hidden(params)
                     or (self._launch_refusal(response, params) if launch else None))
        if error is None:
            return None
        status, code, message = error
        self.injected.append((action, code))
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID>"
                f"</Response>")
        return status, {"Content-Type": "text/xml;charset=UTF-8", "status": str(status)}, body

    def after(self, action: str, status: int, body: Any) -> None:
        pattern = _CREATED.get(action)
        if not pattern or not self.hide_new or status != 200:
            return
        text = body.decode() if isinstance(body, bytes) else str(body)
        now = time.monotonic()
        with self._lock:
            self._new.update((new, now) for new in re.findall(pattern, text))

    def _throttled(self) -> tuple[int, str, str] | None:
        if self.throttle is None:
            return None
        burst, rate = self.throttle
        now = time.monotonic()
        if not self._refilled:
            self._tokens, self._refilled = float(burst), now
        self._tokens = min(float(burst), self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return None
        return 503, "RequestLimitExceeded", "Request limit exceeded."

    def _refused(self, action: str) -> tuple[int, str, str] | None:
        code = self.refuse.get(action)
        if code is None:
            return None
        status, message = REFUSALS.get(code, (400, f"{code} (injected by the twin)"))
        return status, code, message

    def _hidden(self, params: dict[str, str]) -> tuple[int, str, str] | None:
        if not self._new:
            return None
        now = time.monotonic()
        for name, value in params.items():
            born = self._new.get(value)
            if born is None or name.startswith(("Filter.", "ClientToken")):
                continue
            if now - born >= self.hide_new:
                del self._new[value]
                continue
            code, message = next(v for p, v in NOT_FOUND.items() if value.startswith(p))
            return 400, code, message.format(value)
        return None

    def _launch_refusal(self, response: EC2Response, params: dict[str, str]) -> tuple[int, str, str] | None:
        backend = response.ec2_backend
        kind = params.get("InstanceType", "m1.small")
        zone = _zone(backend, params)
        if zone in self.no_capacity or f"{kind}@{zone}" in self.no_capacity:
            others = [z.name for z in backend.describe_availability_zones()
                      if z.name != zone and z.name not in self.no_capacity]
            return 500, "InsufficientInstanceCapacity", (
                f"We currently do not have sufficient {kind} capacity in the Availability Zone you requested "
                f"({zone}). Our system will be working on provisioning additional capacity. You can currently get "
                f"{kind} capacity by not specifying an Availability Zone in your request or choosing "
                f"{', '.join(others)}.")
        if kind[0] not in STANDARD_FAMILIES:
            return None
        spot = params.get("InstanceMarketOptions.MarketType") == "spot"
        asked = int(params.get("MaxCount", "1")) * _vcpus(kind)
        used = sum(_vcpus(i.instance_type) for i in backend.all_instances()
                   if i.state in ("pending", "running") and i.instance_type[0] in STANDARD_FAMILIES
                   and (i.lifecycle == "spot") == spot)
        quota = self.spot_vcpu_quota if spot else self.vcpu_quota
        if used + asked <= quota:
            return None
        if spot:
            return 400, "MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"
        return 400, "VcpuLimitExceeded", (
            f"You have requested more vCPU capacity than your current vCPU limit of {quota} allows for the instance "
            f"bucket that the specified instance type belongs to. Please visit http://aws.amazon.com/contact-us/"
            f"ec2-request to request an adjustment to this limit.")

    # -- Service Quotas ----------------------------------------------------------------------

    def quota(self, code: str) -> dict[str, Any]:
        value = self.vcpu_quota if code == ON_DEMAND_QUOTA else self.spot_vcpu_quota
        return {"ServiceCode": "ec2", "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
                "QuotaArn": f"arn:aws:servicequotas:::ec2/{code}", "QuotaCode": code, "QuotaName": QUOTA_NAMES[code],
                "Value": float(value), "Unit": "None", "Adjustable": True, "GlobalQuota": False}


def _vcpus(kind: str) -> int:
    return int(INSTANCE_TYPES.get(kind, {}).get("VCpuInfo", {}).get("DefaultVCpus", 1))


def _zone(backend, params: dict[str, str]) -> str:
    if params.get("Placement.AvailabilityZone"):
        return params["Placement.AvailabilityZone"]
    subnet = params.get("SubnetId")
    if subnet:
        try:
            return backend.get_subnet(subnet).availability_zone
        except Exception:  # noqa: BLE001 - moto answers the unknown subnet itself
            return ""
    return f"{backend.region_name}a"


_active: Faults | None = None
_next_call = BaseResponse.call_action  # what the faults pass a request on to (see installed)
_ORIGINAL_QUOTA = ServiceQuotasBackend.get_service_quota


def _call_action(response: BaseResponse):
    faults = _active
    if faults is None or not isinstance(response, EC2Response):
        return _next_call(response)
    refusal = faults.before(response)
    if refusal is not None:
        return refusal
    status, headers, body = _next_call(response)
    faults.after(response._get_action(), status, body)
    return status, headers, body


def _get_service_quota(backend: ServiceQuotasBackend, service_code: str, quota_code: str) -> dict[str, Any]:
    if _active is not None and service_code == "ec2" and quota_code in QUOTA_NAMES:
        return _active.quota(quota_code)
    return _ORIGINAL_QUOTA(backend, service_code, quota_code)


@contextlib.contextmanager
def installed(faults: Faults) -> Iterator[Faults]:
    """moto answers with ``faults`` inside the block (one set per process, as moto's backends are)."""
    global _active, _next_call
    if _active is not None:
        raise RuntimeError("faults are already installed in this process")
    _active = faults
    # Chained to what is installed already (moto's own, or another patch of the twin's).
    _next_call = BaseResponse.call_action
    try:
        with mock.patch.object(BaseResponse, "call_action", _call_action), \
                mock.patch.object(ServiceQuotasBackend, "get_service_quota", _get_service_quota):
            yield faults
    finally:
        _active = None

