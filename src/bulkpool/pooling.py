"""The executor a run sends to, and the size of its next chunk: the sizing policy, applied.

``Pool`` owns the executor, how many workers it has, the pace measured so far and the
chunk sizer; the engine only asks it:

    send_to(task, interrupts)    the executor to submit the next chunk to. The first call
                                 starts it; with ``workers="auto"`` on a pool that can grow
                                 (thread, process), with one worker or two
                                 (``measuring_width``), which run the first chunks one at a
                                 time each while they are measured -- never the caller, so an
                                 item that kills its process kills a worker -- until
                                 ``choose_workers`` answers: stay at that, or grow
    shape(chunk)                 the chunk as it goes out: with ``each_item`` set when the
                                 pool chose a transaction per item (SQLite, heavy items)
    next_size(start)             the size of the chunk read from ``start`` on
    share_out(piece)             the input's last chunk, in pieces for every worker
    read(items) / measured(...)  a chunk was read from the input / came back with its timings
    close(stopped=, cancel=)     the notes on what was chosen, then stop the executor

On SQLite, when the pool may have more than one worker, its workers queue for the write
lock (``sqlite_writers``): the pool makes the queue's file when it starts, and removes it
when it stops.

Nothing here knows the journal, the input or the report: what it chose goes to ``note``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import replace

from django.db import connections

from bulkpool.errors import WorkerStartupError
from bulkpool.executors import Executor
from bulkpool.interrupts import Interrupts
from bulkpool.options import Options
from bulkpool.protocol import Chunk, Task, Timings
from bulkpool.sizing import (
    AUTO,
    FIRST_CHUNK,
    MEASURING_FIRST_CHUNK,
    PROBE_CHUNKS,
    REMOTE_TARGET_SECONDS,
    STALE_SHARE,
    WARM_CHUNK_SECONDS,
    Choice,
    ChunkSizer,
    Limits,
    Pace,
    choose_workers,
    cpu_quota,
    each_item_pays,
    free_connections,
    measuring_width,
    shared_out,
)
from bulkpool.sqlite_writers import new_queue, remove_queue

logger = logging.getLogger("bulkpool")


class Pool:
    """The executor in use, how many workers it has, and the chunk sizes that suit them."""

    def __init__(
        self, backend: Executor, options: Options, *, length: int | None, note: Callable[[str], None]
    ) -> None:
        self.executor = backend
        self._database = options.database
        self._length = length
        self._read = 0
        self._note = note
        # workers="auto": one worker runs the first chunks while they are measured.
        self._measuring = options.workers == AUTO and not backend.workers and backend.grows
        self.workers: int = backend.workers or (
            cpu_quota() if options.workers == AUTO else int(options.workers)
        )
        if self._measuring or backend.supports_caller_transaction:
            self.workers = 1  # until the pool grows, or for good
        self.sizer = ChunkSizer(
            None if options.chunk_size == AUTO else int(options.chunk_size),
            first=MEASURING_FIRST_CHUNK if self._measuring else FIRST_CHUNK,
        )
        if not backend.local:
            self.sizer.target = REMOTE_TARGET_SECONDS  # a broker's round trip is dearer
        self.pace = Pace()  # every chunk's: sizes the next chunk
        self._deciding = Pace()  # what the pool is chosen from: without a new worker's first chunk
        self.started = False
        self.capacity = 1  # chunks the executor in use may hold at once
        # SQLite, heavy items: each item in a transaction of its own (sizing.py). With a
        # fixed pool of several workers, it is chosen once the first chunks are measured.
        self.each_item = False
        self._may_each_item = options.atomic == "chunk"  # "item" and False have theirs already
        self._choosing_transactions = (
            self._may_each_item and not self._measuring and self.workers > 1 and backend.local
        )
        self._each_item_pace = Pace()  # of the each_item chunks: how many items ran stale
        # SQLite: several workers of this machine may write (not the caller's one, nor a broker's)
        self._queues_writers = (
            backend.local
            and not backend.supports_caller_transaction
            and (self._measuring or self.workers > 1)
        )
        self._writer_queue: str | None = None

    @property
    def ceiling(self) -> int:
        """The most items a chunk may hold."""
        return self.sizer.ceiling

    # -- what the engine asks ------------------------------------------------------------

    def send_to(self, task: Task, interrupts: Interrupts) -> Executor:
        """The executor for the next chunk: started when there is work for it (a rerun of a
        finished run starts none); while measuring, grown once the pace says so."""
        if not self.started:
            self._start(task, interrupts)
        elif self._measuring:
            self._choose_pool(interrupts)
        return self.executor

    def shape(self, chunk: Chunk) -> Chunk:
        return replace(chunk, each_item=True) if self.each_item and not chunk.each_item else chunk

    def next_size(self, start: int) -> int:
        return self.sizer.next(self.pace, left=self._left(start), workers=self.workers)

    @property
    def shares_out_an_unknown_end(self) -> bool:
        """Whether the end of an input of unknown length would be shared out (``share_out``)
        if it were known: the engine reads a chunk ahead to know it."""
        return self.workers >= 2 and self.sizer.fixed is None and self._left(self._read) is None

    def share_out(self, piece: Chunk) -> list[Chunk]:
        """The input ended within the chunk ``piece`` is of: what is left of the run is now
        known, so it goes out in pieces for every worker to share (``sizing.shared_out``), as it
        would with an input of known length. Sent whole, it could keep one worker busy
        for a chunk's time while the others had nothing left to do."""
        if not self.shares_out_an_unknown_end:
            return [piece]  # one worker, the user's size, or a known length already shared out
        size = shared_out(len(piece), self.workers, per_item=self.pace.per_item, target=self.sizer.target)
        starts = range(piece.start, piece.end, size)
        return [piece.piece(start, min(start + size, piece.end)) for start in starts]

    def read(self, items: int) -> None:
        """A chunk of ``items`` was read from the input."""
        self._read += items
        self.sizer.read(items)

    def measured(self, chunk: Chunk, timings: Timings) -> None:
        """A chunk came back, with what it took in its worker."""
        items = len(chunk)
        # Each worker's first chunk also opened its database connection: left out of the
        # choice, unless the chunk is long enough for that not to matter. (Were only the
        # pool's first one left out, a second measuring process slow to connect on a loaded
        # machine could make a light run look heavy enough for more workers.)
        if not timings.warming or timings.total >= WARM_CHUNK_SECONDS:
            self._deciding.add(items, timings)
        self.pace.add(items, timings)
        if self._choosing_transactions and self._deciding.chunks >= PROBE_CHUNKS:
            self._choosing_transactions = False
            self._set_each_item(each_item_pays(self._deciding, self._limits))
        if chunk.each_item:
            self._each_item_pace.add(items, timings)
            if self.each_item and self._each_item_pace.stale_share > STALE_SHARE:
                self._set_each_item(False)

    def withdraw(self) -> None:
        if self.started:
            self.executor.withdraw()  # chunks queued in a broker need not run

    def close(self, *, stopped: bool, cancel: bool) -> None:
        """Say what was chosen, then stop the executor in use."""
        if self._measuring and self.started and not stopped:
            measured_on = "the one worker" if self.workers == 1 else f"the {self.workers} workers"
            self._say(f"workers={self.workers}: the whole input ran on {measured_on} that measured it")
        if chunks := self.sizer.summary():
            self._say(chunks)
        if self.started:
            try:
                self.executor.stop(cancel=cancel)
            finally:
                remove_queue(self._writer_queue)

    # -- starting, and growing ----------------------------------------------------------------

    def _start(self, task: Task, interrupts: Interrupts) -> None:
        self.started = True
        if self._measuring:
            self.workers = measuring_width(self._limits)
        if self._queues_writers and self._limits.single_writer:
            self._writer_queue = new_queue(connections[self._database])
            task = replace(task, writer_queue=self._writer_queue)
        with interrupts.raising():  # no work is in flight yet: Ctrl-C need not wait for setup
            self.executor.start(task, self.workers)
        # While measuring, one chunk at a time on each worker: none waits behind another
        # when the pool grows.
        self.capacity = self.workers if self._measuring else self.executor.capacity()

    def _choose_pool(self, interrupts: Interrupts) -> None:
        """Once the first chunks are measured, stay at the workers that measured them or
        grow the pool."""
        choice = choose_workers(self._deciding, self._left(self._read), self._limits)
        if choice is None:
            return
        self._measuring = False
        if choice.workers > self.workers:
            choice = self._grow(choice, interrupts)
        self.capacity = self.executor.capacity()
        self._say(f"workers={self.workers}: {choice.why}")
        if self.workers > 1 and choice.each_item:
            self._set_each_item(True)

    def _grow(self, choice: Choice, interrupts: Interrupts) -> Choice:
        executor = self.executor
        try:
            with interrupts.raising():  # nothing is in flight while measuring, between two chunks
                executor.grow(choice.workers)
        except WorkerStartupError as error:
            going_on = "one" if self.workers == 1 else f"the {self.workers} that measured"
            logger.warning(
                "Could not start more %s workers: going on with %s.\n%s", executor.name, going_on, error
            )
            why = f"the {executor.name} workers could not start ({str(error).splitlines()[0]})"
            return Choice(self.workers, why)
        self.workers = choice.workers
        return choice

    def _set_each_item(self, each_item: bool) -> None:
        if each_item == self.each_item:
            return
        self.each_item = each_item
        if each_item:
            self._say(
                "atomic=chunk: each item in a transaction of its own, from its first write on: "
                "most of an item's time comes before it (SQLite writes one transaction at a time)"
            )
        else:
            stale = self._each_item_pace.stale_share
            self._say(
                f"atomic=chunk: back to a transaction per chunk: {100 * stale:.0f}% "
                "of the items read data that another worker changed before their first write, "
                "and had to run again holding the write lock"
            )

    def _say(self, note: str) -> None:
        self._note(f"Sizing: {note}")

    @functools.cached_property
    def _limits(self) -> Limits:
        """What bounds the pool, looked up once, when the pool is first considered."""
        return Limits(
            cpus=cpu_quota(),
            free_connections=free_connections(self._database),
            single_writer=connections[self._database].vendor == "sqlite",
            start_seconds=self.executor.start_seconds,
            chunk_transactions=self._may_each_item,
            shared_interpreter=self.executor.shares_interpreter,
        )

    def _left(self, read: int) -> int | None:
        """Items not read yet, when the input's length is known (and still holds: a
        QuerySet counted when the run began may have grown since)."""
        if self._length is None or read > self._length:
            return None
        return self._length - read
