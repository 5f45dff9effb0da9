"""The rich progress bar every long job shows (conversion, prediction): description, bar, n/N, elapsed, remaining.

    with progress_bar(enabled=True) as bar:
        task = bar.add_task("cells", total=n)
        bar.advance(task, 64)
"""

from __future__ import annotations


def progress_bar(enabled: bool = True):
    """A ``rich.progress.Progress`` (disabled, i.e. silent, when ``enabled`` is False)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), disable=not enabled)
