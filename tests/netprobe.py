"""Round trip and throughput between two hosts of a cluster, measured on the hosts themselves over SSH.

A server runs on one host (TCP echo, or a sink counting bytes); the client on the other connects to
the server's address, as any program of the cluster would. Used by tests and benchmarks/network.py.
"""

from __future__ import annotations

import shlex
import threading

from cloister.transport import hosts

PORT = 5201

# Serves one connection, then exits. An echo server answers each byte; a sink counts what it receives
# from the first byte on and prints bits per second.
SERVER = r"""
import socket, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", port))
listener.listen(1)
listener.settimeout(30)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
received, start = 0, None
while True:
    data = conn.recv(1 << 20)
    if not data:
        break
    if mode == "echo":
        conn.sendall(data)
        continue
    if start is None:
        start = time.monotonic()
    received += len(data)
if mode == "sink":
    print(received * 8 / (time.monotonic() - start))
"""

# Connects (retrying while the server is not yet listening), then either sends for the given seconds
# or times that many one-byte round trips and prints their median in seconds.
CLIENT = r"""
import socket, statistics, sys, time
mode, address, port, amount = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 20
while True:
    try:
        conn = socket.create_connection((address, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.02)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if mode == "sink":
    chunk, end = b"x" * (1 << 20), time.monotonic() + amount
    while time.monotonic() < end:
        conn.sendall(chunk)
else:
    times = []
    for _ in range(int(amount)):
        start = time.perf_counter()
        conn.sendall(b"x")
        conn.recv(1)
        times.append(time.perf_counter() - start)
    print(statistics.median(times))
conn.close()
"""


def _python(script: str, *args: object) -> str:
    return f"timeout 60 python3 -c {shlex.quote(script)} " + " ".join(shlex.quote(str(a)) for a in args)


def _pair(info, client, server, mode: str, amount: float, address: str | None) -> str:
    """Run the server on ``server`` and the client on ``client`` at once; the output of the one that prints."""
    results: dict[str, object] = {}

    def serve() -> None:
        with hosts.connection(info, server, connect_timeout=5) as cxn:
            results["server"] = cxn.run(_python(SERVER, mode, PORT), hide=True, warn=True, timeout=90)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with hosts.connection(info, client, connect_timeout=5) as cxn:
            results["client"] = cxn.run(_python(CLIENT, mode, address or server.private or server.host, PORT, amount),
                                        hide=True, warn=True, timeout=90)
    finally:
        thread.join()
    for side in ("server", "client"):
        if results[side].exited != 0:
            raise RuntimeError(f"{side} failed: {results[side].stderr.strip()[-300:]}")
    return (results["server"] if mode == "sink" else results["client"]).stdout.strip()


def throughput(info, sender, receiver, *, seconds: float = 3.0, address: str | None = None) -> float:
    """Bits per second of one TCP stream from ``sender`` to ``receiver``."""
    return float(_pair(info, sender, receiver, "sink", seconds, address))


def round_trip(info, client, server, *, count: int = 200, address: str | None = None) -> float:
    """Median seconds of a one-byte TCP round trip from ``client`` to ``server``."""
    return float(_pair(info, client, server, "echo", count, address))
