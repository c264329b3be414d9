"""The progress bar every command shows over its images: count, images/s, elapsed, ETA."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def image_progress(
    label: str, enabled: bool, total: int, noun: str = "images"
) -> Iterator[Callable[..., None]]:
    """Yields ``advance(n=1)``; draws a transient rich bar on stderr unless ``enabled`` is False
    or stderr is not a terminal (a transient bar still leaves blank lines in logs and pipes).
    ``noun``: what is counted (the rate reads ``<noun>/s``)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    started = time.perf_counter()
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=True,
        console=console,
    )
    with bar:
        task = bar.add_task("images", total=total, rate="")
        done = [0]

        def advance(n: int = 1) -> None:
            done[0] += n
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=n, rate=f"{done[0] / elapsed:.1f} {noun}/s")

        yield advance
