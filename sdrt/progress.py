"""The CLI's progress bar over the denoising steps (the Python API takes any `progress(done, total)`)."""
from __future__ import annotations

import sys

import typer


class StepBar:
    """A progress bar over the denoising steps, on a terminal only, started by the first step (so that a
    request refused before any work prints nothing but its error line)."""

    def __init__(self):
        self._bar, self._show = None, sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self._show:
            return
        if self._bar is None:
            self._bar = typer.progressbar(length=total, label="denoising", file=sys.stderr).__enter__()
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
