"""Every error bulkpool raises, and which database errors are worth retrying.

    BulkpoolError
    ├── ConfigurationError      bad options or a setup the run cannot work in (also
    │                           Django's ImproperlyConfigured); raised before item one
    ├── WorkerStartupError      a worker could not start; carries the worker's traceback
    ├── InputError              an input file cannot be read (missing, unparsable line N);
    │                           names the file and the place, and says how to fix it
    ├── RunAborted              the run stopped before every item ran; carries the partial
    │   │                       ``report``. Raised after the chunks in flight came back.
    │   ├── ItemFailed          on_error="raise" and an item failed
    │   ├── TooManyFailures     max_failures items failed
    │   ├── InputFailed         the input raised mid-run (its error is the ``__cause__``)
    │   ├── ResumeRefused       a journaled run was fed other input than before (also a
    │   │                       ConfigurationError)
    │   └── WorkersLost         a dead worker could not be replaced
    └── ItemError               the kinds of failure bulkpool itself gives an item, named
        │                       in ``Failure.exc_type`` as ``bulkpool.<Name>``
        ├── CommitUnknown       its worker's connection was lost during COMMIT
        ├── WorkerDied          its worker died while running it, every time
        └── NotRun              it could not be sent to a worker

    RunInterrupted              Ctrl-C or SIGTERM stopped the run; carries the ``report``.
                                A KeyboardInterrupt, not a BulkpoolError, so that an
                                ``except Exception:`` in the caller does not swallow Ctrl-C.

Errors raised by the user's function are never raised as themselves: they become a
``Failure`` in the report (or the cause of ``ItemFailed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, InterfaceError, OperationalError

if TYPE_CHECKING:
    from bulkpool.outcomes import Failure, Report


class BulkpoolError(Exception):
    """Base class of every error raised by bulkpool."""


class ConfigurationError(BulkpoolError, ImproperlyConfigured):
    """The options, the function or the environment cannot make a working run."""


class WorkerStartupError(BulkpoolError):
    """A worker failed before it could run any item; ``worker_traceback`` says why."""

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message + (f"\n\nWorker traceback:\n{worker_traceback}" if worker_traceback else ""))
        self.worker_traceback = worker_traceback


class InputError(BulkpoolError):
    """An input file (``bulkpool.inputs``) is missing or cannot be parsed.

    ``path`` is the file (``"-"`` for stdin) and ``line`` the 1-based line of the problem,
    when there is one. The message names both and says how to fix it.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class RunAborted(BulkpoolError):
    """The run stopped before every item ran; ``report`` says what was done."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(f"{message}\n\n{report}")
        self.report = report


class ItemFailed(RunAborted):
    """An item failed and ``on_error="raise"`` was asked for."""

    def __init__(self, failure: Failure, report: Report) -> None:
        super().__init__(f"Stopped at the first failure (on_error='raise'): {failure.summary()}", report)
        self.failure = failure


class TooManyFailures(RunAborted):
    """``max_failures`` items failed, so no more work was sent."""


class InputFailed(RunAborted):
    """Reading the input raised; the chunks read before it ran. The error is ``__cause__``."""


class ResumeRefused(RunAborted, ConfigurationError):
    """A journaled run's input is not the input its ``run_id`` committed before."""


class WorkersLost(RunAborted):
    """A worker died and no new one could be started in its place."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after the chunks in flight came back (or were
    abandoned, at a second one); ``report`` says what was done."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(f"{message}\n\n{report}")
        self.report = report


class ItemError(BulkpoolError):
    """A failure that bulkpool gives an item itself (``Failure.exc_type`` is ``bulkpool.<Name>``).

    ``unsafe``: the item may have been written all the same, so it is not fed again blindly.
    """

    unsafe = False


class CommitUnknown(ItemError):
    """The item's worker lost its connection during COMMIT: it may or may not be written."""

    unsafe = True


class WorkerDied(ItemError):
    """The item's worker died while running it, every time it was tried."""


class NotRun(ItemError):
    """The item could not be sent to a worker (it cannot be pickled or encoded), so it never ran."""


ITEM_ERRORS: dict[str, type[ItemError]] = {
    f"bulkpool.{kind.__name__}": kind for kind in (CommitUnknown, WorkerDied, NotRun)
}


# Error codes that mean "try the same work again", per vendor.
_POSTGRES_TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "57P01",  # admin_shutdown (pg_terminate_backend, server restart)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (server starting up, connections not allowed)
    "08000",
    "08001",
    "08003",
    "08004",
    "08006",  # connection exceptions
}
_MYSQL_TRANSIENT_CODES = {
    1205,  # lock wait timeout
    1213,  # deadlock
    2002,
    2003,
    2006,
    2013,
    2055,  # cannot connect / server gone away / lost connection
    1040,  # too many connections
    1053,  # server shutdown in progress
    1927,  # connection killed
    4031,  # disconnected by the server because of inactivity
}
_POSTGRES_TRANSIENT_CONNECTION_MESSAGES = (
    "connection refused",
    "not currently accepting connections",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "server closed the connection unexpectedly",
    "terminating connection",
    "connection reset",
    "could not receive data",
    "could not send data",
    "consuming input failed",
    "connection is lost",
    "connection is closed",
    "ssl syscall error",
    "eof detected",
    "timeout expired",
    "too many clients",
    "remaining connection slots are reserved",
)
_SQLITE_TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "database is busy")


def is_transient(error: BaseException) -> bool:
    """Whether running the same work again on a fresh connection may succeed."""
    if not isinstance(error, DatabaseError):
        return False
    cause = error.__cause__ or error
    sqlstate = getattr(cause, "sqlstate", None) or getattr(getattr(cause, "diag", None), "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in _POSTGRES_TRANSIENT_SQLSTATES
    if type(cause).__module__.startswith("psycopg") and isinstance(error, OperationalError):
        # No SQLSTATE: the connection itself failed. Refused or reset is worth waiting for;
        # a database that does not exist or a wrong password is not.
        message = str(error).lower()
        return any(text in message for text in _POSTGRES_TRANSIENT_CONNECTION_MESSAGES)
    args = getattr(cause, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _MYSQL_TRANSIENT_CODES
    message = str(error).lower()
    if any(text in message for text in _SQLITE_TRANSIENT_MESSAGES):
        return True
    # A connection that is already closed or broken says so without a code.
    return isinstance(error, InterfaceError) or (
        isinstance(error, OperationalError) and "connection" in message and "closed" in message
    )
