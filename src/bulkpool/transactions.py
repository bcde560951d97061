"""The transactions a worker opens: one per chunk (or per item), a savepoint per item.

Data flow for one chunk transaction (``work/attempt.py`` fills the body):

    open_transaction()      BEGIN (IMMEDIATE on SQLite, or DEFERRED for one item's
                            transaction: see below), or a savepoint inside the caller's
                            transaction (serial backend in a TestCase)
      body                  the items, each perhaps in item_savepoint(); after each item,
                            Transaction.claim_callbacks() tags its on_commit callbacks
    commit phase            only for a transaction of our own:
      constraint check      if asked (PostgreSQL): SET CONSTRAINTS ALL IMMEDIATE
                            -> CommitRefused
      dry run               roll back here, after the check (so a dry run reports it too)
      liveness              a connection that died with the transaction open rolled back:
                            Transient, retried as usual
      before_commit()       the worker says "committing" (a death from now on is in doubt)
      COMMIT                refused (an error answer) -> CommitRefused: it did not commit
                            lost connection -> Transient(in_doubt=True)
      callbacks             on_commit callbacks run, guarded: one that raises is recorded
                            in Transaction.callback_errors against its item, never raised

Deferred constraints: Django creates foreign keys DEFERRABLE INITIALLY DEFERRED on
PostgreSQL and SQLite, so a row whose foreign key dangles is refused only by COMMIT,
which cannot say which row it was -- but an error *answer* from COMMIT (IntegrityError)
means that nothing was committed, so the chunk can be run again. On PostgreSQL, SET
CONSTRAINTS ALL IMMEDIATE runs the pending checks at once and, run at the end of an
item's savepoint (``item_savepoint(check_constraints=True)``), blames that item alone.
SQLite has no such statement (``PRAGMA foreign_key_check`` and Django's
``check_constraints()`` scan whole tables), so there the worker splits a refused chunk
to find the item. MySQL checks foreign keys immediately: the item's own statement fails.

Why not check every chunk before its COMMIT: it would cost the same round trip as the
liveness check it replaces, but it would move the user's deferred constraint triggers out
of COMMIT (a trigger that is slow at COMMIT would be slow before it), and it tells no more
than COMMIT's own refusal does. It is done where COMMIT cannot answer: a dry run (which
rolls back instead), and a chunk run again with per-item checks (where it is a no-op
unless something outside the items left a check pending).

SQLite's write lock: one writer at a time, for the whole of its transaction. A chunk's
transaction begins IMMEDIATE (it takes the lock at BEGIN and waits for it there: a deferred
transaction that read and then writes after another writer committed fails at once with
"database is locked"). A transaction of one heavy item (``deferred``) begins DEFERRED: the
item's work before its first write -- its reads in a snapshot -- runs without the lock, so
other workers write meanwhile; its first write takes the lock, or fails at once if another
writer committed since its snapshot began, and the worker runs it again IMMEDIATE
(``work/one_transaction.py``). Either way the item sees one consistent database.

Why guard on_commit callbacks: Django runs them after COMMIT, inside ``atomic``'s exit;
one that raises would propagate out of a chunk that *is* committed (and skip the
callbacks after it), so the worker would report written items as failed, or run the
chunk again. Django >= 4.2 keeps them in ``connection.run_on_commit`` as
``(savepoint_ids, func, robust)``; the entries appended while an item ran are that
item's (a savepoint rolled back removes its own entries). Callbacks registered inside
the caller's transaction (not ours) are the caller's, and are left alone.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from django.db import DatabaseError, OperationalError, connections, transaction

from bulkpool.protocol import ErrorInfo
from bulkpool.retrying import Transient, is_lost_connection, is_transient
from bulkpool.sqlite_writers import WriterQueue, holds_back_writers, in_wal_mode, queue_of


class CommitRefused(Exception):
    """COMMIT, or the constraint check before it, answered with an error: the transaction
    did not commit (it was rolled back)."""

    def __init__(self, error: DatabaseError) -> None:
        super().__init__(str(error))
        self.error = error


def checks_constraints_per_item(database: str) -> bool:
    """Whether deferred constraints can be checked at once, inside a savepoint."""
    return connections[database].vendor == "postgresql"


class Transaction:
    """What the body of ``open_transaction`` can use; timings and callback errors after it."""

    def __init__(
        self, connection: Any, *, outermost: bool, guard_callbacks: bool, in_caller_thread: bool
    ) -> None:
        self.connection = connection
        self.outermost = outermost  # our own transaction, not a savepoint in the caller's
        self.guard_callbacks = guard_callbacks
        self.in_caller_thread = in_caller_thread
        self.callback_errors: dict[int, ErrorInfo] = {}
        self.commit_seconds = 0.0  # the constraint check, COMMIT and the callbacks

    def callbacks_mark(self) -> int:
        """Where the on_commit callbacks registered from now on begin."""
        return len(self.connection.run_on_commit) if self.guard_callbacks else 0

    def claim_callbacks(self, mark: int, offset: int) -> None:
        """The callbacks registered since ``mark`` are item ``offset``'s: guard them."""
        if not self.guard_callbacks:
            return
        hooks = self.connection.run_on_commit
        for position in range(mark, len(hooks)):
            sids, func, *rest = hooks[position]
            if not isinstance(func, _Guarded):
                hooks[position] = (sids, _Guarded(func, self, offset), *rest)

    def _record_callback_error(self, offset: int, error: BaseException) -> None:
        self.callback_errors.setdefault(offset, ErrorInfo.from_exception(error))


