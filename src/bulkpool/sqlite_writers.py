"""SQLite's one writer, and the queue a run's workers wait for it in.

SQLite lets one transaction write at a time. A worker that finds the write lock taken waits
in SQLite's busy handler, which does not wait for the lock: it sleeps and tries again, 1, 2,
5, 10 ... up to 100 ms at a time. With more workers than the lock can serve at once (items
that mostly wait on something else, or many CPUs), the lock is soon free while every
waiter sleeps: the measured I/O cell ran at 0.82x the hand-written script so.

So the workers of one run queue for it themselves, on an ``flock`` of a file of the run's
own (``WriterQueue``): a worker takes the queue just before it takes SQLite's lock, and
leaves it when its transaction ends; the kernel wakes the next waiter the moment it is left,
and frees it if its holder dies, however it dies. The queue only orders the run's own
workers: SQLite's lock still guards the database, and its busy handler still waits for any
other writer (the caller, another program).

Where a transaction takes the lock that holds other writers back:

- at ``BEGIN IMMEDIATE`` (a chunk's transaction);
- in a ``BEGIN DEFERRED`` transaction (one heavy item's), at its first write in WAL mode,
  where readers never hold a writer back; at its first statement in rollback-journal mode,
  where a reader in a transaction keeps every writer from committing (``holds_back_writers``).

A worker never waits for the queue while it holds an SQLite lock (it takes the queue before
the statement that takes the lock), so the queue adds no deadlock that SQLite would not see.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no queue, SQLite's busy handler alone
    fcntl = None  # type: ignore[assignment]

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def in_wal_mode(connection: Any) -> bool:
    """Whether the SQLite database is in WAL mode (asked once per connection)."""
    known = getattr(connection, "_bulkpool_wal", None)
    if known is None or known[0] is not connection.connection:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            known = (connection.connection, str(cursor.fetchone()[0]).lower() == "wal")
        connection._bulkpool_wal = known
    return bool(known[1])


def holds_back_writers(sql: str, *, wal: bool) -> bool:
    """Whether this statement, the first of its kind in a deferred transaction, takes a lock
    that keeps other writers waiting: a write in WAL mode, any statement in rollback-journal mode."""
    return not wal or sql.lstrip()[:7].upper().startswith(_WRITES)


def new_queue(connection: Any) -> str | None:
    """A queue file for the workers of one run on ``connection``'s database: its path, or
    None where there is nothing to queue for (not an SQLite file) or no ``flock``.
    The run removes it (``remove_queue``) when its workers have stopped."""
    if fcntl is None or connection.vendor != "sqlite" or connection.is_in_memory_db():
        return None
    descriptor, path = tempfile.mkstemp(prefix="bulkpool-sqlite-writer-", suffix=".lock")
    os.close(descriptor)
    return path


def remove_queue(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class WriterQueue:
    """One worker thread's place in the queue: ``take`` blocks until no other worker of the
    run holds it; ``leave`` lets the next one in. Each thread opens the file itself: an
    ``flock`` belongs to an open file, which a forked process or a sibling thread sharing
    the descriptor would share."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()  # a forked child opens its own: the parent's open file is shared
        self.held = False
        self._descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def take(self) -> None:
        if not self.held:
            fcntl.flock(self._descriptor, fcntl.LOCK_EX)
            self.held = True

    def leave(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._descriptor)


def queue_of(connection: Any, path: str | None) -> WriterQueue | None:
    """This connection's place in the queue at ``path`` (Django's connections are per
    thread, so each worker thread has its own), opened on first use. None without a path,
    or when the file is gone (the run that made it has ended: SQLite's busy handler alone)."""
    if path is None:
        return None
    queue: WriterQueue | None = getattr(connection, "_bulkpool_writer_queue", None)
    if queue is not None and queue.path == path and queue.pid == os.getpid():
        return queue
    if queue is not None and queue.pid == os.getpid():
        queue.close()
    try:
        queue = WriterQueue(path)
    except FileNotFoundError:
        queue = None
    connection._bulkpool_writer_queue = queue
    return queue


def close_queue(connection: Any) -> None:
    """Close this connection's place in a queue, if it has one (its worker is done)."""
    queue: WriterQueue | None = getattr(connection, "_bulkpool_writer_queue", None)
    if queue is not None and queue.pid == os.getpid():
        queue.leave()
        queue.close()
    connection._bulkpool_writer_queue = None
