"""Where one chunk run's time goes: a ``Stopwatch`` per ``Worker.run(chunk)``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from bulkpool.protocol import Timings

PHASES = ("prepare", "load", "work", "commit")


class Stopwatch:
    """Seconds spent per phase of one chunk run, and the run's wall and CPU time."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._cpu_started = time.thread_time()  # this thread's own CPU: the rest was waiting
        self._spent = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._spent[phase] += time.perf_counter() - started

    def add(self, phase: str, seconds: float) -> None:
        self._spent[phase] += seconds

    def timings(self) -> Timings:
        return Timings(
            **self._spent,
            total=time.perf_counter() - self._started,
            cpu=time.thread_time() - self._cpu_started,
        )