class _Guarded:
    """An on_commit callback that records its error instead of raising it."""

    def __init__(self, func: Callable[[], Any], owner: Transaction, offset: int) -> None:
        self.func = func
        self.owner = owner
        self.offset = offset
        # Django names the callback in its log line for robust callbacks.
        self.__qualname__ = getattr(func, "__qualname__", type(func).__qualname__)

    def __call__(self) -> None:
        try:
            self.func()
        except KeyboardInterrupt as error:
            if self.owner.in_caller_thread:  # Ctrl-C: the caller's to handle
                raise
            self.owner._record_callback_error(self.offset, error)
        except BaseException as error:  # SystemExit too: the chunk is committed either way
            self.owner._record_callback_error(self.offset, error)


@contextlib.contextmanager
def open_transaction(
    database: str,
    *,
    dry_run: bool = False,
    check_constraints: bool = False,
    before_commit: Callable[[], None] | None = None,
    in_caller_thread: bool = False,
    deferred: bool = False,
    writer_queue: str | None = None,
) -> Iterator[Transaction]:
    """``transaction.atomic`` for a chunk or an item, with the commit phase drawn above;
    ``deferred``: on SQLite, the write lock is taken at the first write, not at BEGIN;
    ``writer_queue``: on SQLite, the run's workers queue for that lock (``sqlite_writers``).

    Raises ``Transient`` (retry it), ``CommitRefused`` (nothing was committed), or what
    the body raised (after rolling back).
    """
    connection = connections[database]
    outermost = not connection.in_atomic_block
    txn = Transaction(
        connection,
        outermost=outermost,
        guard_callbacks=outermost and not dry_run,
        in_caller_thread=in_caller_thread,
    )
    # A failed SQLite COMMIT did not commit; a server's may have, if the connection broke.
    may_be_in_doubt = connection.vendor != "sqlite"
    committing = False
    started = 0.0
    queue = queue_of(connection, writer_queue) if outermost and connection.vendor == "sqlite" else None
    try:
        with (
            writing_from_begin(connection, deferred=deferred, queue=queue),
            transaction.atomic(using=database),
        ):
            yield txn
            if not outermost:  # a savepoint in the caller's transaction: the caller commits
                if dry_run:
                    transaction.set_rollback(True, using=database)
                return
            started = time.perf_counter()
            if connection.needs_rollback:
                raise RuntimeError(
                    "a database error was caught inside the chunk's transaction, so the "
                    "transaction must roll back"
                )
            if check_constraints:
                _check_constraints(connection, CommitRefused)
            if dry_run:
                transaction.set_rollback(True, using=database)
                return
            # A connection that died with the transaction open rolled it back: retry as
            # usual; only a loss in the COMMIT round trip itself leaves it in doubt. (The
            # constraint check just made a round trip, so it answers that already.)
            if not check_constraints and not connection.is_usable():
                raise Transient(OperationalError("the connection was lost before COMMIT"))
            txn.claim_callbacks(0, 0)  # any left unclaimed (registered outside items)
            if before_commit is not None:
                before_commit()
            committing = True
    except (Transient, CommitRefused):
        raise
    except Exception as error:
        if not committing:
            if is_transient(error):
                raise Transient(error) from error
            raise
        if may_be_in_doubt and is_lost_connection(error):
            raise Transient(error, in_doubt=True) from error
        if is_transient(error):  # an answer (deadlock, serialization failure): rolled back
            raise Transient(error) from error
        if isinstance(error, DatabaseError):
            raise CommitRefused(error) from error
        raise Transient(error, in_doubt=may_be_in_doubt) from error  # cannot tell what happened
    finally:
        if queue is not None:
            queue.leave()  # committed or rolled back: SQLite's lock is free
        if started:
            txn.commit_seconds += time.perf_counter() - started


