"""Experiment runs: one run id, detached remote processes, readiness, logs, clean-up.

On each host every file of a run lives in ``cloister.layout.run_dir(benchmark, run_id)``
(``~/cloister/runs/{benchmark}/{run_id}/``): ``{role}{i}_{run_id}.log``, ``pids`` (``PID ROLE INDEX
PORT`` per process; each PID leads its own process group) ``{role}{i}.exit`` written when a process
ends by itself (``.started``/``.ended``: the host's times), and on the master ``state.json`` while the run
is in flight (``detached``), ``follower`` (``claim``) and ``outcome.json`` (``conclusion``); every process
of a run carries ``CLOISTER_RUN_ID`` in its environment (``scripts.RUN_MARK``). Locally, a
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
- ``by_hand``: one role started by hand (exp.manager, exp.workers, exp.master);
- ``kill``: ending a run's or a benchmark's processes outside a ``Run``;
- ``detached``: a run's state on the master (``state.json``), for exp.attach and exp.ps;
- ``claim``: who follows a run (one session at a time, heartbeats, taking over a frozen one);
- ``follow``: streaming the master's log;
- ``conclusion``: how a run ended, read back from its downloaded folder;
- ``finish``: ending a run from outside its session, completing a record (exp.killall, destroy, exp.logs);
- ``experiments``: experiments.yaml (benchmarks, their commands, ports, readiness), read by ``yamlfile``;
- ``preparation``: the ``prepare`` block (how each process is prepared);
- ``sweep``: many runs over a grid, resumable, ``results.csv``.
"""

from __future__ import annotations

import importlib

# Each name is imported from its module on first use (PEP 562): a task that does not run experiments
# (cluster.run, say) does not pay for importing the orchestration.
_HOME = {
    "end_kept": "kill", "end_run": "kill", "kill_run": "kill", "killall": "kill",
    "clean_remote": "logs", "download_run": "logs", "local_run_dir": "logs", "local_runs": "logs",
    "read_metric": "logs",
    "Run": "orchestration",
    "GitState": "record", "Proc": "record", "RunHosts": "record", "RunRecord": "record", "new_run_id": "record",
    "validate_run_id": "record",
    "Probe": "scripts", "build_command": "scripts", "log_name": "scripts", "parse_probe": "scripts",
    "start_script": "scripts",
    "RunSpec": "spec", "manager_here": "spec",
    "start_by_hand": "by_hand",
    "collect": "finish", "end_before_destroy": "finish", "end_in_flight": "finish", "runs_in_flight": "finish",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["GitState", "Probe", "Proc", "Run", "RunHosts", "RunRecord", "RunSpec", "build_command", "clean_remote",
           "collect", "download_run", "end_before_destroy", "end_in_flight", "end_kept", "end_run", "kill_run",
           "killall", "local_run_dir", "local_runs", "log_name", "manager_here", "new_run_id", "parse_probe",
           "read_metric", "runs_in_flight", "start_by_hand", "start_script", "validate_run_id"]
