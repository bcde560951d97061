"""Where one chunk run's time goes: a ``Stopwatch`` per ``Worker.run(chunk)``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bulkpool.protocol import Timings
from bulkpool.sqlite_writers import holds_back_writers

PHASES = ("prepare", "load", "work", "commit")


class Stopwatch:
    """Seconds spent per phase of one chunk run, and the run's wall and CPU time."""

    def __init__(self, *, warming: bool = False) -> None:
        self._warming = warming
        self._started = time.perf_counter()
        self._cpu_started = time.thread_time()  # this thread's own CPU: the rest was waiting
        self._runnable_started = runnable_seconds()  # ...for I/O, or for a CPU
        self._spent = dict.fromkeys(PHASES, 0.0)
        self._unlocked = 0.0
        self._commits = 0
        self._stale = 0
        self._item_started: float | None = None  # while an item runs and has not written yet

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._spent[phase] += time.perf_counter() - started

    def add(self, phase: str, seconds: float) -> None:
        self._spent[phase] += seconds

    def ended_transaction(self, commit_seconds: float) -> None:
        self._spent["commit"] += commit_seconds
        self._commits += 1

    def ran_again_stale(self) -> None:
        """An item's first write found a newer snapshot: it runs again (SQLite)."""
        self._stale += 1

    def start_item(self) -> float:
        """func on one item begins: its time, and how much of it comes before its first
        write, are counted until ``end_item``. (Two calls, not a context manager: this runs
        for every item, and a generator-based one costs a few microseconds each time.)"""
        started = self._item_started = time.perf_counter()
        return started

    def end_item(self, started: float) -> None:
        ended = time.perf_counter()
        self._spent["work"] += ended - started
        if self._item_started is not None:  # it never wrote: none of it needed the lock
            self._unlocked += ended - started
        self._item_started = None

    def watching_writes(self, execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        """A Django execute wrapper (SQLite in WAL mode): notes the running item's first write."""
        if self._item_started is not None and holds_back_writers(sql, wal=True):
            self._end_unlocked()
        return execute(sql, *args)

    def watching_statements(self, execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        """The same in SQLite's rollback-journal mode, where a read in a transaction holds a
        lock that keeps every other writer from committing: the item's first statement."""
        if self._item_started is not None:
            self._end_unlocked()
        return execute(sql, *args)

    def _end_unlocked(self) -> None:
        assert self._item_started is not None
        self._unlocked += time.perf_counter() - self._item_started
        self._item_started = None

    def timings(self) -> Timings:
        return Timings(
            **self._spent,
            total=time.perf_counter() - self._started,
            cpu=time.thread_time() - self._cpu_started,
            runnable=runnable_seconds() - self._runnable_started,
            unlocked=self._unlocked,
            commits=self._commits,
            stale=self._stale,
            warming=self._warming,
        )


_SCHEDSTAT = Path("/proc/thread-self/schedstat")


def runnable_seconds() -> float:
    """How long this thread has waited, ready to run, for a CPU (Linux's run queue delay;
    0 where the kernel does not say). Workers that share too few CPUs wait so: their
    time off the CPU is then not the items' waiting, and more workers would not help."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0
