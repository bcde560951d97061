"""What runs inside a worker: per-worker setup, then chunks, each in its transactions.

A ``Worker`` knows nothing of executors: the serial executor drives one in the caller's
thread, the thread executor one per thread, the process executor one per process.
``Worker.run(chunk)`` always returns a ``ChunkResult`` that says how each item went; it
never raises, except ``KeyboardInterrupt`` when it runs in the caller's own thread
(``in_caller_thread=True``: Ctrl-C is the caller's).

Data flow of one chunk under ``atomic="chunk"`` (the default):

    chunk --> prepare     with ``task.prepare``: each item prepared, outside any
                          transaction (no write lock held); func gets the values; a
                          failing item fails here and never reaches func. Done once per
                          run(): the redos, retries and splits below reuse the values
          --> attempt: one transaction (transactions.open_transaction)
                fast          no savepoints (a savepoint per item costs two round trips)
                  an item fails          --> roll back; redo with a savepoint per item;
                                             the failed item keeps its error, is not rerun
                  COMMIT refused         --> nothing committed; on PostgreSQL, redo "checked":
                  (a deferred FK dangles)    each item's savepoint ends with its deferred
                                             constraint checks, so the bad item fails alone
                  COMMIT refused again,  --> split into halves, each run and committed in
                  or no per-item checks      its own transaction with its own journal
                  (SQLite)                   record, recursively, until the bad item fails
                                             alone; the result is keyed by offset in the chunk
                  a transient error      --> Retry.again(): back off, fresh connection, same
                                             piece again; one budget for the whole chunk
                  connection lost in     --> with a journal, the next attempt asks it
                  COMMIT (in doubt)          whether the chunk committed; without one, its
                                             items fail with CommitUnknown (never written twice)
                  the journal write fails --> roll back; the items fail, saying so
                  an on_commit callback  --> the chunk stays committed and its items ok;
                  raises after COMMIT        the error goes to callback_errors[offset of
                                             the item that registered it] (inside the
                                             caller's transaction, callbacks are the caller's)
              <-- ChunkResult (errors, values, callback_errors, timings)

So ``func`` may run more than once for an item, as after any retry: keep side effects
outside the database in ``transaction.on_commit()``. The worker stays careful (savepoints)
while chunks keep failing, since failures come in runs.

``atomic="item"``: each item in its own transaction, retried alone. ``atomic=False``:
autocommit; nothing is retried (what an item wrote before its error stays written), and
an ``on_commit`` callback runs at once, inside ``func``: one that raises is that item's
failure.

Errors from user code -- ``BaseException`` too (``SystemExit``, a ``KeyboardInterrupt``
raised by ``func`` in a worker thread, ``GeneratorExit``) -- are the item's failure. A
return value the executor cannot send back (``Task.check_value``) fails its item before
COMMIT, so it is rolled back like any failure.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connections, transaction

from bulkpool.errors import CommitUnknown
from bulkpool.journal import AlreadyDone, is_recorded, record_chunk, recorded_result
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo, Task, Timings
from bulkpool.retrying import Retry, Transient, is_transient
from bulkpool.transactions import (
    CommitRefused,
    Transaction,
    checks_constraints_per_item,
    item_savepoint,
    open_transaction,
)

SQLITE_BUSY_TIMEOUT = 60  # seconds a worker waits for SQLite's write lock

# How careful a chunk attempt is: it climbs while the chunk fails, and stays up while
# chunks keep failing.
FAST = 0  # no savepoints
SAVEPOINTS = 1  # a savepoint per item
CHECKED = 2  # a savepoint per item, ending with the deferred constraint checks (PostgreSQL)


class _Redo(Exception):
    """An item failed in a chunk run without savepoints: roll back, run with them."""

    def __init__(self, index: int, error: ErrorInfo | None) -> None:
        self.index = index
        self.error = error


class _JournalFailed(Exception):
    """The journal could not be asked about the chunk, or its rows could not be written:
    the chunk must not commit without them."""

    def __init__(self, error: DatabaseError, *, reading: bool) -> None:
        self.error = error
        self.reading = reading


class _Unsendable(Exception):
    """The item's return value cannot be sent back by the executor (``Task.check_value``)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


