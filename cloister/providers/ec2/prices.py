"""EC2 list prices, for the cost estimates of status, --dry-run and a config's ``budget``.

A maintained table, not a live query: us-east-1 Linux on-demand prices in $/hour as of PRICES_DATE,
times a region's factor (the ratio of its list prices to us-east-1's, which holds within a few percent
across the general-purpose families). A type or region not listed here is shown as unknown, never
guessed or left out. Spot workers are priced at their spot price (DescribeSpotPriceHistory); EBS and
public IPv4 addresses are counted too.
"""

from __future__ import annotations

# Price per hour relative to the family's "large" size; EC2 prices scale linearly within a family.
_SIZE_FACTOR = {
    "nano": 1 / 16, "micro": 1 / 8, "small": 1 / 4, "medium": 1 / 2, "large": 1, "xlarge": 2,
    "2xlarge": 4, "4xlarge": 8, "8xlarge": 16, "9xlarge": 18, "12xlarge": 24, "16xlarge": 32,
    "18xlarge": 36, "24xlarge": 48, "32xlarge": 64, "48xlarge": 96,
}

_M5_SIZES = ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge", "24xlarge")
_M6_SIZES = _M5_SIZES + ("32xlarge",)
_M7_SIZES = _M5_SIZES + ("48xlarge",)
_A6_SIZES = _M6_SIZES + ("48xlarge",)
_C5_SIZES = ("large", "xlarge", "2xlarge", "4xlarge", "9xlarge", "12xlarge", "18xlarge", "24xlarge")
_C5N_SIZES = ("large", "xlarge", "2xlarge", "4xlarge", "9xlarge", "18xlarge")
_T3_SIZES = ("nano", "micro", "small", "medium", "large", "xlarge", "2xlarge")
_GRAVITON_SIZES = ("medium", "large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "12xlarge", "16xlarge")

# family -> (price of the "large" size in $/hour, the sizes EC2 offers)
_FAMILIES: dict[str, tuple[float, tuple[str, ...]]] = {
    "t3": (0.0832, _T3_SIZES),
    "t3a": (0.0752, _T3_SIZES),
    "m5": (0.096, _M5_SIZES),
    "m5a": (0.086, _M5_SIZES),
    "m5n": (0.119, _M5_SIZES),
    "m6i": (0.096, _M6_SIZES),
    "m6a": (0.0864, _A6_SIZES),
    "m7i": (0.1008, _M7_SIZES),
    "m6g": (0.077, _GRAVITON_SIZES),
    "m7g": (0.0816, _GRAVITON_SIZES),
    "c5": (0.085, _C5_SIZES),
    "c5a": (0.077, _M5_SIZES),
    "c5n": (0.108, _C5N_SIZES),
    "c6i": (0.085, _M6_SIZES),
    "c6a": (0.0765, _A6_SIZES),
    "c7i": (0.08925, _M7_SIZES),
    "c6g": (0.068, _GRAVITON_SIZES),
    "c7g": (0.0725, _GRAVITON_SIZES),
    "r5": (0.126, _M5_SIZES),
    "r5n": (0.149, _M5_SIZES),
    "r6i": (0.126, _M6_SIZES),
    "r7i": (0.1323, _M7_SIZES),
    "r6g": (0.1008, _GRAVITON_SIZES),
    "r7g": (0.1071, _GRAVITON_SIZES),
    "i3": (0.156, ("large", "xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")),
}

ON_DEMAND: dict[str, float] = {
    f"{family}.{size}": round(large * _SIZE_FACTOR[size], 5)
    for family, (large, sizes) in _FAMILIES.items() for size in sizes
}

PRICES_DATE = "2024-06"
# Region list prices relative to us-east-1 (on-demand Linux and gp3 alike).
REGION_FACTOR: dict[str, float] = {
    "us-east-1": 1.0, "us-east-2": 1.0, "us-west-2": 1.0, "us-west-1": 1.17, "ca-central-1": 1.11,
    "eu-west-1": 1.11, "eu-west-2": 1.16, "eu-west-3": 1.16, "eu-central-1": 1.19, "eu-north-1": 1.06,
    "ap-northeast-1": 1.29, "ap-northeast-2": 1.23, "ap-southeast-1": 1.25, "ap-southeast-2": 1.25,
    "ap-south-1": 1.05, "sa-east-1": 1.59,
}
GP3_GB_MONTH = 0.08           # us-east-1, $ per GB-month
HOURS_PER_MONTH = 730
PUBLIC_IPV4_HOURLY = 0.005    # every public IPv4 address, in use or not, since 2024-02

NOTE = f"estimated from EC2 list prices of {PRICES_DATE} (cloister/providers/ec2/prices.py)"


def hourly(instance_type: str, region: str | None = "us-east-1") -> float | None:
    """The on-demand list price of ``instance_type`` in ``region`` in $/hour, or None when unknown."""
    base, factor = ON_DEMAND.get(instance_type), REGION_FACTOR.get(region or "")
    return None if base is None or factor is None else round(base * factor, 5)


def ebs_hourly(gigabytes: float, region: str | None) -> float | None:
    factor = REGION_FACTOR.get(region or "")
    return None if factor is None else gigabytes * GP3_GB_MONTH * factor / HOURS_PER_MONTH


def cluster_hourly(*, master_type: str, worker_type: str, nworkers: int,
                   region: str | None = "us-east-1") -> float | None:
    """$/hour of one master and ``nworkers`` workers on demand, or None if either type is unknown."""
    master, worker = hourly(master_type, region), hourly(worker_type, region)
    if master is None or (nworkers and worker is None):
        return None
    return master + nworkers * (worker or 0.0)


def dollars(amount: float | None) -> str:
    return "unknown" if amount is None else f"${amount:,.2f}"
