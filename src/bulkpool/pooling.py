"""The executor a run sends to, and the size of its next chunk: the sizing policy, applied.

``Pool`` owns the executor in use, the pace measured so far and the chunk sizer; the
engine only asks it:

    send_to(task, interrupts)    the executor to submit the next chunk to. The first call
                                 starts one; with ``workers="auto"`` on a local pool that is
                                 a serial stand-in in the caller, which runs the first chunks
                                 while they are measured, until ``choose_workers`` answers:
                                 stay serial, or start the pool and stop the stand-in
    next_size(start)             the size of the chunk read from ``start`` on
    read(items) / measured(...)  a chunk was read from the input / came back with its timings
    close(stopped=, cancel=)     the notes on what was chosen, then stop the executor

Nothing here knows the journal, the input or the report: what it chose goes to ``note``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from django.db import connections

from bulkpool.errors import WorkerStartupError
from bulkpool.executors import Executor, SerialExecutor
from bulkpool.interrupts import Interrupts
from bulkpool.options import Options
from bulkpool.protocol import ErrorInfo, Task, Timings
from bulkpool.sizing import (
    AUTO,
    REMOTE_TARGET_SECONDS,
    Choice,
    ChunkSizer,
    Limits,
    Pace,
    choose_workers,
    cpu_quota,
    free_connections,
)

logger = logging.getLogger("bulkpool")


class Pool:
    """The executor in use, how many workers it has, and the chunk sizes that suit them."""

    def __init__(
        self, backend: Executor, options: Options, *, length: int | None, note: Callable[[str], None]
    ) -> None:
        self.backend = backend  # the executor the options name
        self.executor = backend  # the one in use: a serial stand-in while workers="auto" measures
        self._database = options.database
        self._length = length
        self._read = 0
        self._note = note
        # workers="auto": the caller runs the first chunks while they are measured.
        self._measuring = (
            options.workers == AUTO and not backend.workers and backend.local
            and not backend.supports_caller_transaction
        )  # fmt: skip
        self.workers: int = backend.workers or (
            cpu_quota() if options.workers == AUTO else int(options.workers)
        )
        if self._measuring or backend.supports_caller_transaction:
            self.workers = 1  # what runs the chunks until a pool is chosen, or for good
        self.sizer = ChunkSizer(None if options.chunk_size == AUTO else int(options.chunk_size))
        if not backend.local:
            self.sizer.target = REMOTE_TARGET_SECONDS  # a broker's round trip is dearer
        self.pace = Pace()
        self.started = False
        self.capacity = 1  # chunks the executor in use may hold at once

    @property
    def ceiling(self) -> int:
        """The most items a chunk may hold."""
        return self.sizer.ceiling

    # -- what the engine asks ------------------------------------------------------------

    def send_to(self, task: Task, interrupts: Interrupts) -> Executor:
        """The executor for the next chunk: started when there is work for it (a rerun of a
        finished run starts none); while measuring, the pool once the pace says so."""
        if not self.started:
            self._start(task, interrupts)
        elif self._measuring:
            self._choose_pool(task, interrupts)
        return self.executor

    def next_size(self, start: int) -> int:
        return self.sizer.next(self.pace, left=self._left(start), workers=self.workers)

    def read(self, items: int) -> None:
        """A chunk of ``items`` was read from the input."""
        self._read += items
        self.sizer.read(items)

    def measured(self, items: int, timings: Timings) -> None:
        """A chunk of ``items`` came back, with what it took in its worker."""
        self.pace.add(items, timings)

    def withdraw(self) -> None:
        if self.started:
            self.executor.withdraw()  # chunks queued in a broker need not run

    def close(self, *, stopped: bool, cancel: bool) -> None:
        """Say what was chosen, then stop the executor in use."""
        if self._measuring and self.started and not stopped:
            self._say("workers=1: the whole input ran in the caller while it was measured")
        if chunks := self.sizer.summary():
            self._say(chunks)
        if self.started:
            self.executor.stop(cancel=cancel)

    # -- starting, and changing executor ---------------------------------------------------

    def _start(self, task: Task, interrupts: Interrupts) -> None:
        self.started = True
        if self._measuring:
            self.executor, self.workers = SerialExecutor(), 1
        with interrupts.raising():  # no work is in flight yet: Ctrl-C need not wait for setup
            if self._measuring:
                self._start_stand_in(task)
            else:
                self.executor.start(task, self.workers)
        self.capacity = self.executor.capacity()

    def _start_stand_in(self, task: Task) -> None:
        """The caller stands in for a pool worker: its failing setup is reported as one's."""
        try:
            self.executor.start(task, 1)
        except Exception as error:
            info = ErrorInfo.from_exception(error)
            raise WorkerStartupError(
                "A worker failed in setup (the calling process, which runs the first chunks while "
                f"workers='auto' measures them): {info.exc_type}: {info.message}",
                info.traceback,
            ) from error

    def _choose_pool(self, task: Task, interrupts: Interrupts) -> None:
        """Once the caller's first chunks are measured, stay serial or start the pool."""
        choice = choose_workers(self.pace, self._left(self._read), self._limits)
        if choice is None:
            return
        self._measuring = False
        if choice.workers > 1:
            choice = self._start_pool(choice, task, interrupts)
        self._say(f"workers={choice.workers}: {choice.why}")

    def _start_pool(self, choice: Choice, task: Task, interrupts: Interrupts) -> Choice:
        pool = self.backend
        try:
            with interrupts.raising():  # nothing is in flight between two serial chunks
                pool.start(task, choice.workers)
        except WorkerStartupError as error:
            logger.warning("Could not start %s workers: going on serially.\n%s", pool.name, error)
            return Choice(1, f"the {pool.name} workers could not start ({str(error).splitlines()[0]})")
        self.executor.stop()
        self.executor, self.workers = pool, choice.workers
        self.capacity = pool.capacity()
        return choice

    def _say(self, note: str) -> None:
        self._note(f"Sizing: {note}")

    @functools.cached_property
    def _limits(self) -> Limits:
        """What bounds the pool, looked up once, when the pool is first considered."""
        return Limits(
            cpus=cpu_quota(),
            free_connections=free_connections(self._database),
            single_writer=connections[self._database].vendor == "sqlite",
            start_seconds=self.backend.start_seconds,
        )

    def _left(self, read: int) -> int | None:
        """Items not read yet, when the input's length is known (and still holds: a
        QuerySet counted when the run began may have grown since)."""
        if self._length is None or read > self._length:
            return None
        return self._length - read
