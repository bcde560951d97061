"""Points 1 and 2: the workers' connections are cut, or the database refuses new ones, mid-run.

Each fault runs twice: plain, and journaled (``run_id``). A connection lost in the middle
of COMMIT leaves the outcome unknown -- the server may have committed -- so a plain run
reports such items as ``bulkpool.CommitUnknown`` rather than run them again; a journaled
run asks its journal and writes every item exactly once.
"""

from __future__ import annotations

import functools
import time

import pytest
from django.db import connection

import bulkpool
from tests.faults import jobs
from tests.faults.support import (
    assert_nothing_lost_or_doubled,
    end_some,
    injecting,
    record,
    session_id,
    tally,
)

ITEMS = 400
WORKERS = 2
PAUSE = 0.01  # seconds per item: the run lasts a few seconds, long enough to strike several times
pytestmark = pytest.mark.slow  # each run lasts seconds, so that faults land mid-run
JOURNALED = pytest.mark.parametrize("run_id", [None, "faults"], ids=["plain", "journaled"])


def run_slow_markers(run_id: str | None) -> bulkpool.Report:
    func = functools.partial(jobs.slow_marker, PAUSE)
    return bulkpool.run(
        func, range(ITEMS), backend="process", workers=WORKERS, chunk_size=10, progress=False, run_id=run_id
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql", "mysql")
@JOURNALED
def test_worker_sessions_ended_one_at_a_time(run_id):
    """Ending a worker session (pg_terminate_backend / KILL) six times mid-run doubles nothing."""
    ours = {session_id()}
    with injecting(end_some(ours, 1), times=6, interval=0.3, workers=WORKERS) as injector:
        report = run_slow_markers(run_id)
    record(f"a worker session ended, 6 times ({_mode(run_id)})", tally(range(ITEMS)), report)
    assert injector.faults == 6
    assert injector.rows_at_first_strike < ITEMS  # mid-run
    assert report.retried > 0
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql", "mysql")
@JOURNALED
def test_all_worker_sessions_ended_at_once(run_id):
    """Ending every worker session at once, twice mid-run, doubles nothing."""
    ours = {session_id()}
    with injecting(end_some(ours, None), times=2, interval=1.0, workers=WORKERS) as injector:
        report = run_slow_markers(run_id)
    record(f"all worker sessions ended at once, twice ({_mode(run_id)})", tally(range(ITEMS)), report)
    assert injector.faults >= 2
    assert injector.rows_at_first_strike < ITEMS
    assert report.retried > 0
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql")
@JOURNALED
def test_database_refusing_connections_for_three_seconds(run_id):
    """The database refuses connections for 3 s and its sessions end: the run waits, fails nothing."""
    ours = {session_id()}
    name = connection.settings_dict["NAME"]

    def refuse_for_three_seconds() -> int:
        # A database cannot be altered from a session on it: go through the "postgres" one.
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            try:
                ended = end_some(ours, None)()
                time.sleep(3)
            finally:
                cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        return ended

    with injecting(refuse_for_three_seconds, times=1, interval=0, workers=WORKERS) as injector:
        report = run_slow_markers(run_id)
    record(f"database refuses connections for 3 s ({_mode(run_id)})", tally(range(ITEMS)), report)
    assert injector.faults >= 1
    assert injector.rows_at_first_strike < ITEMS
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)


def _mode(run_id: str | None) -> str:
    return "journaled" if run_id else "plain"
