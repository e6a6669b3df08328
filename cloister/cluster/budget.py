"""A cluster's ``budget``: a warning at 80 % of it, and the check a sweep makes before each run."""

from __future__ import annotations

from ..config import ClusterConfig
from ..providers.base import NodeStatus

WARN_AT = 0.8


def spent(rows: list[NodeStatus]) -> float:
    """Dollars spent so far by the nodes whose price is known."""
    return sum(r.cost_usd or 0.0 for r in rows)


def unenforceable(cfg: ClusterConfig, rows: list[NodeStatus]) -> str | None:
    """Why the budget cannot be enforced: nodes whose price is unknown (never counted as $0); else None."""
    unknown = [r for r in rows if r.cost_usd is None]
    if cfg.budget is None or not unknown:
        return None
    kinds = ", ".join(sorted({r.type for r in unknown}))
    return (f"the ${cfg.budget:,.2f} budget of '{cfg.cluster_name}' cannot be enforced: {len(unknown)} of its "
            f"{len(rows)} nodes are of unknown price ({kinds}); launch listed types or drop `budget`")


def warning(cfg: ClusterConfig, rows: list[NodeStatus]) -> str | None:
    """A warning once the cluster has spent 80 % of the config's ``budget``, or when the budget cannot
    be enforced."""
    cannot = unenforceable(cfg, rows)
    if cannot:
        return cannot
    total = spent(rows)
    if cfg.budget is None or total < WARN_AT * cfg.budget:
        return None
    return (f"'{cfg.cluster_name}' has spent ${total:,.2f} of its ${cfg.budget:,.2f} budget "
            f"({total / cfg.budget:.0%}); inv cluster.stop or inv cluster.destroy ends the spending")


def would_cross(cfg: ClusterConfig, rows: list[NodeStatus], *, seconds: float) -> str | None:
    """Why a run of about ``seconds`` must not start: it would take the cluster past its budget; else None."""
    if cfg.budget is None:
        return None
    cannot = unenforceable(cfg, rows)
    if cannot:
        return cannot
    hourly = sum(r.hourly_usd or 0.0 for r in rows)
    expected = spent(rows) + hourly * seconds / 3600
    if expected <= cfg.budget:
        return None
    return (f"budget: '{cfg.cluster_name}' has spent ${spent(rows):,.2f} and costs ${hourly:,.2f}/hour; a run of "
            f"about {seconds:.0f}s would take it past its ${cfg.budget:,.2f} budget")
