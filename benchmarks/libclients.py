#!/usr/bin/env python3
"""What a user could script instead of cloister: one command on every host with asyncssh or parallel-ssh 2.

    libclients.py asyncssh|parallel-ssh HOSTS_FILE USER KEY KNOWN_HOSTS COMMAND

Prints each host's output under a ``[host]`` line and exits non-zero if any host failed, so that
benchmarks/fanout.py times it as a whole process beside ``inv cluster.run``, pssh and clush.
asyncssh checks host keys against KNOWN_HOSTS; parallel-ssh 2's native client checks none (it has no
known_hosts option), which only makes it faster. Both come with ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import asyncio
import sys


def with_asyncssh(hosts: list[str], user: str, key: str, known_hosts: str, command: str) -> int:
    import asyncssh  # noqa: PLC0415 - only the tool being timed is imported

    async def one(host: str):
        async with asyncssh.connect(host, username=user, client_keys=[key], known_hosts=known_hosts,
                                    agent_path=None, config=None) as conn:
            return await conn.run(command)

    async def every() -> list:
        return await asyncio.gather(*(one(host) for host in hosts), return_exceptions=True)

    failed = 0
    for host, result in zip(hosts, asyncio.run(every())):
        if isinstance(result, BaseException):
            print(f"[{host}] error: {result}", file=sys.stderr)
            failed += 1
            continue
        print(f"[{host}]\n{result.stdout}", end="")
        failed += result.exit_status != 0
    return 1 if failed else 0


def with_parallel_ssh(hosts: list[str], user: str, key: str, known_hosts: str, command: str) -> int:
    from pssh.clients import ParallelSSHClient  # noqa: PLC0415 - only the tool being timed is imported

    client = ParallelSSHClient(hosts, user=user, pkey=key, pool_size=len(hosts), num_retries=1)
    output = client.run_command(command, stop_on_errors=False)
    client.join(output)
    failed = 0
    for host_out in output:
        if host_out.exception is not None:
            print(f"[{host_out.host}] error: {host_out.exception}", file=sys.stderr)
            failed += 1
            continue
        text = "".join(line + "\n" for line in host_out.stdout)
        print(f"[{host_out.host}]\n{text}", end="")
        failed += host_out.exit_code != 0
    return 1 if failed else 0


TOOLS = {"asyncssh": with_asyncssh, "parallel-ssh": with_parallel_ssh}


def main() -> None:
    if len(sys.argv) != 7 or sys.argv[1] not in TOOLS:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    tool, hosts_file, user, key, known_hosts, command = sys.argv[1:]
    with open(hosts_file) as lines:
        hosts = [line.strip() for line in lines if line.strip()]
    sys.exit(TOOLS[tool](hosts, user, key, known_hosts, command))


if __name__ == "__main__":
    main()
