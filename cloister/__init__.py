"""cloister: clusters for distributed-systems experiments (EC2, static machines, or local sshd hosts)."""

__version__ = "0.1.0"