@dataclass(frozen=True)
class _PrepareFailed:
    """In place of a prepared value: ``task.prepare`` raised for that item."""

    error: ErrorInfo


class Worker:
    """Runs ``task.func`` over chunks; one per thread or process, set up once.

    ``before_commit``: called just before each COMMIT (a process worker tells its parent,
    so that a death during COMMIT is known to leave the chunk in doubt).
    ``in_caller_thread``: the worker runs in the caller's thread (serial), so Ctrl-C --
    a ``KeyboardInterrupt`` -- propagates out of ``run()`` instead of failing an item.
    ``committing``: True from just before the chunk's (first) COMMIT until ``run()``
    returns, so an executor that sees ``run()`` die knows the chunk may have committed.
    """

    def __init__(
        self,
        task: Task,
        *,
        before_commit: Callable[[], None] | None = None,
        in_caller_thread: bool = False,
    ) -> None:
        self.task = task
        self.state: Any = None
        self.in_caller_thread = in_caller_thread
        self.committing = False
        self._call: Any = task.func
        self._prepare: Any = task.prepare
        # A func with a ``batch(items)`` method (fast=True) does a whole piece at once.
        self._batch: Any = getattr(task.func, "batch", None)
        self._before_commit = before_commit
        self._careful = FAST
        # Per run(): the chunk's result as pieces settle, which offsets are settled, the
        # items that failed once (by input index: not run twice), the time spent.
        self._result = ChunkResult(0, None)
        self._start = 0
        self._settled: set[int] = set()
        self._failed_before: dict[int, ErrorInfo] = {}
        self._times = {"prepare": 0.0, "load": 0.0, "work": 0.0, "commit": 0.0}
        # Per run(), with task.prepare: func's argument for each offset in the chunk, or
        # the ErrorInfo of a prepare that failed.
        self._prepared: list[Any] | None = None
        # The offsets of the latest transaction, and whether it has begun to COMMIT: what
        # a crash of ours leaves in doubt.
        self._current = range(0)
        self._in_commit = False

    def start(self) -> None:
        """Prepare this worker's connection and run the user's ``setup`` once."""
        if self.task.own_connections:
            _tune_connection(self.task.database)
        if self.task.setup is not None:
            self.state = self.task.setup()
            func, state = self.task.func, self.state
            self._call = lambda item: func(item, state)
            if self._batch is not None:
                batch = self._batch
                self._batch = lambda items: batch(items, state)
            if self.task.prepare is not None:
                prepare = self.task.prepare
                self._prepare = lambda item: prepare(item, state)

    def close(self) -> None:
        """Close the connections this worker opened (never the caller's)."""
        if self.task.own_connections:
            connections.close_all()

    # -- one chunk -------------------------------------------------------------------------

    def run(self, chunk: Chunk) -> ChunkResult:
        """Run the chunk; how each item went is in the result. Never raises (see above)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        self.committing = False
        self._result = ChunkResult(chunk.number, [None] * len(chunk) if self.task.keep_values else None)
        self._start = chunk.start
        self._settled = set()
        self._failed_before = {}
        self._times = dict.fromkeys(self._times, 0.0)
        self._current, self._in_commit = range(0), False
        self._prepared = None
        try:
            if self._prepare is not None:
                self._prepared = self._prepare_items(chunk)
            if self.task.atomic == "chunk":
                self._run_piece(chunk, Retry(self.task.retries, **self._where()), whole=True)
                if not self._result.errors:
                    self._careful = FAST
            else:
                self._run_items(chunk)
        except KeyboardInterrupt as error:
            if self.in_caller_thread:
                self.committing = False
                raise
            self._crashed(chunk, error)
        except BaseException as error:  # a bug of ours, or a BaseException from our callers
            self._crashed(chunk, error)
        result = self._result
        result.timings = Timings(
            prepare=self._times["prepare"],
            load=self._times["load"],
            work=self._times["work"],
            commit=self._times["commit"],
            total=time.perf_counter() - started,
            cpu=time.thread_time() - cpu_started,
        )
        self.committing = False
        return result

    def _where(self) -> dict[str, Any]:
        return {"database": self.task.database, "own_connection": self.task.own_connections}

    def _run_piece(
        self, piece: Chunk, retry: Retry, *, level: int | None = None, whole: bool = False
    ) -> None:
        """Run ``piece`` (the chunk, or a part of it after a refused COMMIT) to the end:
        committed, or failed, or split further. Settles its offsets in ``self._result``."""
        in_doubt: tuple[ChunkResult, BaseException] | None = None  # an attempt that may have committed
        level = self._careful if level is None else level
        while True:
            local = ChunkResult(piece.number, [None] * len(piece) if self.task.keep_values else None)
            try:
                txn = self._attempt(piece, local, level)
            except _Redo as redo:
                if redo.error is not None:
                    self._failed_before[redo.index] = redo.error
                level = max(level, SAVEPOINTS)
                continue
            except CommitRefused as refused:
                # Nothing was committed. Where each item's deferred checks can run in its
                # savepoint (PostgreSQL), run the chunk so; else (or if that did not find
                # it) split the chunk to find the item COMMIT refuses. Either way the items
                # that failed in this attempt keep their error and are not run again.
                for offset, failure in local.errors.items():
                    self._failed_before.setdefault(piece.start + offset, failure)
                if level < CHECKED and checks_constraints_per_item(self.task.database):
                    level = CHECKED
                    continue
                self._split(piece, refused.error, retry, level)
                return
            except AlreadyDone:
                # After a COMMIT in doubt, the journal says that attempt did commit.
                if in_doubt is not None:
                    self._settle(piece, in_doubt[0])
                elif whole:  # delivered again after it committed: the journal's outcome is its
                    self._settle(piece, self._recorded(piece))
                else:  # a piece committed by an earlier delivery of this chunk
                    self._settle(piece, ChunkResult(piece.number, None))
                return
            except _JournalFailed as failed:
                info = ErrorInfo.from_exception(failed.error)
                items = f"items {piece.start}..{piece.end - 1}"
                message = (
                    f"the journal could not be read for {items}"
                    if failed.reading
                    else f"the journal row for {items} could not be written"
                ) + f": {info.exc_type}: {info.message}; nothing of them was written"
                failure = ErrorInfo(info.exc_type, message, info.traceback)
                local.errors = dict.fromkeys(range(len(piece)), failure)
                local.values = None
                self._settle(piece, local)
                return
            except Transient as transient:
                if transient.in_doubt:
                    if not self.task.journal:
                        retry.recover()
                        self._settle(piece, _commit_unknown(local, range(len(piece)), transient.error))
                        return
                    in_doubt = (local, transient.error)  # the next attempt's journal check tells
                if retry.again():
                    self._result.retried += len(piece)
                    continue
                if in_doubt is not None:  # and the journal could not be asked
                    self._settle(piece, _commit_unknown(in_doubt[0], range(len(piece)), in_doubt[1]))
                else:  # still failing after every retry: nothing of the piece was written
                    local.errors = dict.fromkeys(range(len(piece)), ErrorInfo.from_exception(transient.error))
                    local.values = None
                    self._settle(piece, local)
                return
            if local.errors:  # failures come in runs: the next chunk starts this careful
                self._careful = max(self._careful, level)
            local.callback_errors = txn.callback_errors
            self._settle(piece, local)
            return

    def _attempt(self, piece: Chunk, result: ChunkResult, level: int) -> Transaction:
        """One transaction over the piece; raises what ``_run_piece`` handles."""
        task, database = self.task, self.task.database
        # COMMIT cannot answer for a dry run, so the check runs before its rollback.
        check = checks_constraints_per_item(database) and (task.dry_run or level >= CHECKED)
        txn: Transaction | None = None
        base = piece.start - self._start
        self._current, self._in_commit = range(base, base + len(piece)), False
        try:
            with open_transaction(
                database,
                dry_run=task.dry_run,
                check_constraints=check,
                before_commit=self._about_to_commit,
                in_caller_thread=self.in_caller_thread,
            ) as txn:
                if task.journal and self._journal_has(piece):
                    raise AlreadyDone
                if self._batch is not None and level == FAST:
                    self._run_batch(piece, result)
                    inputs = []
                else:
                    inputs = self._inputs(piece, result)
                for offset, item in inputs:
                    index = piece.start + offset
                    if index in self._failed_before:  # it ran once and failed: do not run it twice
                        result.errors[offset] = self._failed_before[index]
                        continue
                    mark = txn.callbacks_mark()
                    scope = (
                        item_savepoint(database, check_constraints=level >= CHECKED)
                        if level > FAST
                        else contextlib.nullcontext()
                    )
                    ok, _ = self._run_item(result, offset, item, scope, atomic=level > FAST)
                    if level == FAST and (not ok or transaction.get_rollback(using=database)):
                        raise _Redo(index, result.errors.get(offset))
                    if ok:
                        txn.claim_callbacks(mark, offset)
                if task.journal and not task.dry_run:
                    self._record(piece, result)
        finally:
            if txn is not None:
                self._times["commit"] += txn.commit_seconds
        return txn

    def _run_batch(self, piece: Chunk, result: ChunkResult) -> None:
        """The piece's items in one call of ``func.batch`` (the bulk path of ``fast=True``).
        Anything it raises but a transient error rolls the piece back, to be run again item
        by item with savepoints (the exact path), so a failing item fails alone."""
        pairs = []
        for offset, item in self._inputs(piece, result):
            index = piece.start + offset
            if index in self._failed_before:
                result.errors[offset] = self._failed_before[index]
            else:
                pairs.append((offset, item))
        started = time.perf_counter()
        try:
            values = self._batch([item for _, item in pairs])
            if self.task.check_value is not None and self.task.keep_values:
                for value in values:
                    self.task.check_value(value)
        except KeyboardInterrupt:
            if self.in_caller_thread:
                raise
            raise _Redo(-1, None) from None
        except BaseException as error:
            if is_transient(error):
                raise Transient(error) from error
            raise _Redo(-1, None) from error
        finally:
            self._times["work"] += time.perf_counter() - started
        if result.values is not None:
            for (offset, _), value in zip(pairs, values, strict=True):
                result.values[offset] = value

    def _journal_has(self, piece: Chunk) -> bool:
        try:
            return is_recorded(self.task.journal, self.task.database, piece)
        except DatabaseError as error:
            if is_transient(error):
                raise Transient(error) from error
            raise _JournalFailed(error, reading=True) from error

    def _recorded(self, piece: Chunk) -> ChunkResult:
        """What the journal recorded of a piece that committed before (its values too, where
        kept); if it cannot be read, the piece is reported skipped."""
        try:
            recorded = recorded_result(self.task.journal, self.task.database, piece)
        except DatabaseError:
            self._result.skipped = True
            return ChunkResult(piece.number, None)
        if not self.task.keep_values:
            recorded.values = None
        return recorded

    def _record(self, piece: Chunk, result: ChunkResult) -> None:
        try:
            record_chunk(self.task.journal, self.task.database, piece, result.errors, result.values)
        except AlreadyDone:
            raise
        except DatabaseError as error:
            if is_transient(error):
                raise Transient(error) from error
            raise _JournalFailed(error, reading=False) from error

    def _split(self, piece: Chunk, error: DatabaseError, retry: Retry, level: int) -> None:
        """COMMIT refused the piece: find the item it refused by running halves on their own
        (as carefully as the piece ran: its failures may be theirs)."""
        if len(piece) > 1:
            for half in piece.halves():
                self._run_piece(half, retry, level=level)
            return
        index = piece.start
        if index in self._failed_before or not self.task.journal:
            # Nothing of it ran or nothing is left to write: it failed, alone.
            failed = ChunkResult(piece.number, None, {0: self._failed_before.get(index) or _info(error)})
            self._settle(piece, failed)
            return
        # The item failed alone; its piece still gets its journal record (with the failure).
        self._failed_before[index] = _info(error)
        self._run_piece(piece, retry, level=level)

    def _settle(self, piece: Chunk, local: ChunkResult) -> None:
        """Put a finished piece's outcome into the chunk's result, keyed by offset in the chunk."""
        base = piece.start - self._start
        result = self._result
        for offset, error in local.errors.items():
            result.errors[base + offset] = error
        for offset, error in local.callback_errors.items():
            result.callback_errors[base + offset] = error
        if result.values is not None and local.values is not None:
            result.values[base : base + len(piece)] = local.values
        self._settled.update(range(base, base + len(piece)))

    def _crashed(self, chunk: Chunk, error: BaseException) -> None:
        """Something outside any item broke: the items not settled yet fail with it -- or,
        if it broke during their COMMIT, with CommitUnknown: they may have been written."""
        info = ErrorInfo.from_exception(error)
        unsettled = [offset for offset in range(len(chunk)) if offset not in self._settled]
        in_doubt = [offset for offset in unsettled if self._in_commit and offset in self._current]
        _commit_unknown(self._result, in_doubt, error)
        for offset in unsettled:
            self._result.errors.setdefault(offset, info)
            if self._result.values is not None:
                self._result.values[offset] = None

    def _about_to_commit(self) -> None:
        self.committing = True
        if self._before_commit is not None:
            self._before_commit()  # if this raises, COMMIT never runs: nothing in doubt
        self._in_commit = True

    # -- atomic="item" and atomic=False ----------------------------------------------------

    def _run_items(self, chunk: Chunk) -> None:
        result = self._result
        retry = Retry(self.task.retries, **self._where())
        while True:  # loading runs outside any transaction: retried on its own
            try:
                inputs = self._inputs(chunk, result)
                break
            except Transient as transient:
                if not retry.again():
                    failure = ErrorInfo.from_exception(transient.error)
                    result.errors = dict.fromkeys(range(len(chunk)), failure)
                    self._settled.update(range(len(chunk)))
                    return
        self._settled.update(result.errors)  # items that failed to load
        for offset, item in inputs:
            if self.task.atomic == "item":
                self._run_item_in_its_transaction(offset, item)
            else:
                self._run_item_in_autocommit(offset, item)
            self._settled.add(offset)

    def _run_item_in_its_transaction(self, offset: int, item: Any) -> None:
        result, task = self._result, self.task
        retry = Retry(task.retries, **self._where())
        while True:
            self._current, self._in_commit = range(offset, offset + 1), False
            scope = open_transaction(
                task.database,
                dry_run=task.dry_run,
                before_commit=self._about_to_commit,
                in_caller_thread=self.in_caller_thread,
            )
            try:
                ok, txn = self._run_item(result, offset, item, scope, atomic=True)
            except Transient as transient:
                if result.values is not None:
                    result.values[offset] = None
                if transient.in_doubt:
                    retry.recover()
                    result.errors.pop(offset, None)  # an earlier attempt's error
                    _commit_unknown(result, [offset], transient.error)
                    return
                result.errors[offset] = ErrorInfo.from_exception(transient.error)
                if retry.again():
                    result.retried += 1
                    continue
                return
            if txn is not None:
                self._times["commit"] += txn.commit_seconds
                if ok:
                    # Callbacks registered outside any savepoint of its own are still its.
                    for error in txn.callback_errors.values():
                        result.callback_errors.setdefault(offset, error)
            return

    def _run_item_in_autocommit(self, offset: int, item: Any) -> None:
        try:
            self._run_item(self._result, offset, item, contextlib.nullcontext(), atomic=False)
        except Transient as transient:
            # What the item wrote before the error stays written: running it again could
            # write that twice, so it is not retried; the next item gets a fresh connection.
            self._result.errors[offset] = ErrorInfo.from_exception(transient.error)
            Retry(0, **self._where()).recover(back_off=False)

    # -- one item --------------------------------------------------------------------------

    def _prepare_items(self, chunk: Chunk) -> list[Any]:
        """Each item's prepared value (or the ErrorInfo of its failure), outside any
        transaction of ours. Errors in prepare are the item's, as in func; Ctrl-C in the
        caller's thread is the caller's."""
        started = time.perf_counter()
        prepared: list[Any] = []
        try:
            for item in chunk.items:
                try:
                    prepared.append(self._prepare(item))
                except KeyboardInterrupt as error:
                    if self.in_caller_thread:
                        raise
                    prepared.append(_PrepareFailed(ErrorInfo.from_exception(error)))
                except BaseException as error:
                    prepared.append(_PrepareFailed(ErrorInfo.from_exception(error)))
        finally:
            self._times["prepare"] += time.perf_counter() - started
        return prepared

    def _inputs(self, chunk: Chunk, result: ChunkResult) -> list[tuple[int, Any]]:
        """(offset, argument) pairs to call func with: the chunk's items, what ``task.prepare``
        made of them, or what ``task.load`` made of them; items that failed to prepare or to
        load are recorded as failures and left out."""
        if self._prepared is not None:
            base = chunk.start - self._start
            inputs = []
            for offset, value in enumerate(self._prepared[base : base + len(chunk)]):
                if isinstance(value, _PrepareFailed):
                    result.errors[offset] = value.error
                else:
                    inputs.append((offset, value))
            return inputs
        if self.task.load is None:
            return list(enumerate(chunk.items))
        started = time.perf_counter()
        try:
            loaded = self.task.load(chunk.items)
        except Exception as error:
            if is_transient(error):
                raise Transient(error) from error
            loaded = [error] * len(chunk)
        finally:
            self._times["load"] += time.perf_counter() - started
        inputs = []
        for offset, value in enumerate(loaded):
            if isinstance(value, BaseException):
                result.errors[offset] = ErrorInfo.from_exception(value)
            else:
                inputs.append((offset, value))
        return inputs

    def _run_item(
        self, result: ChunkResult, offset: int, item: Any, scope: AbstractContextManager[Any], *, atomic: bool
    ) -> tuple[bool, Any]:
        """Call func on one item inside ``scope`` (its savepoint, its transaction, or none).

        Returns whether it went well, and what ``scope`` gave (its Transaction, if any).
        Raises only ``Transient`` (and Ctrl-C in the caller's thread): every other error,
        ``BaseException``s included, is the item's failure, after ``scope`` rolled back.
        """
        database = self.task.database
        entered: Any = None
        started = time.perf_counter()
        try:
            with scope as entered:
                value = self._call(item)
                if self.task.check_value is not None and self.task.keep_values:
                    self._check_value(value)
                if atomic and transaction.get_rollback(using=database):
                    raise RuntimeError(
                        "a database error was caught inside the item, so its work was rolled "
                        "back; let the error propagate, or wrap the failing query in "
                        "transaction.atomic()"
                    )
        except Transient:
            raise
        except KeyboardInterrupt as error:
            if self.in_caller_thread:
                raise
            result.errors[offset] = ErrorInfo.from_exception(error)
            return False, entered
        except BaseException as error:
            if is_transient(error):
                raise Transient(error) from error
            result.errors[offset] = self._error_info(error)
            return False, entered
        finally:
            self._times["work"] += time.perf_counter() - started
        result.errors.pop(offset, None)
        if result.values is not None:
            result.values[offset] = value
        return True, entered

    def _check_value(self, value: Any) -> None:
        assert self.task.check_value is not None
        try:
            self.task.check_value(value)
        except Exception as error:
            raise _Unsendable(error) from error

    def _error_info(self, error: BaseException) -> ErrorInfo:
        if isinstance(error, CommitRefused):  # atomic="item": COMMIT refused the item
            return _info(error.error)
        if isinstance(error, _Unsendable):
            info = ErrorInfo.from_exception(error.error)
            autocommit = self.task.atomic is False
            written = " (it ran in autocommit, so its work stays written)" if autocommit else ""
            return ErrorInfo(
                info.exc_type,
                f"its return value cannot be sent back: {info.message}{written}",
                info.traceback,
                unsafe=autocommit,
            )
        return ErrorInfo.from_exception(error)


def _info(error: BaseException) -> ErrorInfo:
    return ErrorInfo.from_exception(error)


def _commit_unknown(result: ChunkResult, offsets: Iterable[int], error: BaseException) -> ChunkResult:
    """Fail the items whose COMMIT was in doubt (those that failed on their own keep their error)."""
    unknown = ErrorInfo.of_kind(
        CommitUnknown,
        f"the connection was lost during COMMIT ({type(error).__name__}: {error}), so whether "
        "this item was written is unknown; it was not run again, so that it cannot be written "
        "twice. Check it, or use run_id=..., with which bulkpool finds out and resumes exactly",
        ErrorInfo.from_exception(error).traceback,
    )
    for offset in offsets:
        result.errors.setdefault(offset, unknown)
    return result


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