@contextlib.contextmanager
def item_savepoint(database: str, *, check_constraints: bool = False) -> Iterator[None]:
    """A savepoint for one item; with ``check_constraints``, its deferred checks run at
    its end, inside it, so an item that breaks a constraint fails alone."""
    with transaction.atomic(using=database):
        yield
        if check_constraints:
            _check_constraints(connections[database], None)


def _check_constraints(connection: Any, wrap: type[CommitRefused] | None) -> None:
    """Run the pending deferred constraint checks now (PostgreSQL).

    Inside an item's savepoint the constraints are deferred again afterwards, so the
    items after it keep Django's default; a violation raises the IntegrityError itself
    (``wrap`` None), to become that item's failure.
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
            if wrap is None:
                cursor.execute("SET CONSTRAINTS ALL DEFERRED")
    except DatabaseError as error:
        if is_transient(error):
            raise Transient(error) from error
        if wrap is None:
            raise
        raise wrap(error) from error


def writing_from_begin(
    connection: Any, *, deferred: bool = False, queue: WriterQueue | None = None
) -> AbstractContextManager[None]:
    """On SQLite, transactions begun meanwhile take the write lock at BEGIN (IMMEDIATE), or
    with ``deferred`` at their first write (whatever the database's ``transaction_mode``);
    with a ``queue``, each takes its place in it just before (the caller leaves it)."""
    if connection.vendor != "sqlite":
        return connection.execute_wrapper(_pass_through)
    if queue is not None:
        wal = deferred and in_wal_mode(connection)  # asked before the wrapper is in place
        return connection.execute_wrapper(functools.partial(_queued_begin, queue, deferred, wal))
    return connection.execute_wrapper(_begin_deferred if deferred else _begin_immediate)


def _begin_immediate(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
    # A deferred SQLite transaction that reads and then writes fails at once with
    # "database is locked" when another worker writes; IMMEDIATE waits for the lock instead.
    return execute("BEGIN IMMEDIATE" if sql.startswith("BEGIN") else sql, *args)


def _begin_deferred(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
    return execute("BEGIN DEFERRED" if sql.startswith("BEGIN") else sql, *args)


def _queued_begin(
    queue: WriterQueue, deferred: bool, wal: bool, execute: Callable[..., Any], sql: str, *args: Any
) -> Any:
    if sql.startswith("BEGIN"):
        if deferred:
            return execute("BEGIN DEFERRED", *args)
        queue.take()
        return execute("BEGIN IMMEDIATE", *args)
    if not queue.held and holds_back_writers(sql, wal=wal):
        queue.take()
    return execute(sql, *args)


def _pass_through(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
    return execute(sql, *args)
