"""Which database errors are worth another attempt, and how a worker waits before it.

Data flow inside a worker (the ``work`` package drives it):

    transaction --a transient error--> Transient(error, in_doubt) --> Worker
    Worker --Retry.again()--> back off, drop the connection, wait for the database
           <--True: attempt again / False: the budget is spent, fail with the error

Two questions are asked of a database error, and they differ:

- ``is_transient``: would the same work succeed on a fresh connection, a moment later?
  Lost connections, deadlocks, serialization failures, lock timeouts, SQLite busy.
- ``is_lost_connection``: did the connection itself fail? Only then is an error raised by
  COMMIT "in doubt" -- the server may have committed and only the answer was lost. A
  deadlock or a serialization failure reported *by* COMMIT is an answer: it did not commit.

The codes are per vendor; a driver error without a code is judged by its message.
"""

from __future__ import annotations

import random
import time

from django.db import DatabaseError, InterfaceError, OperationalError, connections

MAX_BACKOFF = 5.0  # seconds between attempts, at most
RECONNECT_TIMEOUT = 120.0  # seconds a worker waits for its database to come back


class Transient(Exception):
    """Carries a transient database error out of a transaction, so that it is retried.

    ``in_doubt``: the connection was lost during COMMIT, so the transaction may have
    been committed: running it again could write it twice.
    """

    def __init__(self, error: BaseException, *, in_doubt: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.in_doubt = in_doubt


class Retry:
    """The attempts left for one unit of work (a chunk, or an item under ``atomic="item"``).

    ``retries`` counts extra attempts once, wherever the transient errors come from:
    loading rows, running items, the journal, COMMIT, or the pieces of a split chunk.
    """

    def __init__(self, retries: int, database: str, *, own_connection: bool) -> None:
        self.left = retries
        self.done = 0  # attempts that failed and were retried
        self.database = database
        self.own_connection = own_connection

    def again(self) -> bool:
        """After a transient error: False when no attempt is left; else wait, then True."""
        if self.left <= 0:
            self.recover(back_off=False)  # the next chunk still deserves a fresh connection
            return False
        self.left -= 1
        self.recover()
        self.done += 1
        return True

    def recover(self, *, back_off: bool = True) -> None:
        """Back off, drop the connection, and wait for the database to take a new one.

        Waiting for the database does not use up attempts: a worker whose database is
        down (restarting, refusing connections) holds its chunk and waits, rather than
        failing the chunk and taking the next.
        """
        if back_off:
            time.sleep(min(MAX_BACKOFF, 0.2 * 2**self.done) * (0.5 + random.random()))
        if not self.own_connection:  # the caller's connection (serial): theirs to manage
            return
        connection = connections[self.database]
        _close_quietly(connection)
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        pause = 0.1
        while True:
            try:
                connection.ensure_connection()
                return
            except Exception as error:
                if not is_transient(error) or time.monotonic() > deadline:
                    return  # the next attempt fails with this error, and says so
                _close_quietly(connection)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)


def _close_quietly(connection: object) -> None:
    try:
        connection.close()  # type: ignore[attr-defined]
    except Exception:  # closing a broken connection may complain; it is gone either way
        pass


# -- the vendors' codes ----------------------------------------------------------------------

_POSTGRES_LOST_SQLSTATES = {
    "57P01",  # admin_shutdown (pg_terminate_backend, server restart)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (server starting up, connections not allowed)
    "08000",
    "08001",
    "08003",
    "08004",
    "08006",  # connection exceptions
}
_POSTGRES_TRANSIENT_SQLSTATES = _POSTGRES_LOST_SQLSTATES | {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
}
_MYSQL_LOST_CODES = {
    2002,
    2003,
    2006,
    2013,
    2055,  # cannot connect / server gone away / lost connection
    1053,  # server shutdown in progress
    1927,  # connection killed
    4031,  # disconnected by the server because of inactivity
}
_MYSQL_TRANSIENT_CODES = _MYSQL_LOST_CODES | {
    1205,  # lock wait timeout
    1213,  # deadlock
    1040,  # too many connections
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


def _sqlstate(cause: BaseException) -> str | None:
    return getattr(cause, "sqlstate", None) or getattr(getattr(cause, "diag", None), "sqlstate", None)


def _is_psycopg(cause: BaseException) -> bool:
    return type(cause).__module__.startswith("psycopg")


def is_transient(error: BaseException) -> bool:
    """Whether running the same work again on a fresh connection may succeed."""
    # InterfaceError is not a DatabaseError in Django's tree, yet a closed connection raises it.
    if not isinstance(error, (DatabaseError, InterfaceError)):
        return False
    cause = error.__cause__ or error
    sqlstate = _sqlstate(cause)
    if sqlstate is not None:
        return sqlstate in _POSTGRES_TRANSIENT_SQLSTATES
    if _is_psycopg(cause) and isinstance(error, OperationalError):
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
    return _closed_without_a_code(error)


def is_lost_connection(error: BaseException) -> bool:
    """Whether the connection failed (as opposed to the server answering with an error)."""
    if not is_transient(error):
        return False
    cause = error.__cause__ or error
    sqlstate = _sqlstate(cause)
    if sqlstate is not None:
        return sqlstate in _POSTGRES_LOST_SQLSTATES
    if _is_psycopg(cause):
        return True  # transient without a SQLSTATE: only the connection fails that way
    args = getattr(cause, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _MYSQL_LOST_CODES
    return _closed_without_a_code(error)


def _closed_without_a_code(error: BaseException) -> bool:
    # A connection that is already closed or broken says so without a code.
    message = str(error).lower()
    return isinstance(error, InterfaceError) or (
        isinstance(error, OperationalError) and "connection" in message and "closed" in message
    )
