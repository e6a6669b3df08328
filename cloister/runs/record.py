"""run.json: what one run did, as a typed record, and the run ids that name runs."""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ExperimentError
from ..files import atomic_write

RECORD_FILE = "run.json"
RUN_ID_FORMAT = "%Y%m%d-%H%M%S"
RUN_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{4}")


def new_run_id() -> str:
    """UTC timestamp (second resolution) plus a short random suffix."""
    return datetime.now(timezone.utc).strftime(RUN_ID_FORMAT) + "-" + secrets.token_hex(2)


def validate_run_id(run_id: str) -> str:
    if not RUN_ID_RE.fullmatch(run_id):
        raise ExperimentError(f"run id {run_id!r}: expected YYYYMMDD-HHMMSS-xxxx (see inv exp.list)")
    return run_id


def now() -> str:
    """The current UTC time as run.json records it."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Proc:
    """One process of a run on one host."""

    role: str
    host: str
    index: int | None
    port: int | None
    command: str
    pid: int | None = None
    status: str = "pending"
    exit: int | None = None

    @property
    def key(self) -> str:
        return f"{self.role}{'' if self.index is None else self.index}"


@dataclass(frozen=True)
class RunHosts:
    master: str
    workers: list[str]


@dataclass(frozen=True)
class GitState:
    """The commit of the directory a run was started from, and whether tracked files had changed."""

    commit: str | None
    dirty: bool | None

    @classmethod
    def of(cls, path: Path) -> GitState:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                    timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                                   capture_output=True, text=True, timeout=5).stdout.strip() != ""
        except (OSError, subprocess.TimeoutExpired):
            return cls(commit=None, dirty=None)
        return cls(commit=commit or None, dirty=dirty if commit else None)


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """Everything run.json holds about one run; the fields are its keys, in its order."""

    benchmark: str
    run_id: str
    status: str  # running, ok, failed, timeout, interrupted, killed, incomplete, or "started by hand"
    error: str | None
    k: int
    p: int
    args: list[str]
    manager: bool
    keep: bool
    timeout_s: float
    hosts: RunHosts
    cluster: str
    provider: str
    config: str
    git: GitState
    cloister_version: str
    started: str
    ended: str | None
    timings: dict[str, float]
    exit_codes: dict[str, int | None]
    roles: list[Proc]
    failures: dict[str, str]
    metric: float | str | None
    # {"declared": experiments.yaml's prepare, "hosts": {host: [{"item", "status", "detail"}, ...]}};
    # empty in a record written before runs listed their preparation.
    preparation: dict[str, Any] = field(default_factory=dict)
    # {"interval_s": seconds, "hosts": {host: peaks, means and totals}} (cloister.runs.resources);
    # empty when the run was not sampled or was recorded before runs were.
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def total_s(self) -> float | None:
        return self.timings.get("total_s")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        """Raises ValueError for anything but a complete record."""
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default_factory is dataclasses.MISSING}
        if not isinstance(data, dict) or not required <= set(data) <= names:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a run record (keys: {keys})")
        try:
            return cls(**{**data, "hosts": RunHosts(**data["hosts"]), "git": GitState(**data["git"]),
                          "roles": [Proc(**role) for role in data["roles"]]})
        except TypeError as err:
            raise ValueError(f"not a run record ({err})") from None

    def write(self, directory: Path) -> Path:
        return atomic_write(directory / RECORD_FILE, self.to_json())

    @classmethod
    def read(cls, directory: Path) -> RunRecord:
        """Raises OSError or ValueError."""
        return cls.from_json((directory / RECORD_FILE).read_text())


def merge_by_hand(record: RunRecord, directory: Path) -> RunRecord:
    """``record`` of roles started by hand added to the run.json already in ``directory``, if any."""
    try:
        earlier = RunRecord.read(directory)
    except (OSError, ValueError):
        return record
    hosts = {**earlier.preparation.get("hosts", {}), **record.preparation.get("hosts", {})}
    return dataclasses.replace(record, roles=earlier.roles + record.roles, started=earlier.started,
                               exit_codes={**earlier.exit_codes, **record.exit_codes},
                               preparation={**record.preparation, "hosts": hosts})
