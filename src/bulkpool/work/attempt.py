"""One attempt at a piece of a chunk: one transaction over it, as careful as asked.

    open_transaction(piece)
      journal_has(piece)          --> AlreadyDone: an earlier delivery committed it
      FAST with func.batch        --> one call for the piece; anything it raises --> Redo
      FAST                        --> the items, no savepoints; one fails --> Redo
      SAVEPOINTS / CHECKED        --> a savepoint per item (CHECKED: ending with the
                                      deferred constraint checks), so an item fails alone
      record(piece, errors)       --> the journal row, in the same transaction
    COMMIT (transactions.py)      --> CommitRefused, Transient (in doubt or not)

The items that failed in an earlier attempt (``ChunkRun.failed_before``) keep their error
and are not run again. What an attempt raises, ``OneTransaction`` handles.
"""

from __future__ import annotations

import contextlib
import threading

from django.db import connections

from bulkpool.journal import AlreadyDone
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo
from bulkpool.retrying import Transient, is_transient
from bulkpool.transactions import Transaction, checks_constraints_per_item, item_savepoint, open_transaction
from bulkpool.work.chunk_run import ChunkRun
from bulkpool.work.journaling import journal_has, record

# How careful an attempt is: it climbs while the chunk fails, and stays up while chunks
# keep failing.
FAST = 0  # no savepoints
SAVEPOINTS = 1  # a savepoint per item
CHECKED = 2  # a savepoint per item, ending with the deferred constraint checks (PostgreSQL)


class Carefulness:
    """The level the next chunk starts at, carried between the chunks of one Worker.

    Failures come in runs: a chunk that needed savepoints leaves the next ones careful,
    and a chunk without failures makes them fast again. Threads that share a Worker
    share it; a lock keeps each change whole.
    """

    def __init__(self) -> None:
        self._level = FAST
        self._lock = threading.Lock()

    @property
    def level(self) -> int:
        return self._level

    def raise_to(self, level: int) -> None:
        with self._lock:
            self._level = max(self._level, level)

    def relax(self) -> None:
        with self._lock:
            self._level = FAST


class Redo(Exception):
    """An item failed in an attempt without savepoints: roll back, run with them."""

    def __init__(self, index: int, error: ErrorInfo | None) -> None:
        self.index = index
        self.error = error


def attempt(
    run: ChunkRun, piece: Chunk, result: ChunkResult, level: int, *, deferred: bool = False
) -> Transaction:
    """One transaction over the piece; raises what ``OneTransaction`` handles.

    ``deferred`` (one item, SQLite): the write lock is taken at the item's first write, so
    the journal is asked before the transaction -- a read inside it would start a snapshot
    that the first write may find stale. The record written last still refuses a piece
    that another delivery committed meanwhile (AlreadyDone).
    """
    task, database = run.task, run.task.database
    # COMMIT cannot answer for a dry run, so the check runs before its rollback.
    check = checks_constraints_per_item(database) and (task.dry_run or level >= CHECKED)
    txn: Transaction | None = None
    run.begin(run.offsets(piece))
    if deferred and task.journal and journal_has(task, piece):
        raise AlreadyDone
    try:
        with open_transaction(
            database,
            dry_run=task.dry_run,
            check_constraints=check,
            before_commit=run.about_to_commit,
            in_caller_thread=run.calls.in_caller_thread,
            deferred=deferred,
            writer_queue=task.writer_queue,
        ) as txn:
            if task.journal and not deferred and journal_has(task, piece):
                raise AlreadyDone
            if run.calls.batch is not None and level == FAST:
                _run_batch(run, piece, result)
            else:
                _run_items(run, txn, piece, result, level)
            if task.journal and not task.dry_run:
                record(task, piece, result.errors, result.values)
    finally:
        if txn is not None:
            run.clock.ended_transaction(txn.commit_seconds)
    return txn


def _run_items(run: ChunkRun, txn: Transaction, piece: Chunk, result: ChunkResult, level: int) -> None:
    database = run.task.database
    connection = connections[database]  # this thread's, looked up once: it is asked after every item
    for offset, item in run.inputs.for_piece(piece, result):
        index = piece.start + offset
        if index in run.failed_before:  # it ran once and failed: do not run it twice
            result.errors[offset] = run.failed_before[index]
            continue
        mark = txn.callbacks_mark()
        scope = (
            item_savepoint(database, check_constraints=level >= CHECKED)
            if level > FAST
            else contextlib.nullcontext()
        )
        ok, _ = run.caller.run_item(result, offset, item, scope, atomic=level > FAST)
        if level == FAST and (not ok or connection.get_rollback()):
            raise Redo(index, result.errors.get(offset))
        if ok:
            txn.claim_callbacks(mark, offset)


def _run_batch(run: ChunkRun, piece: Chunk, result: ChunkResult) -> None:
    """The piece's items in one call of ``Task.batch`` (the bulk path of ``fast=True``).
    Anything it raises but a transient error rolls the piece back, to be run again item
    by item with savepoints (the exact path), so a failing item fails alone."""
    batch, task = run.calls.batch, run.task
    assert batch is not None
    pairs = []
    for offset, item in run.inputs.for_piece(piece, result):
        index = piece.start + offset
        if index in run.failed_before:
            result.errors[offset] = run.failed_before[index]
        else:
            pairs.append((offset, item))
    try:
        with run.clock.timing("work"):
            values = batch([item for _, item in pairs])
            if task.check_value is not None and task.keep_values:
                for value in values:
                    task.check_value(value)
    except KeyboardInterrupt:
        if run.calls.in_caller_thread:
            raise
        raise Redo(-1, None) from None
    except BaseException as error:
        if is_transient(error):
            raise Transient(error) from error
        raise Redo(-1, None) from error
    if result.values is not None:
        for (offset, _), value in zip(pairs, values, strict=True):
            result.values[offset] = value
