"""Test-session plumbing: is the database up, which vendor is it, and vendor markers.

The database is chosen by ``DATABASE_URL`` (see ``tests/settings.py``). Before any test
runs, a server database is probed with a short TCP connect:

- unreachable and ``CI=true``: the run stops at once with a non-zero exit status, since a
  CI run that skipped its database tests would look green while testing nothing;
- unreachable elsewhere: every test that needs the database is skipped, with the reason;
  the others still run.

Vendor-specific tests are marked ``@pytest.mark.vendor("postgresql")`` (several names
allowed: ``@pytest.mark.vendor("postgresql", "mysql")``) and skipped on other databases.
Names are Django's ``connection.vendor``: ``sqlite``, ``postgresql``, ``mysql`` (which
covers MariaDB).

Every test in ``tests/faults`` is marked ``slow``: ``-m "not slow"`` leaves the fault suite
out, ``-m slow`` runs it with the other slow tests (``scripts/test`` runs those last, every
database's at once).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import DEFAULT_DB_ALIAS, connections
from pytest_django.plugin import blocking_manager_key

VENDORS = ("sqlite", "postgresql", "mysql")
VENDOR_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mysql": "MySQL/MariaDB"}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
FAULTS = Path(__file__).resolve().parent / "faults"
PROBE_TIMEOUT = 3.0  # seconds; a server on this machine answers in milliseconds

# Requesting any of these means a test touches the database.
DB_FIXTURES = frozenset(
    {
        "db",
        "transactional_db",
        "django_db_setup",
        "django_db_reset_sequences",
        "django_db_serialized_rollback",
        "live_server",
    }
)

unreachable_key = pytest.StashKey[str | None]()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _vendor() -> str:
    return connections[DEFAULT_DB_ALIAS].vendor


def _probe(config: pytest.Config) -> str | None:
    """None when the configured database answers, else why not, in one sentence."""
    vendor = _vendor()
    if vendor == "sqlite":
        return None
    settings = connections[DEFAULT_DB_ALIAS].settings_dict
    host = settings.get("HOST") or ""
    port = int(settings.get("PORT") or DEFAULT_PORTS.get(vendor, 0))
    name = VENDOR_NAMES.get(vendor, vendor)
    if host and not host.startswith("/"):
        where = f"{host}:{port}"
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            return f"{name} at {where} is not reachable ({reason}): start it or unset DATABASE_URL"
        return None
    # A Unix socket: only the driver can tell, and a local socket fails fast.
    connection = connections[DEFAULT_DB_ALIAS]
    try:
        with config.stash[blocking_manager_key].unblock():
            connection.ensure_connection()
    except Exception as exc:
        where = host or "its default socket"
        reason = " ".join(str(exc).split())
        return f"{name} at {where} is not reachable ({reason}): start it or unset DATABASE_URL"
    finally:
        connection.close()
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[unreachable_key] = None


def pytest_sessionstart(session: pytest.Session) -> None:
    problem = _probe(session.config)
    session.config.stash[unreachable_key] = problem
    if problem and _in_ci():
        pytest.exit(f"CI=true and the test database is down: {problem}", returncode=3)


def pytest_report_header(config: pytest.Config) -> str:
    settings = connections[DEFAULT_DB_ALIAS].settings_dict
    where = settings.get("HOST") or settings.get("NAME")
    return f"database: {_vendor()} ({where}); CI={'true' if _in_ci() else 'false'}"


def _needs_database(item: pytest.Item) -> bool:
    if item.get_closest_marker("django_db"):
        return True
    if DB_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    from django.test import TransactionTestCase  # Django TestCase classes use the database

    cls = getattr(item, "cls", None)
    return cls is not None and issubclass(cls, TransactionTestCase)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    vendor = _vendor()
    problem = config.stash.get(unreachable_key, None)
    for item in items:
        if FAULTS in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)
        for marker in item.iter_markers("vendor"):
            unknown = sorted(set(marker.args) - set(VENDORS))
            if unknown or not marker.args:
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.vendor takes one or more of {VENDORS}, got {marker.args!r}"
                )
            if vendor not in marker.args:
                item.add_marker(pytest.mark.skip(reason=f"only on {', '.join(marker.args)}"))
        if problem and _needs_database(item):
            item.add_marker(pytest.mark.skip(reason=problem))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    problem = config.stash.get(unreachable_key, None)
    if problem:
        terminalreporter.write_sep("!", "database tests skipped", yellow=True)
        terminalreporter.write_line(problem)


@pytest.fixture(scope="session")
def db_vendor() -> str:
    """The vendor of the default database: ``sqlite``, ``postgresql`` or ``mysql``."""
    return _vendor()


@contextlib.contextmanager
def sqlite_in_wal_mode() -> Iterator[None]:
    """The SQLite test database in WAL mode (what a careful user sets) for a while, then back
    in rollback-journal mode (Django's default)."""
    connections.close_all()
    with connections["default"].cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=WAL")
    try:
        yield
    finally:
        connections.close_all()
        with connections["default"].cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=DELETE")
            assert cursor.fetchone()[0] == "delete", "the test database stayed in WAL mode"


@pytest.fixture
def wal_on_sqlite(db_vendor: str) -> Iterator[None]:
    """On SQLite, WAL mode for the test; on a server, nothing."""
    if db_vendor != "sqlite":
        yield
        return
    with sqlite_in_wal_mode():
        yield
