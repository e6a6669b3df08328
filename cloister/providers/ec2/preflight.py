"""What would make a launch fail, checked before any RunInstances (at launch and in the dry run): the
key pair exists, the AMI's architecture runs on each instance type, and the account's vCPU quotas
(Service Quotas) hold the cluster beside what already runs in the region.

Only the standard families' quotas (A, C, D, H, I, M, R, T, Z) are checked; another family's type, or
a quota that cannot be read (no servicequotas:GetServiceQuota), is named as unchecked, never passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import ClusterConfig
from .aws import botocore_errors, error_code, quotas_client
from .instances import describe

STANDARD_FAMILIES = "acdhimrtz"
# Quota code and name, by market.
QUOTAS = {"on-demand": ("L-1216C47A", "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
          "spot": ("L-34B43A08", "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests")}


@dataclass(frozen=True)
class Preflight:
    checked: tuple[str, ...]    # what passed, one line each
    failures: tuple[str, ...]   # what would make the launch fail, with what to do
    unchecked: tuple[str, ...]  # what could not be checked, and why


def check(client, cfg: ClusterConfig, *, image: dict[str, Any], nworkers: int) -> Preflight:
    """Check key pair, architectures and vCPU quotas; create nothing."""
    checked: list[str] = []
    failures: list[str] = []
    unchecked: list[str] = []
    try:
        client.describe_key_pairs(KeyNames=[cfg.key_name])
        checked.append(f"key pair {cfg.key_name} exists")
    except botocore_errors() as exc:
        if error_code(exc) != "InvalidKeyPair.NotFound":
            raise
        failures.append(f"key pair '{cfg.key_name}' does not exist in {cfg.region}: check key_name in {cfg.source}, "
                        f"or import your public key with aws ec2 import-key-pair")
    kinds = _instance_types(client, cfg, failures)
    arch = image.get("Architecture", "x86_64")
    for kind, info in sorted(kinds.items()):
        supported = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
        if arch in supported:
            checked.append(f"{kind} runs {arch} like {image['ImageId']}")
        else:
            failures.append(f"{image['ImageId']} is an {arch} image and {kind} runs {', '.join(supported) or 'nothing'}"
                            f": choose an {arch} instance type or an image built for {', '.join(supported)}")
    if len(kinds) == len({cfg.master_type, cfg.instance_type}):
        _quotas(client, cfg, kinds, nworkers, checked, failures, unchecked)
    return Preflight(checked=tuple(checked), failures=tuple(failures), unchecked=tuple(unchecked))


def _instance_types(client, cfg: ClusterConfig, failures: list[str]) -> dict[str, dict[str, Any]]:
    kinds = sorted({cfg.master_type, cfg.instance_type})
    try:
        found = client.describe_instance_types(InstanceTypes=kinds)["InstanceTypes"]
    except botocore_errors() as exc:
        if not (error_code(exc) or "").startswith("InvalidInstanceType"):
            raise
        failures.append(f"EC2 does not know instance type {' or '.join(kinds)} in {cfg.region} "
                        f"({error_code(exc)}); check instance_type and master_instance_type")
        return {}
    return {t["InstanceType"]: t for t in found}


def vcpu_need(cfg: ClusterConfig, kinds: dict[str, dict[str, Any]], nworkers: int) -> dict[str, int]:
    """vCPUs of the standard families this cluster needs, by market."""
    need = {"on-demand": 0, "spot": 0}
    for kind, count, market in ((cfg.master_type, 1, "on-demand"),
                                (cfg.instance_type, nworkers, "spot" if cfg.spot else "on-demand")):
        if kind[0] in STANDARD_FAMILIES:
            need[market] += count * kinds[kind]["VCpuInfo"]["DefaultVCpus"]
    return need


def _quotas(client, cfg: ClusterConfig, kinds: dict[str, dict[str, Any]], nworkers: int,
            checked: list[str], failures: list[str], unchecked: list[str]) -> None:
    other = sorted(k for k in kinds if k[0] not in STANDARD_FAMILIES)
    if other:
        unchecked.append(f"vCPU quota of {', '.join(other)} (only the standard families' quotas are checked)")
    need = {market: n for market, n in vcpu_need(cfg, kinds, nworkers).items() if n}
    if not need:
        return
    in_use = _in_use(client, kinds)
    service = quotas_client(cfg.region)
    for market, wanted in need.items():
        code, name = QUOTAS[market]
        try:
            quota = int(service.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])
        except botocore_errors() as exc:
            unchecked.append(f"{market} vCPU quota {code} (Service Quotas answered "
                             f"{error_code(exc) or type(exc).__name__})")
            continue
        line = (f"{market} vCPUs: the cluster needs {wanted}, {in_use[market]} of your {quota} ({code}) are in use")
        if in_use[market] + wanted <= quota:
            checked.append(line)
        else:
            failures.append(f"{line}: ask for at least {in_use[market] + wanted} in Service Quotas ('{name}'), "
                            f"or use fewer or smaller instances"
                            + (", or workers on demand" if market == "spot" else ""))


def _in_use(client, kinds: dict[str, dict[str, Any]]) -> dict[str, int]:
    """vCPUs of the standard families that run in the region now (anyone's), by market."""
    running = [i for i in describe(client, {"Name": "instance-state-name", "Values": ["pending", "running"]})
               if i["InstanceType"][0] in STANDARD_FAMILIES]
    # CpuOptions says what an instance really has; without it, the type's default.
    unknown = sorted({i["InstanceType"] for i in running if not i.get("CpuOptions")} - set(kinds))
    defaults = {kind: info["VCpuInfo"]["DefaultVCpus"] for kind, info in kinds.items()}
    for start in range(0, len(unknown), 100):
        for info in client.describe_instance_types(InstanceTypes=unknown[start:start + 100])["InstanceTypes"]:
            defaults[info["InstanceType"]] = info["VCpuInfo"]["DefaultVCpus"]
    in_use = {"on-demand": 0, "spot": 0}
    for inst in running:
        cpu = inst.get("CpuOptions")
        vcpus = cpu["CoreCount"] * cpu.get("ThreadsPerCore", 1) if cpu else defaults.get(inst["InstanceType"], 1)
        in_use["spot" if inst.get("InstanceLifecycle") == "spot" else "on-demand"] += vcpus
    return in_use
