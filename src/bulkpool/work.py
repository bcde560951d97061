"""What runs inside a worker: per-worker setup, then chunks, each in its transactions.

A ``Worker`` knows nothing of executors: the serial executor drives one in the caller's
thread, the thread executor one per thread, the process executor one per process.

Transactions, for ``atomic="chunk"`` (the default): one transaction per chunk, and a
failing item rolls back only its own work: the rest of the chunk is still committed. A
savepoint per item would cost two round trips per item, so a chunk first runs without
them; if an item fails, the chunk is rolled back and run again with a savepoint per item
(and the worker stays that careful while chunks keep failing). So ``func`` may run more
than once for an item -- as it may after any retry: keep side effects outside the
database in ``transaction.on_commit()``. A transient database error (lost connection, deadlock, SQLite
busy) rolls the whole chunk back; it then runs again on a fresh connection.

A connection lost *during* COMMIT is different: the server may have committed and only
the answer was lost, so running the chunk again could write it twice. Such a chunk runs
again only when the run journal can tell whether it was committed (``run_id``); without
it, its items are reported as failed with ``bulkpool.CommitUnknown``, never written twice.
Before COMMIT the connection is checked, so a connection that died while the
transaction was open (it rolled back) is retried as usual, and only a loss in the COMMIT
round trip itself is in doubt.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.db import OperationalError, connections, transaction

from bulkpool.errors import is_transient
from bulkpool.journal import AlreadyDone, is_recorded, record_chunk
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo, Task

SQLITE_BUSY_TIMEOUT = 60  # seconds a worker waits for SQLite's write lock
MAX_BACKOFF = 5.0
RECONNECT_TIMEOUT = 120.0  # seconds a worker waits for its database to come back


class _Redo(Exception):
    """An item failed in a chunk run without savepoints: roll it back, run it with them."""

    def __init__(self, offset: int, error: ErrorInfo | None) -> None:
        self.offset = offset
        self.error = error


class _Transient(Exception):
    """Carries a transient database error out of a chunk transaction so it is retried.

    ``in_doubt``: the error came from COMMIT, so the transaction may have been committed.
    """

    def __init__(self, error: BaseException, *, in_doubt: bool = False) -> None:
        self.error = error
        self.in_doubt = in_doubt


class Worker:
    """Runs ``task.func`` over chunks; one per thread or process, set up once."""

    def __init__(self, task: Task, *, before_commit: Callable[[], None] | None = None) -> None:
        self.task = task
        self.state: Any = None
        self._call: Callable[[Any], Any] = task.func
        # Called just before a chunk's COMMIT: a process worker tells its parent, so that a
        # death during COMMIT is known to leave the chunk in doubt.
        self._before_commit = before_commit
        self._careful = False  # run chunks with a savepoint per item (after a failure)

    def start(self) -> None:
        """Prepare this worker's connection and run the user's ``setup`` once."""
        if self.task.own_connections:
            _tune_connection(self.task.database)
        if self.task.setup is not None:
            self.state = self.task.setup()
            func, state = self.task.func, self.state
            self._call = lambda item: func(item, state)

    def close(self) -> None:
        """Close the connections this worker opened (never the caller's)."""
        if self.task.own_connections:
            connections.close_all()

    def run(self, chunk: Chunk) -> ChunkResult:
        if self.task.atomic == "chunk":
            return self._run_chunk_atomically(chunk)
        result = ChunkResult(chunk.number, [None] * len(chunk) if self.task.keep_values else None)
        for offset, item in self._inputs_with_retries(chunk, result):
            self._run_item_with_retries(result, offset, item)
        return result

    def _run_chunk_atomically(self, chunk: Chunk) -> ChunkResult:
        task = self.task
        # An attempt whose COMMIT may have gone through, and the error that left it in doubt.
        in_doubt: tuple[ChunkResult, BaseException] | None = None
        careful = self._careful
        failed_before: dict[int, ErrorInfo] = {}
        attempt = 0
        while attempt <= task.retries:
            result = ChunkResult(chunk.number, [None] * len(chunk) if task.keep_values else None)
            result.retried = attempt * len(chunk)
            try:
                with self._transaction(rollback=task.dry_run, before_commit=self._before_commit):
                    if task.journal and is_recorded(task.journal, task.database, chunk):
                        raise AlreadyDone
                    for offset, item in self._inputs(chunk, result):
                        if offset in failed_before:  # it ran once and failed: do not run it twice
                            result.errors[offset] = failed_before[offset]
                            continue
                        self._run_item(result, offset, item, atomic=careful)
                        if not careful and (offset in result.errors or self._rollback_pending()):
                            raise _Redo(offset, result.errors.get(offset))
                    if task.journal and not task.dry_run:
                        record_chunk(task.journal, task.database, chunk, result.errors)
                # Failures come in runs: stay careful while chunks keep failing.
                self._careful = careful and bool(result.errors)
                return result
            except _Redo as redo:
                careful = True  # an item failed: run the chunk again, each item in a savepoint
                if redo.error is not None:
                    failed_before[redo.offset] = redo.error
                continue
            except AlreadyDone:
                # After a COMMIT in doubt, the journal row says that attempt did commit.
                return in_doubt[0] if in_doubt else ChunkResult(chunk.number, None, skipped=True)
            except _Transient as transient:
                if transient.in_doubt:
                    if not task.journal:
                        self._recover(attempt)
                        return _commit_unknown(result, range(len(chunk)), transient.error)
                    in_doubt = (result, transient.error)  # the next attempt's journal check tells
                last_error = transient.error
                self._recover(attempt)
            attempt += 1
        if in_doubt:  # and the journal could not be asked
            return _commit_unknown(in_doubt[0], range(len(chunk)), in_doubt[1])
        # Still failing after every retry: nothing of the chunk was written.
        error = ErrorInfo.from_exception(last_error)
        result.errors = dict.fromkeys(range(len(chunk)), error)
        return result

    def _rollback_pending(self) -> bool:
        """An item caught a database error itself: the chunk's transaction is doomed."""
        return transaction.get_rollback(using=self.task.database)

    def _inputs(self, chunk: Chunk, result: ChunkResult) -> list[tuple[int, Any]]:
        """(offset, argument) pairs to call func with: the chunk's items, or what ``task.load``
        made of them; items that failed to load are recorded as failures and left out."""
        if self.task.load is None:
            return list(enumerate(chunk.items))
        try:
            loaded = self.task.load(chunk.items)
        except Exception as error:
            if is_transient(error):
                raise _Transient(error) from error
            loaded = [error] * len(chunk)
        inputs = []
        for offset, value in enumerate(loaded):
            if isinstance(value, BaseException):
                result.errors[offset] = ErrorInfo.from_exception(value)
            else:
                inputs.append((offset, value))
        return inputs

    def _inputs_with_retries(self, chunk: Chunk, result: ChunkResult) -> list[tuple[int, Any]]:
        for attempt in range(self.task.retries + 1):
            try:
                return self._inputs(chunk, result)
            except _Transient as transient:
                last_error = transient.error
                self._recover(attempt)
        result.errors = dict.fromkeys(range(len(chunk)), ErrorInfo.from_exception(last_error))
        return []

    def _run_item_with_retries(self, result: ChunkResult, offset: int, item: Any) -> None:
        # Without a transaction, what the item wrote before the error stays written: running
        # it again could write that twice, so only atomic="item" retries.
        attempts = self.task.retries + 1 if self.task.atomic == "item" else 1
        for attempt in range(attempts):
            try:
                self._run_item(result, offset, item, atomic=self.task.atomic == "item")
                return
            except _Transient as transient:
                if transient.in_doubt:
                    self._recover(attempt)
                    result.errors.pop(offset, None)  # an earlier attempt's error
                    _commit_unknown(result, [offset], transient.error)
                    return
                result.errors[offset] = ErrorInfo.from_exception(transient.error)
                self._recover(attempt)  # a fresh connection for the next attempt or item
                if attempt + 1 < attempts:
                    result.retried += 1

    def _run_item(self, result: ChunkResult, offset: int, item: Any, *, atomic: bool) -> None:
        """Call func on one item -- in its own transaction or savepoint when ``atomic``."""
        database = self.task.database
        # In a dry run an item's own transaction rolls back; a savepoint in a chunk does not,
        # so later items see earlier ones' rows, as they would for real.
        rollback = self.task.dry_run and self.task.atomic == "item"
        try:
            with self._transaction(rollback=rollback) if atomic else contextlib.nullcontext():
                value = self._call(item)
                if atomic and transaction.get_rollback(using=database):
                    raise RuntimeError(
                        "a database error was caught inside the item, so its work was rolled "
                        "back; let the error propagate, or wrap the failing query in "
                        "transaction.atomic()"
                    )
        except _Transient:
            raise
        except Exception as error:
            if is_transient(error):
                raise _Transient(error) from error
            result.errors[offset] = ErrorInfo.from_exception(error)
            return
        result.errors.pop(offset, None)
        if result.values is not None:
            result.values[offset] = value

    @contextlib.contextmanager
    def _transaction(
        self, *, rollback: bool = False, before_commit: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """``transaction.atomic`` (a savepoint when nested) that starts SQLite transactions
        IMMEDIATE, turns transient database errors into ``_Transient``, and with
        ``rollback`` rolls back even when all went well (a dry run)."""
        database = self.task.database
        connection = connections[database]
        wrapper = _begin_immediate if connection.vendor == "sqlite" else _pass_through
        outermost = not connection.in_atomic_block  # a transaction, not a savepoint
        committing = False
        try:
            with connection.execute_wrapper(wrapper), transaction.atomic(using=database):
                yield
                if rollback:
                    transaction.set_rollback(True, using=database)
                elif outermost and not connection.needs_rollback:
                    if not connection.is_usable():  # died with the transaction open: rolled back
                        raise _Transient(OperationalError("the connection was lost before COMMIT"))
                    # A failed SQLite COMMIT did not commit; a server's may have.
                    committing = connection.vendor != "sqlite"
                    if before_commit is not None:
                        before_commit()
        except _Transient:
            raise
        except Exception as error:
            if is_transient(error):
                raise _Transient(error, in_doubt=committing) from error
            raise

    def _recover(self, attempt: int) -> None:
        """Back off, drop the connection, and wait for the database to take a new one.

        Waiting for the database does not use up attempts: a worker whose database is
        down (restarting, refusing connections) holds its chunk and waits, rather than
        failing the chunk and taking the next.
        """
        time.sleep(min(MAX_BACKOFF, 0.2 * 2**attempt) * (0.5 + random.random()))
        if not self.task.own_connections:
            return
        connection = connections[self.task.database]
        connection.close()
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        pause = 0.1
        while True:
            try:
                connection.ensure_connection()
                return
            except Exception as error:
                if not is_transient(error) or time.monotonic() > deadline:
                    return  # the next attempt fails with this error, and says so
                connection.close()
                time.sleep(pause)
                pause = min(pause * 2, 2.0)


def _commit_unknown(result: ChunkResult, offsets: Iterable[int], error: BaseException) -> ChunkResult:
    """Fail the items whose COMMIT was in doubt (those that failed on their own keep their error)."""
    unknown = ErrorInfo(
        "bulkpool.CommitUnknown",
        f"the connection was lost during COMMIT ({type(error).__name__}: {error}), so whether "
        "this item was written is unknown; it was not run again, so that it cannot be written "
        "twice. Check it, or use run_id=..., with which bulkpool finds out and resumes exactly",
        ErrorInfo.from_exception(error).traceback,
    )
    for offset in offsets:
        result.errors.setdefault(offset, unknown)
    return result


def _begin_immediate(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
    # A deferred SQLite transaction that reads and then writes fails at once with
    # "database is locked" when another worker writes; IMMEDIATE waits for the lock instead.
    return execute("BEGIN IMMEDIATE" if sql == "BEGIN" else sql, *args)


def _pass_through(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
    return execute(sql, *args)


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
