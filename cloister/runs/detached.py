"""A run that outlives its ``inv``: its state on the master, finding it again, and the runs in flight.

Before its first process starts, a run writes ``state.json`` into its folder on the master (``RunState``:
its parameters, hosts, processes and phase, kept current through every phase: what exp.attach, exp.killall
--run and exp.ps need to find and finish it from anywhere); who follows it is ``claim``'s. The run's
conclusion renames ``state.json`` to ``state.ended.json`` once its record is written, so the runs in
flight are exactly the run folders on the master that hold a ``state.json``. A run kept with --keep also
gets ``kept`` there when it concludes: exp.ps lists it until exp.killall ends its processes.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass

from fabric import Connection

from ..transport import hosts, remote
from ..errors import ExperimentError
from . import claim
from .conclusion import OUTCOME_FILE
from .experiments import Registry
from ..layout import RUNS_DIR, run_dir
from ..cluster.servers import ClusterInfo
from ..settings import Settings
from .record import GitState, Proc, RunHosts, validate_run_id
from .spec import RunSpec

STATE_FILE = "state.json"
ENDED_FILE = "state.ended.json"  # the state of a run that has concluded
KEPT_FILE = "kept"  # beside ENDED_FILE: the run's other processes were left running (--keep) and still may be
PHASES = ("starting", "manager", "workers", "master")  # the phase that began last
SAVE_TIMEOUT = 30.0  # seconds to write the state on the master
_STATE_MARK = "\x1eSTATE "  # precedes each state in _states_script's output: no JSON line starts with it


@dataclass(frozen=True, kw_only=True)
class RunState:
    """What a run in flight is, as its master's run folder records it."""

    benchmark: str
    run_id: str
    k: int
    p: int
    args: list[str]
    manager: bool
    keep: bool
    timeout: float | None
    resources: float | None
    lock: bool  # the run holds the cluster's run lock (not --concurrent)
    config: str
    hosts: RunHosts
    started: str
    t0: float  # the run's start, epoch seconds: the phase timings are offsets from it
    timings: dict[str, float]
    git: GitState
    procs: list[Proc]
    prepared: dict[str, list[dict[str, str]]]
    phase: str = "master"

    @property
    def master_started(self) -> bool:
        return PHASES.index(self.phase) >= PHASES.index("master") and any(p.role == "master" for p in self.procs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RunState:
        """Raises ValueError for anything but a complete state."""
        try:
            data = json.loads(text)
            return cls(**{**data, "hosts": RunHosts(**data["hosts"]), "git": GitState(**data["git"]),
                          "procs": [Proc(**p) for p in data["procs"]]})
        except (TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"not a run state ({err})") from None


def save(cxn: Connection, *, state: RunState, then: str | None = None) -> None:
    """Write ``state`` into the run's folder on the master ``cxn`` (atomically), then run ``then`` there (the
    claim of a new run). The state goes on stdin, not in the command: a run of many processes has a state
    larger than a command line may be."""
    rdir = run_dir(state.benchmark, state.run_id)
    err = bytearray()
    script = f"mkdir -p {rdir} && cat > {rdir}/{STATE_FILE}.tmp && mv -f {rdir}/{STATE_FILE}.tmp {rdir}/{STATE_FILE}"
    if then:
        script += f" && {{\n{then}\n}} >/dev/null"
    try:
        code = remote.execute(cxn, script, stdout=_discard, stderr=err.extend, timeout=SAVE_TIMEOUT, guard=False,
                              data=state.to_json().encode() + b"\n")
        err_lines = err.decode(errors="replace").strip().splitlines()
    except Exception as exc:  # noqa: BLE001 - a lost session or a timeout: one line, as every host error
        err_lines, code = [hosts.describe_error(exc)], -1
    if code != 0:
        raise ExperimentError(f"[{cxn.host}] could not record the run's state: "
                              + (err_lines[-1] if err_lines else f"exit {code}"),
                              benchmark=state.benchmark, run_id=state.run_id)


def conclude_script(benchmark: str, run_id: str, *, kept: bool = False) -> str:
    """The run is no longer in flight: its state kept as ended (safe on hosts without its folder). A run
    ``kept`` (--keep) stays listed by exp.ps, marked, until exp.killall ends its processes."""
    rdir = run_dir(benchmark, run_id)
    mark = f" && touch {rdir}/{KEPT_FILE}" if kept else ""
    return f"if [ -e {rdir}/{STATE_FILE} ]; then mv -f {rdir}/{STATE_FILE} {rdir}/{ENDED_FILE}{mark}; fi"


def forget_kept_script(benchmark: str, run_id: str = "*") -> str:
    """The benchmark's kept runs (or only ``run_id``) are over: exp.killall has just ended their processes."""
    run = "*" if run_id == "*" else shlex.quote(run_id)
    return f'rm -f "$HOME"/{RUNS_DIR}/{shlex.quote(benchmark)}/{run}/{KEPT_FILE}'


def _states_script(run_id: str | None, *, kept: bool) -> str:
    """Print every run in flight on this master (or only ``run_id``): a marker line with whether a session
    follows it (``claim.status_lines``; ``kept`` for a kept run, listed with ``kept``) and the last line of its
    master's log, then its state."""
    folders = f'"$HOME"/{RUNS_DIR}/*/{shlex.quote(run_id) if run_id else "*"}'
    last = "tail -n 1 \"$d\"/master_\"$(basename \"$d\")\".log 2>/dev/null | tr -d '\\r\\036'"
    return "\n".join([
        f"for s in {folders}/{STATE_FILE}" + (f" {folders}/{KEPT_FILE}" if kept else "")
        + "; do [ -f \"$s\" ] || continue; d=$(dirname \"$s\")",
        f'  case "$s" in */{KEPT_FILE}) s="$d"/{ENDED_FILE}; fl=kept; c=0;; *) ' + claim.status_lines() + "; "
        f'c=0; [ -e "$d"/{OUTCOME_FILE} ] && c=1;; esac',
        f'  printf "{_STATE_MARK.replace(chr(0x1e), chr(92) + "036")}%s %s %s\\n" "$fl" "$c" "$({last})"; cat "$s"',
        "done; true",
    ])


@dataclass(frozen=True)
class InFlight:
    """A run in flight as its master tells: its state, whether a session follows it (yes, no, or frozen: its
    session lives but has stopped beating), its master's last line."""

    state: RunState
    followed: str
    last_line: str
    concluding: bool = False  # a session began to end it (its verdict is on the master) and did not finish
    kept: bool = False  # it has concluded, its other processes left running (--keep)


def in_flight(cxn: Connection, *, run_id: str | None = None, kept: bool = False) -> list[InFlight]:
    """The runs in flight on the cluster whose master is ``cxn`` (or only ``run_id``), oldest first; with
    ``kept``, also the runs that have concluded with their processes left running (--keep)."""
    out = cxn.run(_states_script(run_id, kept=kept), warn=False, hide=True, timeout=30).stdout
    found = []
    for chunk in out.split(_STATE_MARK)[1:]:
        head, _, body = chunk.partition("\n")
        live, concluding, last = (head.split(" ", 2) + ["", ""])[:3]
        try:
            found.append(InFlight(RunState.from_json(body.strip()), live, last.strip(), concluding == "1",
                                  kept=live == "kept"))
        except ValueError:
            continue  # a state being replaced right now, or not one of ours: not a run to act on
    return sorted(found, key=lambda f: f.state.run_id)


def find(cxn: Connection, *, run_id: str | None) -> InFlight:
    """The run ``run_id`` in flight or kept (default: the latest in flight)."""
    runs = in_flight(cxn, run_id=validate_run_id(run_id) if run_id else None, kept=run_id is not None)
    if not runs:
        raise ExperimentError(f"no run {run_id} in flight on the cluster (see inv exp.ps)" if run_id else
                              "no run in flight on the cluster (see inv exp.list for past runs)")
    return runs[-1]


def pick(cxn: Connection, *, run_id: str | None) -> RunState:
    """The run ``run_id`` in flight (default: the latest); a kept run has nothing left to follow."""
    entry = find(cxn, run_id=run_id)
    if entry.kept:
        raise ExperimentError(f"run {entry.state.run_id} has ended and was kept (--keep): its processes are still "
                              f"running; end them with inv exp.killall --run {entry.state.run_id}",
                              run_id=entry.state.run_id)
    return entry.state


def spec_of(state: RunState, *, info: ClusterInfo, registry: Registry, settings: Settings) -> RunSpec:
    """The RunSpec ``state`` was started with, on this machine's config and servers/."""
    spec = RunSpec(info=info, bench=registry.get(state.benchmark), k=state.k, nprocs=state.p, run_id=state.run_id,
                   settings=settings, args=list(state.args), timeout=state.timeout, manager=state.manager,
                   keep=state.keep, concurrent=not state.lock, config_name=state.config, resources=state.resources)
    here = RunHosts(master=spec.master.host, workers=[w.host for w in spec.workers])
    if here != state.hosts:
        raise ExperimentError(f"run {state.run_id} ran on {state.hosts.master} + {', '.join(state.hosts.workers)}, "
                              f"but servers/ here names {here.master} + {', '.join(here.workers)}",
                              run_id=state.run_id)
    return spec


def _alive_script(run_ids: list[str]) -> str:
    """``RUN ROLE 1|0`` for every recorded process of these runs on a host (1: its group is alive)."""
    words = " ".join(shlex.quote(r) for r in run_ids)
    return (f'for r in {words}; do for f in "$HOME"/{RUNS_DIR}/*/"$r"/pids; do [ -f "$f" ] || continue; '
            'while read -r p role i o; do a=0; kill -0 -- -"$p" 2>/dev/null && a=1; echo "$r $role $a"; '
            'done < "$f"; done; done; true')


RoleCounts = dict[str, dict[str, list[int]]]  # run id -> role -> [alive, dead]


def role_counts(grp: hosts.CappedGroup, *, run_ids: list[str]) -> tuple[RoleCounts, dict[str, str]]:
    """Per run, per role, [alive, dead] over the hosts of ``grp`` (the sampler left out); per-host errors."""
    result = hosts.call(grp, lambda c: c.run(_alive_script(run_ids), warn=False, hide=True, timeout=30))
    counts: RoleCounts = {r: {} for r in run_ids}
    for value in result.values():
        if isinstance(value, BaseException):
            continue
        for line in value.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] in counts and parts[1] != "sampler":
                counts[parts[0]].setdefault(parts[1], [0, 0])[0 if parts[2] == "1" else 1] += 1
    return counts, hosts.failures(result)


PS_COLUMNS = ("benchmark", "run id", "k x p", "started", "alive/all per role", "followed",
              "master's last line (or the phase it is starting)")


def ps(grp: hosts.CappedGroup, *, master: str) -> tuple[list[list[str]], dict[str, str]]:
    """exp.ps: a row per run in flight on the cluster of ``grp`` (``PS_COLUMNS``), as its hosts tell; per-host
    errors of the hosts that could not say what runs."""
    runs = in_flight(next(cxn for cxn in grp if cxn.host == master), kept=True)
    if not runs:
        return [], {}
    counts, errors = role_counts(grp, run_ids=[r.state.run_id for r in runs])
    rows = [[r.state.benchmark, r.state.run_id, f"{r.state.k} x {r.state.p}", r.state.started[:19],
             " ".join(f"{role} {a}/{a + d}" for role, (a, d) in sorted(counts[r.state.run_id].items())),
             "kept (master ended)" if r.kept else r.followed,
             r.last_line if r.state.master_started else f"({r.state.phase})"] for r in runs]
    return rows, errors


def _discard(_: bytes) -> None:
    pass
