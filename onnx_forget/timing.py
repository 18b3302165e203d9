"""Seconds per phase of a run, as the report shows them."""

from __future__ import annotations

import time
from contextlib import contextmanager


class PhaseTimer:
    """Seconds per phase; a phase timed inside another is not counted twice."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase, the seconds of phases inside it

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            own = elapsed - self._inner.pop()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + own
            if self._inner:
                self._inner[-1] += elapsed
