"""A progress bar for long passes over the samples, drawn only where a person watches."""

from __future__ import annotations

import contextlib
import sys

import click


class _NoProgress:
    def update(self, steps: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, label: str, wanted: bool):
    """A progress bar on stderr when wanted and stderr is a terminal, else nothing."""
    if not (wanted and sys.stderr.isatty()):
        yield _NoProgress()
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar
