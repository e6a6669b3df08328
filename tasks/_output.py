"""What tasks print: tables, sizes, durations and the progress bar, shared by every task module."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

LABELS = {"uptime_s": "uptime", "age_s": "age", "ttl_left_s": "ttl left", "why": "what became of it"}


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
          caption: str | None = None, stderr: bool = False) -> None:
    """Print a table; long cells wrap (piped output is 80 columns wide) rather than being cut."""
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title, caption=caption)
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*[str(cell) for cell in row])
    Console(stderr=stderr).print(out)


def records(title: str, rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *,
            caption: str | None = None) -> None:
    """A table of the ``keys`` that some row has a value for; ``*_s`` keys are durations."""
    columns = [k for k in keys if any(r.get(k) not in (None, "") for r in rows)]
    cells = [[duration(r.get(k)) if k.endswith("_s") else (r.get(k) if r.get(k) not in (None, "") else "-")
              for k in columns] for r in rows]
    table(title, [LABELS.get(k, k) for k in columns], cells, caption=caption)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def warning(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def confirm(question: str, *, default: bool = False) -> bool:
    """Ask on the terminal (Enter answers ``default``); no terminal means no."""
    if not sys.stdin or not sys.stdin.isatty():
        return False
    try:
        answer = input(f"{question} {'[Y/n]' if default else '[y/N]'} ").strip().lower()
    except EOFError:
        return False
    return default if not answer else answer in ("y", "yes")


class ProgressBar:
    """A rich progress bar on stderr for cloister's waits, which call ``update`` once per poll."""

    def __init__(self, bar, task_id):
        self.bar = bar
        self.task_id = task_id

    def update(self, text: str, done: int, total: int) -> None:
        self.bar.update(self.task_id, description=text, completed=done, total=total, visible=True)

    def confirm(self, question: str, *, default: bool = False) -> bool:
        """``confirm`` with the bar paused, so the question is not drawn over."""
        self.bar.stop()
        try:
            return confirm(question, default=default)
        finally:
            self.bar.start()


@contextlib.contextmanager
def progress_bar() -> Iterator[ProgressBar]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    # Off without a terminal: scripts and logs get the result lines only.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        # Hidden until a wait reports, so providers without progress show nothing.
        yield ProgressBar(bar, bar.add_task("", total=None, visible=False))
