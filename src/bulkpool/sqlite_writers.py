"""SQLite's one writer, and the queue a run's workers wait for it in.

SQLite lets one transaction write at a time. A worker that finds the write lock taken waits
in SQLite's busy handler, which does not wait for the lock: it sleeps and tries again, 1, 2,
5, 10 ... up to 100 ms at a time. With more workers than the lock can serve at once (items
that mostly wait on something else, or many CPUs), the lock is soon free while every
waiter sleeps: the measured I/O cell ran at 0.82x the hand-written script so.

So the workers of one run queue for it themselves, on an ``flock`` of a file of the run's
own (``WriterQueue``): a worker takes the queue just before it takes SQLite's lock, and
leaves it when its transaction ends; a waiting worker looks again at least every
millisecond, and the kernel frees the queue if its holder dies, however it dies. The queue
only orders the run's own workers: SQLite's lock still guards the database, and its busy
handler still waits for any other writer (the caller's journal writes, another program) --
which, as the lock now passes from worker to worker at once, finds it free less often.

Where a transaction takes the lock that holds other writers back:

- at ``BEGIN IMMEDIATE`` (a chunk's transaction);
- in a ``BEGIN DEFERRED`` transaction (one heavy item's), at its first statement that may
  write in WAL mode (anything but a read or a savepoint), where readers never hold a writer
  back; at its first statement in rollback-journal mode, where a reader in a transaction
  keeps every writer from committing (``holds_back_writers``).

A worker takes the queue before the statement that takes SQLite's lock, so it does not wait
for the queue while holding that lock -- unless something wrote past Django's cursor (the
raw ``sqlite3`` connection), and then the queue's holder waits for SQLite's lock in turn.
So no worker waits in the queue longer than ``PATIENCE``: then it goes on without it, and
SQLite's busy handler waits, as it would with no queue at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no queue, SQLite's busy handler alone
    fcntl = None  # type: ignore[assignment]

PATIENCE = 10.0  # seconds in the queue, at most, before a worker goes on without it
LOOK_EVERY = 0.001  # seconds, at most, between two looks at a queue held by another worker
_READS = ("SELECT", "SAVEPOINT", "RELEASE", "EXPLAIN")  # in WAL mode, these take no write lock
_PREFIX = "bulkpool-sqlite-writer-"  # then the caller's pid


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
    """Whether this statement, the first of its kind in a deferred transaction, may take a
    lock that keeps other writers waiting: in WAL mode, anything but a read or a savepoint
    (a ``WITH ... INSERT``, DDL, a statement behind a comment: when unsure, it may write);
    in rollback-journal mode, any statement."""
    return not wal or not sql.lstrip()[:9].upper().startswith(_READS)


def new_queue(connection: Any) -> str | None:
    """A queue file for the workers of one run on ``connection``'s database: its path, or
    None where there is nothing to queue for (not an SQLite file) or no ``flock``.
    The run removes it (``remove_queue``) when its workers have stopped; the files of runs
    whose caller was killed are removed by the next run of this machine."""
    if fcntl is None or connection.vendor != "sqlite" or connection.is_in_memory_db():
        return None
    _remove_orphans()
    descriptor, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-", suffix=".lock")
    os.close(descriptor)
    return path


def _remove_orphans() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*.lock"):
        pid = path.name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):  # another's, or gone meanwhile
                path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_queue(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class WriterQueue:
    """One worker thread's place in the queue: ``take`` waits until no other worker of the
    run holds it (``PATIENCE`` at most); ``leave`` lets the next one in. Each thread opens
    the file itself: an ``flock`` belongs to an open file, which a forked process or a
    sibling thread sharing the descriptor would share."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()  # a forked child opens its own: the parent's open file is shared
        self.held = False
        self._passed = False  # this transaction went on without the queue: do not wait again
        self._descriptor = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def take(self) -> None:
        if self.held or self._passed:
            return
        deadline = time.monotonic() + PATIENCE
        pause = LOOK_EVERY / 16
        while True:
            try:
                fcntl.flock(self._descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self._passed = True
                    return
                time.sleep(pause)
                pause = min(2 * pause, LOOK_EVERY)
                continue
            self.held = True
            return

    def leave(self) -> None:
        self._passed = False
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
