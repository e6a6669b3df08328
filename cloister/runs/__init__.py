"""Experiment runs: one run id, detached remote processes, readiness, logs, clean-up.

On each host every file of a run lives in ``cloister.layout.run_dir(benchmark, run_id)``
(``~/cloister/runs/{benchmark}/{run_id}/``): ``{role}{i}_{run_id}.log``, ``pids`` (``PID ROLE INDEX
PORT`` per process; each PID leads its own process group) ``{role}{i}.exit`` written when a process
ends by itself, and on the master ``state.json`` while the run is in flight (``detached``). Locally, a
run is ``{runs_dir}/{benchmark}/{run_id}/`` with one folder per host and
``run.json`` (``RunRecord``).

- ``spec``: ``RunSpec``, what a run is asked to do;
- ``orchestration``: ``Run``, doing it;
- ``readiness``: waiting until the processes listen with their own sockets (or log their ready line);
- ``lock``: one run at a time per cluster, a lock file on the master;
- ``scripts``: the shell scripts sent to the hosts and the parsers of their output;
- ``record``: ``RunRecord`` (run.json) and run ids;
- ``logs``: downloading, removing, listing and reading logs;
- ``resources``: the /proc sampler beside each host's processes (``resources.raw``, a ``sampler`` line in
  ``pids``), and the run's ``resources.csv``, ``resources.png`` and run.json summary;
- ``present``: exp.show and exp.compare;
- ``kill``: ending a run's or a benchmark's processes outside a ``Run``;
- ``detached``: a run's state on the master (``state.json``), for exp.attach and exp.ps.
- ``experiments``: experiments.yaml (benchmarks, their commands, ports, readiness);
- ``preparation``: the ``prepare`` block (how each process is prepared);
- ``sweep``: many runs over a grid, resumable, ``results.csv``.
"""

from __future__ import annotations

from .kill import end_run, kill_run, killall
from .logs import clean_remote, download_run, local_run_dir, local_runs, read_metric
from .orchestration import Run
from .record import GitState, Proc, RunHosts, RunRecord, new_run_id, validate_run_id
from .scripts import Probe, build_command, log_name, parse_probe, start_script
from .spec import RunSpec, manager_here

__all__ = ["GitState", "Probe", "Proc", "Run", "RunHosts", "RunRecord", "RunSpec", "build_command", "clean_remote", "download_run",
           "end_run", "kill_run", "killall", "local_run_dir", "local_runs", "log_name", "manager_here", "new_run_id",
           "parse_probe", "read_metric", "start_script", "validate_run_id"]
