"""AWS clients and errors: every botocore error becomes one AwsError line saying what happened and what to do.

boto3 is imported inside ``client_for`` so that ``inv --list`` and non-EC2 tasks never pay for it.
Retries are botocore's adaptive mode.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from ...config import ClusterConfig
from ...errors import AwsError
from ...poll import retry

T = TypeVar("T")

# Adaptive mode slows the client down after throttling; ten attempts outlast a burst of a shared account.
RETRIES = {"mode": "adaptive", "max_attempts": 10}
# EC2 answers these with HTTP 500, which botocore would retry for a minute in the same zone; they are
# answers about a zone (or a reservation) that another zone may not give.
CAPACITY_CODES = ("InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
                  "UnfulfillableCapacity", "InsufficientReservedInstanceCapacity")
# Answers about the account, not the moment: retrying cannot change them.
FINAL_LAUNCH_CODES = CAPACITY_CODES + ("VcpuLimitExceeded", "MaxSpotInstanceCountExceeded",
                                       "InstanceLimitExceeded", "PendingVerification", "OptInRequired")
# EC2 is eventually consistent: an id it has just returned may be unknown to the next call for a while.
NEW_ID_TIMEOUT = 120.0


# (codes, (what happened, what to do)); {region} and {operation} are filled in.
_EXPLAIN_GROUPS: list[tuple[tuple[str, ...], tuple[str, str]]] = [
    (("AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
      "ExpiredToken", "RequestExpired"),
     ("AWS rejected the credentials", "check them with `aws sts get-caller-identity` (and the clock)")),
    (("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"),
     ("not permitted to call {operation}", "ask your AWS administrator for the ec2:{operation} permission")),
    (("InvalidAMIID.NotFound", "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"),
     ("the AMI is not available in {region}", "check `ami` in the config, or run inv ami.list")),
    (("InvalidKeyPair.NotFound",),
     ("the key pair does not exist in {region}",
      "check `key_name`, or import your public key with aws ec2 import-key-pair")),
    (("InvalidInstanceType", "InvalidInstanceType.NotFound", "Unsupported"),
     ("the instance type is not offered here", "check instance_type and master_instance_type")),
    (CAPACITY_CODES,
     ("AWS has no spare capacity for this request in {region} right now",
      "retry in a few minutes, choose another instance type, or drop placement_group")),
    (("VcpuLimitExceeded",),
     ("your on-demand vCPU quota in {region} is too small for this launch",
      "ask for more 'Running On-Demand Standard instances' vCPUs (quota L-1216C47A) in Service Quotas, "
      "or use fewer or smaller instances")),
    (("MaxSpotInstanceCountExceeded",),
     ("your spot vCPU quota in {region} is too small for this launch",
      "ask for more 'All Standard Spot Instance Requests' vCPUs (quota L-34B43A08) in Service Quotas, "
      "or launch the workers on demand (spot: false)")),
    (("InstanceLimitExceeded",),
     ("your instance quota in {region} is too small for this launch",
      "ask for a higher quota in Service Quotas, or use fewer instances")),
    (("PendingVerification",),
     ("AWS is still verifying your account for {region} and launches nothing until it is done",
      "wait for AWS's e-mail (usually minutes, up to 4 hours), or ask AWS Support")),
    (("OptInRequired",),
     ("the account is not subscribed to what this launch needs (the AMI's Marketplace product, or the region)",
      "accept the AMI's terms in AWS Marketplace or opt in to {region} in the account settings, then retry")),
    (("RequestLimitExceeded", "Throttling", "ThrottlingException"),
     (f"EC2 kept throttling requests after {RETRIES['max_attempts']} attempts",
      "wait a minute and retry; another tool may be calling EC2 heavily")),
    (("SpotMaxPriceTooLow",),
     ("the spot max price is below the current spot price", "raise `spot` in the config, or set it to true")),
    (("DependencyViolation", "InvalidPlacementGroup.InUse"),
     ("a resource is still in use", "wait a minute and run inv cluster.destroy again")),
]


_EXPLAIN = {code: text for codes, text in _EXPLAIN_GROUPS for code in codes}


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def aws_error(exc: Exception, *, region: str | None, cluster: str | None = None) -> AwsError:
    """One line for a botocore exception: what happened, AWS's own words, and what to do."""
    from botocore import exceptions as bx
    from botocore.parsers import ResponseParserError

    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        what, todo = _EXPLAIN.get(code, ("EC2 {operation} failed in {region}", ""))
        fill = {"region": region, "operation": exc.operation_name}
        message = f"{what.format(**fill)} ({code}: {one_line(error.get('Message', ''))})"
        if todo:
            message += f"; {todo.format(**fill)}"
        return AwsError(message, code=code, operation=exc.operation_name, region=region, cluster=cluster)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        message = ("no AWS credentials found: run `aws configure`, or set AWS_PROFILE, or "
                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    elif isinstance(exc, bx.NoRegionError):
        message = "no AWS region: set `region` in the cluster config"
    elif isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        message = (f"cannot reach the EC2 endpoint ({one_line(exc)}): check the network, or "
                   f"AWS_ENDPOINT_URL_EC2 if you set it")
    elif isinstance(exc, bx.ReadTimeoutError):
        message = f"EC2 did not answer in time ({one_line(exc)}); retry in a minute"
    elif isinstance(exc, ResponseParserError):
        message = (f"the EC2 endpoint answered with something other than EC2's XML ({one_line(exc, 120)}); "
                   f"check AWS_ENDPOINT_URL_EC2 or any proxy in between")
    else:
        message = f"AWS client error: {one_line(exc)}"
    return AwsError(message, code=type(exc).__name__, region=region, cluster=cluster)


@contextlib.contextmanager
def aws_errors(cfg: ClusterConfig) -> Iterator[None]:
    """Turn botocore errors raised inside into AwsError (no traceback for the user)."""
    try:
        yield
    except botocore_errors() as exc:
        raise aws_error(exc, region=cfg.region, cluster=cfg.cluster_name) from None


def botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    return ClientError, BotoCoreError, ResponseParserError


def client_for(region: str | None):
    import boto3
    from botocore.config import Config

    client = boto3.client("ec2", region_name=region, config=Config(retries=RETRIES))
    client.meta.events.register_first("needs-retry.ec2.RunInstances", _final_answer)
    return client


def quotas_client(region: str | None):
    import boto3
    from botocore.config import Config

    return boto3.client("service-quotas", region_name=region, config=Config(retries=RETRIES))


def _final_answer(response=None, operation=None, **_):
    """Raise a launch refusal at once instead of letting botocore retry it (see FINAL_LAUNCH_CODES)."""
    from botocore.exceptions import ClientError

    if response is None:
        return None
    parsed = response[1]
    if parsed.get("Error", {}).get("Code") in FINAL_LAUNCH_CODES:
        raise ClientError(parsed, operation.name)
    return None


def on_new(call: Callable[[], T], *, codes: tuple[str, ...] = (), timeout: float = NEW_ID_TIMEOUT) -> T:
    """``call`` (which names an id EC2 has just created), retried while EC2 answers one of ``codes`` (by
    default any *.NotFound): for up to two minutes that does not mean the id is gone."""
    def unseen(exc: Exception) -> bool:
        code = error_code(exc) or ""
        return code in codes if codes else code.endswith(".NotFound")

    return retry(call, transient=unseen, timeout=timeout)


def error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None



# botocore (so boto3 and the AWS CLI) names the session of a role it assumes from a profile
# botocore-session-<epoch seconds>, aws-vault <epoch nanoseconds>: a new name for every process.
GENERATED_SESSION = re.compile(r"botocore-session-\d+|\d{9,}")
ASSUMED_ROLE = re.compile(r"arn:(?P<partition>[^:]+):sts::(?P<account>\d+):assumed-role/(?P<role>[^/]+)/(?P<session>.+)")


def stable_owner(arn: str) -> str:
    """The caller's ARN as an owner that stays put from one process to the next.

    An assumed role's session name made up per process is dropped (the role's ARN remains); a session
    name that names a person (SSO's e-mail address, a role_session_name of one's own) is kept, so
    two people sharing a role stay two owners.
    """
    found = ASSUMED_ROLE.fullmatch(arn)
    if not found or not GENERATED_SESSION.fullmatch(found["session"]):
        return arn
    return f"arn:{found['partition']}:iam::{found['account']}:role/{found['role']}"


def caller_identity(cfg: ClusterConfig) -> str:
    """Whoever the credentials belong to, as a stable owner (STS answers this for any credentials)."""
    with aws_errors(cfg):
        return stable_owner(_caller(cfg.region))


# One task asks for the owner several times (find, tag, tear down); the answer cannot change meanwhile.
@functools.lru_cache(maxsize=8)
def _caller(region: str | None) -> str:
    import boto3
    from botocore.config import Config

    sts = boto3.client("sts", region_name=region, config=Config(retries=RETRIES))
    return sts.get_caller_identity()["Arn"]
