"""``Worker``: what is set up once per worker, and the door to running one chunk.

    Worker(task)  --start()--> the user's setup runs once; Calls bound to its state
    Worker.run(chunk): a ChunkRun made for the chunk (all per-chunk state lives there)
        --> Inputs.prepare()                      with task.prepare, outside any transaction
        --> OneTransaction(run).run()              atomic="chunk"
            or ItemByItem(run).run()               atomic="item" or False
        --> ChunkRun.crashed(error)                anything escaping the policy (a bug of
                                                   ours, or a BaseException from our callers)
        <-- ChunkRun.finish(): the ChunkResult; the ChunkRun is dropped

Between chunks a Worker changes only its ``Carefulness`` (under a lock) and, per thread,
whether that thread's next chunk opens a connection (``Timings.warming``), so threads may
call ``run()`` on one instance at once, each on its own Django connection (Django's
connections are per thread): the Celery executor caches one Worker per job and process,
whatever the pool.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from django.db import connections

from bulkpool.protocol import Chunk, ChunkResult, Task
from bulkpool.sqlite_writers import close_queue, in_wal_mode
from bulkpool.work.attempt import Carefulness
from bulkpool.work.calling import Calls
from bulkpool.work.chunk_run import ChunkRun, Progress
from bulkpool.work.item_by_item import ItemByItem
from bulkpool.work.one_transaction import OneTransaction

SQLITE_BUSY_TIMEOUT = 60  # seconds a worker waits for SQLite's write lock


class Worker:
    """Runs ``task.func`` over chunks; set up once, then shared by the chunks it runs.

    ``before_commit``: called just before each COMMIT (a process worker tells its parent,
    so that a death during COMMIT is known to leave the chunk in doubt).
    ``in_caller_thread``: the worker runs in the caller's thread (serial), so Ctrl-C --
    a ``KeyboardInterrupt`` -- propagates out of ``run()`` instead of failing an item.
    ``progress``: told of each item of an ``each_item`` chunk as it settles (a process
    worker tells its parent, so that its death loses only the item it was running).
    """

    def __init__(
        self,
        task: Task,
        *,
        before_commit: Callable[[], None] | None = None,
        in_caller_thread: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.task = task
        self.state: Any = None
        self.in_caller_thread = in_caller_thread
        self._before_commit = before_commit
        self._progress = progress
        self._calls = Calls.bind(task, in_caller_thread=in_caller_thread)
        self._careful = Carefulness()
        # The chunk each thread is running here, only so that ``committing`` can answer;
        # and whether it has run one before (its first one's timings are ``warming``).
        self._running = threading.local()

    def start(self) -> None:
        """Prepare this worker's connection and run the user's ``setup`` once."""
        if self.task.own_connections:
            _tune_connection(self.task.database)
        if self.task.setup is not None:
            self.state = self.task.setup()
            self._calls = Calls.bind(self.task, in_caller_thread=self.in_caller_thread, state=(self.state,))

    def close(self) -> None:
        """Close the connections this worker opened in this thread (never the caller's)."""
        if self.task.own_connections:
            close_queue(connections[self.task.database])
            connections.close_all()
        self._running.warmed = False  # this thread's next chunk opens a connection again

    @property
    def committing(self) -> bool:
        """Whether the chunk this thread is running here has got to its (first) COMMIT:
        True from just before it until ``run()`` returns, so an executor that sees
        ``run()`` die knows the chunk may have committed."""
        run: ChunkRun | None = getattr(self._running, "run", None)
        return run is not None and run.committing

    def run(self, chunk: Chunk) -> ChunkResult:
        """Run the chunk; how each item went is in the result. Never raises, except
        ``KeyboardInterrupt`` in the caller's thread (``in_caller_thread``)."""
        warming = not getattr(self._running, "warmed", False)
        self._running.warmed = True
        run = ChunkRun(
            self._calls, chunk, before_commit=self._before_commit, progress=self._progress, warming=warming
        )
        self._running.run = run
        try:
            try:
                run.inputs.prepare()
                with _watching_writes(self.task.database, run):
                    if self.task.atomic == "chunk":
                        OneTransaction(run, self._careful).run()
                    else:
                        ItemByItem(run).run()
            except KeyboardInterrupt as error:
                if self.in_caller_thread:
                    raise
                run.crashed(error)
            except BaseException as error:  # a bug of ours, or a BaseException from our callers
                run.crashed(error)
            return run.finish()
        finally:
            self._running.run = None


def _watching_writes(database: str, run: ChunkRun) -> AbstractContextManager[Any]:
    """On SQLite, note when each item first takes a lock that holds other workers back (its
    first write in WAL mode, its first statement in rollback-journal mode): the work before
    it is what the pool decides ``each_item`` chunks from (sizing.py)."""
    connection = connections[database]
    if connection.vendor != "sqlite":
        return contextlib.nullcontext()
    clock = run.clock
    return connection.execute_wrapper(
        clock.watching_writes if in_wal_mode(connection) else clock.watching_statements
    )


def _tune_connection(database: str) -> None:
    """Give a worker's own SQLite connection a busy timeout long enough to queue for the lock."""
    connection = connections[database]
    if connection.vendor != "sqlite":
        return
    options = connection.settings_dict.get("OPTIONS", {})
    if options.get("timeout", 5) < SQLITE_BUSY_TIMEOUT:
        connection.close()
        connection.settings_dict = {
            **connection.settings_dict,
            "OPTIONS": {**options, "timeout": SQLITE_BUSY_TIMEOUT},
        }
