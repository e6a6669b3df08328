"""What a run is asked to do: one value, checked before anything connects."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import ExperimentError
from .experiments import Benchmark, RunShape, render
from ..cluster.servers import ClusterInfo, Node
from ..settings import Settings
from .logs import local_run_dir
from .prepare import SHARED_KERNEL, NodeFacts, this_boot_id
from .record import validate_run_id
from .scripts import local_command


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run: the benchmark on the master and the first ``k`` workers, ``nprocs`` worker processes each."""

    info: ClusterInfo
    bench: Benchmark
    k: int
    nprocs: int
    run_id: str
    settings: Settings  # runs_dir for the local copies; concurrency and connect_timeout for SSH
    args: list[str] = field(default_factory=list)
    timeout: float | None = None  # seconds the master may run; None: the benchmark's timeout
    manager: bool = True
    keep: bool = False
    concurrent: bool = False  # run beside a run in flight on the cluster instead of refusing (ports differ)
    config_name: str = ""
    resources: float | None = None  # seconds between resource samples; 0: none; None: the benchmark's

    def __post_init__(self) -> None:
        bench, workers = self.bench, self.info.workers
        if self.info.master is None:
            raise ExperimentError("the cluster has no master", benchmark=bench.name)
        if self.k < 1 or self.k > len(workers):
            raise ExperimentError(f"-k {self.k}: the cluster has {len(workers)} workers (servers.txt); "
                                  f"expected 1..{len(workers)}", benchmark=bench.name)
        if self.nprocs < 1 or bench.worker_base + self.nprocs - 1 > 65535:
            raise ExperimentError(f"-p {self.nprocs}: expected 1..{65536 - bench.worker_base} processes per host",
                                  benchmark=bench.name)
        validate_run_id(self.run_id)
        last = bench.worker_port(max(self.worker_processes, 1) - 1)
        for role, port in (("manager", bench.manager_port), ("master", bench.master_port)):
            if bench.worker_base <= port <= last:
                raise ExperimentError(f"{bench.source}: benchmark '{bench.name}': key 'ports.{role}': {port} is also "
                                      f"worker process {port - bench.worker_base}'s port with -p {self.nprocs}; "
                                      f"expected a port outside {bench.worker_base}-{last}", benchmark=bench.name)

    @property
    def master(self) -> Node:
        return self.info.master

    @property
    def workers(self) -> list[Node]:
        return self.info.workers[:self.k]

    @property
    def with_manager(self) -> bool:
        """Whether the run starts a manager: asked for (not --no-manager) and the benchmark has one."""
        return self.manager and self.bench.has("manager")

    @property
    def worker_processes(self) -> int:
        """Worker processes started on each worker host: P, one (given P), or none (no worker role)."""
        if not self.bench.has("worker"):
            return 0
        return 1 if self.bench.workers_per_host == "one" else self.nprocs

    @property
    def hostfile(self) -> str:
        """The run's OpenMPI hostfile ({hostfile}, on the master): its K worker hosts with P slots each."""
        return "".join(f"{address(w)} slots={self.nprocs} max-slots={self.nprocs}\n" for w in self.workers)

    @property
    def master_timeout(self) -> float:
        return self.timeout or self.bench.timeout

    @property
    def sample_interval(self) -> float:
        """Seconds between resource samples on each host; 0: the run is not sampled."""
        return self.bench.resources if self.resources is None else self.resources

    @property
    def local_dir(self) -> Path:
        return local_run_dir(self.settings.runs_dir, benchmark=self.bench.name, run_id=self.run_id)

    @cached_property
    def shape(self) -> RunShape:
        bench = self.bench
        return RunShape(run_id=self.run_id, k=self.k, nprocs=self.nprocs, manager=address(self.master),
                        worker_hosts=[address(w) for w in self.workers],
                        worker_endpoints=[(address(w), bench.worker_port(j)) for w in self.workers
                                          for j in range(self.worker_processes)],
                        args=self.args)

    def node_facts(self, node: Node) -> NodeFacts:
        """What the preparation of ``node`` needs to know; where the provider does not record whether its
        nodes share this machine's kernel, the node's boot id tells."""
        return NodeFacts(public=node.public or node.host, shared_kernel=bool(self.info.extra.get(SHARED_KERNEL, False)),
                         boot_id=this_boot_id())

    def command(self, role: str, node: Node, *, port: int | None = None, index: int | None = None) -> str:
        """The role's command line for ``node``."""
        return render(self.bench, role, self.shape, host=address(node), port=port, index=index)


def address(node: Node) -> str:
    """The address the run's processes use to reach ``node``: the private one when it has one."""
    return node.private or node.host


def manager_here(spec: RunSpec) -> str:
    """The manager's command for this machine's shell, as if logged in to the master (exp.manager --local)."""
    return local_command(spec.bench, spec.command("manager", spec.master, port=spec.bench.manager_port),
                         public=spec.node_facts(spec.master).public)
