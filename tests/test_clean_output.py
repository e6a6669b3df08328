"""Output of any size from `cluster.run`: every byte arrives, large outputs go to per-host files named in
the output, identical ones still fold, and `--stream` passes every line. No timing here: the
throughput against parallel-ssh and clush is in benchmarks/fanout.py."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import threading
from pathlib import Path

from cloister.transport import hosts, remote
from conftest import no_traceback

RULE = "-" * 15
BIG = 15_000_000  # bytes before base64: 20 MB of output per host


def remote_sha256(env, nodes, path: str) -> dict[str, str]:
    with hosts.group(env.info, nodes, connect_timeout=5) as grp:
        result = hosts.check(hosts.call(grp, lambda cxn: cxn.run(f"sha256sum {path}", timeout=60)))
    return {cxn.host: value.stdout.split()[0] for cxn, value in result.items()}


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def notes(stdout: str) -> dict[str, tuple[str, str]]:
    """host header -> (stream, saved path) of every '[stdout: ..., saved to PATH...]' line."""
    found = {}
    for header, body in re.findall(rf"{RULE}\n(.+?)\n{RULE}\n(.*?)(?=\n{RULE}|\Z)", stdout, re.S):
        for stream, path in re.findall(r"^\[(stdout|stderr): [\d.]+ MiB, too large to print; saved to (\S+?)[\] ]",
                                       body, re.M):
            found[header.split(" (")[0] + "/" + stream] = path
    return found


def test_twenty_megabytes_per_host_arrive_intact_in_files_named_in_the_output(local_cluster):
    nodes = local_cluster.info.cluster_nodes
    proc = local_cluster.inv("cluster.run", f"head -c {BIG} /dev/urandom | base64 | tee /tmp/big-output; "
                                            "head -c 3000000 /dev/urandom | base64 | tee /tmp/big-error >&2",
                             timeout=300)
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    saved = notes(proc.stdout)
    # Random data: no two hosts agree, so each has its own block and its own two files.
    assert set(saved) == {f"{n.host}/{stream}" for n in nodes for stream in ("stdout", "stderr")}, proc.stdout
    folder = Path(local_cluster.settings.state_dir) / "output"
    for node in nodes:
        out, err = Path(saved[f"{node.host}/stdout"]), Path(saved[f"{node.host}/stderr"])
        assert folder in out.parents and out.name == f"{node.host}.out" and err.name == f"{node.host}.err"
    assert {n.host: sha256(saved[f"{n.host}/stdout"]) for n in nodes} == remote_sha256(local_cluster, nodes,
                                                                                       "/tmp/big-output")
    assert {n.host: sha256(saved[f"{n.host}/stderr"]) for n in nodes} == remote_sha256(local_cluster, nodes,
                                                                                       "/tmp/big-error")


def test_identical_large_outputs_fold_into_one_block(local_cluster):
    nodes = local_cluster.info.cluster_nodes
    proc = local_cluster.inv("cluster.run", f"head -c {BIG} /dev/zero | base64", timeout=300)
    assert proc.returncode == 0, proc.stderr
    header = ",".join(n.host for n in nodes) + f" ({len(nodes)})"
    match = re.fullmatch(rf"{RULE}\n{re.escape(header)}\n{RULE}\n\[stdout: 19\.\d MiB, too large to print; saved "
                         rf"to (\S+)/\{{host\}}\.out for each of these {len(nodes)} hosts \(identical\)\]\n",
                         proc.stdout)
    assert match, proc.stdout
    expected = hashlib.sha256(base64.encodebytes(bytes(BIG))).hexdigest()
    assert {sha256(Path(match.group(1)) / f"{n.host}.out") for n in nodes} == {expected}


def test_stream_passes_every_line_of_a_long_output(local_cluster):
    nodes = local_cluster.info.cluster_nodes
    proc = local_cluster.inv("cluster.run", "--stream", "seq 1 300000", timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines: dict[str, list[str]] = {}
    for line in proc.stdout.splitlines():
        host, _, rest = line.partition("] ")
        lines.setdefault(host[1:], []).append(rest)
    expected = [str(i) for i in range(1, 300001)]
    assert lines == {n.host: expected for n in nodes}


def test_a_small_output_stays_in_memory_and_leaves_no_file(tmp_path):
    sink = remote.Capture(tmp_path / "h.out", limit=10)
    sink.write(b"0123456789")
    small = sink.result()
    assert (small.text, small.path, small.size) == ("0123456789", None, 10)
    assert not (tmp_path / "h.out").exists()

    sink = remote.Capture(tmp_path / "h.out", limit=10)
    for chunk in (b"01234", b"56789", b"\nlast line\n"):
        sink.write(chunk)
    large = sink.result()
    # Only the last lines stay in memory (for an error message); the whole is in the file.
    assert (large.text, large.path, large.size) == ("last line\n", str(tmp_path / "h.out"), 21)
    assert (tmp_path / "h.out").read_bytes() == b"0123456789\nlast line\n"
    assert large.digest == hashlib.sha256(b"0123456789\nlast line\n").hexdigest() != small.digest


def test_line_writer_keeps_lines_and_characters_whole_across_chunks():
    sink = io.StringIO()
    writer = remote.LineWriter("h", sink, threading.Lock())
    data = "één\ntwee\ndrie zonder einde".encode()
    for i in range(len(data)):  # one byte at a time: characters and lines split everywhere
        writer.write(data[i:i + 1])
    writer.flush()
    assert sink.getvalue() == "[h] één\n[h] twee\n[h] drie zonder einde\n"


def test_the_command_reaches_the_host_exactly_as_typed(local_cluster):
    """The process-group wrapper quotes the command once more: quotes, backslashes, $(...), newlines and
    non-ASCII text in it must arrive unchanged, with and without --timeout (which wraps it again)."""
    command = "printf '%s|' \"it's\" '$(touch /tmp/pwn)' 'a\\\"b\\\\c' \"$((6 * 7))\" 'één'\necho; echo \"$0\" >/dev/null"
    expected = "it's|$(touch /tmp/pwn)|a\\\"b\\\\c|42|één|\n"
    for flags in ([], ["--timeout", "30"]):
        proc = local_cluster.inv("cluster.run", "--role", "master", *flags, command)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split(RULE + "\n")[-1] == expected, proc.stdout
    assert local_cluster.inv("cluster.run", "--role", "master", "test ! -e /tmp/pwn").returncode == 0


def test_binary_output_goes_to_a_file_and_never_reaches_the_terminal(local_cluster):
    """A small binary output (escape sequences, NUL, bytes that are not UTF-8) is saved like a large one;
    colour is text; in --stream every control character but colour's is shown escaped."""
    master = local_cluster.info.master
    payload = "printf 'A\\033]0;owned\\007\\000\\377B'"
    proc = local_cluster.inv("cluster.run", "--role", "master", payload)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x00" not in proc.stdout and "\x07" not in proc.stdout
    saved = re.search(r"^\[stdout: 14 B, binary, not printed; saved to (\S+)\]$", proc.stdout, re.M)
    assert saved, proc.stdout
    assert Path(saved.group(1)).read_bytes() == b"A\x1b]0;owned\x07\x00\xffB"
    assert saved.group(1).endswith(f"/{master.host}.out")

    colour = local_cluster.inv("cluster.run", "--role", "master", "printf '\\033[31mred\\033[0m\\n'")
    assert colour.returncode == 0 and "\x1b[31mred\x1b[0m\n" in colour.stdout, colour.stdout

    streamed = local_cluster.inv("cluster.run", "--role", "master", "--stream", payload)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == f"[{master.host}] A\\x1b]0;owned\\x07\\x00\ufffdB\n", repr(streamed.stdout)


def test_a_small_binary_output_is_saved_whole(tmp_path):
    sink = remote.Capture(tmp_path / "h.out")
    sink.write(b"\x00\x01binary")
    captured = sink.result()
    assert (captured.binary, captured.text, captured.path, captured.size) == (True, "", str(tmp_path / "h.out"), 8)
    assert (tmp_path / "h.out").read_bytes() == b"\x00\x01binary"
