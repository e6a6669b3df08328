"""Domain errors. Tasks turn any CloisterError into ``invoke.Exit(str(err))``."""

from __future__ import annotations


class CloisterError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""


class ConfigError(CloisterError):
    """A config file (or experiments.yaml) is missing, malformed or invalid."""

    def __init__(self, *, file: str, key: str | None = None, expected: str):
        self.file = file
        self.key = key
        self.expected = expected
        where = f"{file}: key '{key}'" if key else file
        super().__init__(f"{where}: {expected}")


class ServersError(CloisterError):
    """servers/ is missing, unreadable or describes another cluster."""

    def __init__(self, message: str, *, path: str):
        self.path = path
        super().__init__(message)


class ProviderError(CloisterError):
    """A provider (local, static, ec2) could not do what was asked."""

    def __init__(self, message: str, *, provider: str, cluster: str | None = None):
        self.provider = provider
        self.cluster = cluster
        super().__init__(message)


class HostsFailed(CloisterError):
    """One or more hosts failed; ``failures`` maps host -> one-line error."""

    def __init__(self, failures: dict[str, str], *, total: int, what: str = "", hint: str = ""):
        self.failures = dict(failures)
        self.total = total
        self.what = what
        self.hint = hint
        lines = [f"[{host}] {err}" for host, err in self.failures.items()]
        summary = f"{len(self.failures)}/{total} hosts failed"
        if what:
            summary = f"{what}: {summary}"
        lines.append(summary)
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ExperimentError(CloisterError):
    """An experiment definition or run failed."""

    def __init__(self, message: str, *, benchmark: str | None = None, run_id: str | None = None):
        self.benchmark = benchmark
        self.run_id = run_id
        super().__init__(message)


class RunTimeout(ExperimentError):
    """The master of a run did not finish within its timeout."""

    def __init__(self, message: str, *, benchmark: str, run_id: str, timeout: float):
        self.timeout = timeout
        super().__init__(message, benchmark=benchmark, run_id=run_id)


class RunFollowed(ExperimentError):
    """Another session follows the run (``frozen``: it lives but no longer answers); it was not taken."""

    def __init__(self, message: str, *, benchmark: str, run_id: str, frozen: bool):
        self.frozen = frozen
        super().__init__(message, benchmark=benchmark, run_id=run_id)


class AwsError(CloisterError):
    """An AWS call failed; ``code`` is AWS's error code or botocore's exception name."""

    def __init__(self, message: str, *, code: str, operation: str | None = None, region: str | None = None,
                 cluster: str | None = None):
        self.code = code
        self.operation = operation
        self.region = region
        self.cluster = cluster
        super().__init__(message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised again once the clean-up it set off has finished; ``outcome`` says what that clean-up
    did, as a person should hear it ("ended the 5 hosts it had started")."""

    def __init__(self, outcome: str):
        self.outcome = outcome
        super().__init__(outcome)
