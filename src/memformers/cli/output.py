"""What the commands show and write: the console, progress bars while segments stream, files written whole."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..files import atomic_file
from ..progress import LoggedProgress

console = Console()


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so a reader never sees half of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def progress_bar() -> LoggedProgress:
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("segments · {task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def segment_progress(description: str, total: int | None):
    """A progress bar for one streamed document; yields the driver's progress callback."""
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(description, total=total, rate="")

        def callback(done: int, _total: int | None, tokens: int) -> None:
            bar.update(task, completed=done, rate=f"{tokens / (time.perf_counter() - start):,.0f} tokens/s")

        yield callback


def stream_throughput(model, token_chunks, num_segments: int, description: str) -> tuple[float, int, int | None]:
    """Stream one document through `model` under a progress bar; (tokens/s, peak activation bytes, peak resident)."""
    from ..profiling import stream_throughput as measure

    with segment_progress(description, num_segments) as callback:
        return measure(model, token_chunks, callback)
