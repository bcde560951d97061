"""Which database errors are retried, and which leave a COMMIT in doubt (no database needed)."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError

from bulkpool.retrying import is_lost_connection, is_transient


class _PostgresError(Exception):
    """Stands in for a psycopg error: it carries a SQLSTATE."""

    __module__ = "psycopg.errors"

    def __init__(self, sqlstate: str | None, message: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def wrapped(kind: type[DatabaseError], cause: BaseException) -> DatabaseError:
    """A Django database error raised from a driver error, as Django wraps them."""
    error = kind(*cause.args)
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "transient", "lost"),
    [
        (wrapped(OperationalError, _PostgresError("40001")), True, False),  # serialization failure
        (wrapped(OperationalError, _PostgresError("40P01")), True, False),  # deadlock
        (wrapped(OperationalError, _PostgresError("57P01")), True, True),  # terminated by admin
        (wrapped(OperationalError, _PostgresError("08006")), True, True),  # connection failure
        (wrapped(IntegrityError, _PostgresError("23503")), False, False),  # foreign key violation
        (
            wrapped(OperationalError, _PostgresError(None, "server closed the connection unexpectedly")),
            True,
            True,
        ),
        (wrapped(OperationalError, _PostgresError(None, 'database "x" does not exist')), False, False),
        (wrapped(OperationalError, OSError(1213, "Deadlock found")), True, False),  # MySQL deadlock
        (wrapped(OperationalError, OSError(1205, "Lock wait timeout")), True, False),
        (wrapped(OperationalError, OSError(2013, "Lost connection to server")), True, True),
        (wrapped(OperationalError, OSError(2006, "MySQL server has gone away")), True, True),
        (wrapped(IntegrityError, OSError(1452, "Cannot add or update a child row")), False, False),
        (OperationalError("database is locked"), True, False),  # SQLite busy
        (IntegrityError("FOREIGN KEY constraint failed"), False, False),  # SQLite COMMIT refused
        (InterfaceError("connection already closed"), True, True),
        (ValueError("not a database error"), False, False),
    ],
)
def test_transient_and_lost_connection(error, transient, lost):
    """Only a lost connection leaves a COMMIT in doubt; deadlocks and the like are answers."""
    assert (is_transient(error), is_lost_connection(error)) == (transient, lost)
