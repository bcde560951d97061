"""A fault that lands in the middle of COMMIT, made certain rather than left to chance (PostgreSQL).

A deferred constraint trigger makes the COMMIT of the chunk holding item 57 take 1.5 s;
the test strikes while the server shows that session running COMMIT. Killing the worker
process then leaves the commit to finish on the server (it has all it needs), so the
chunk *is* written, though nobody heard so; ending the session instead aborts it. A plain
run cannot tell the two apart and reports the chunk ``bulkpool.CommitUnknown``; a
journaled run asks the journal. Either way nothing may be written twice.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import pytest
from django.db import connection

import bulkpool
from tests.faults import jobs
from tests.faults.support import (
    assert_nothing_lost_or_doubled,
    end_session,
    injecting,
    marker_counts,
    record,
    tally,
    worker_processes,
)
from tests.testapp.models import Marker

ITEMS = 200
SLOW_ITEM = 57
SLOW_CHUNK = {str(i) for i in range(50, 60)}  # chunk_size=10
JOURNALED = pytest.mark.parametrize("run_id", [None, "faults"], ids=["plain", "journaled"])


@pytest.fixture
def slow_commit() -> Iterator[None]:
    """COMMIT of a transaction that wrote Marker(value=57) sleeps 1.5 s first."""
    table = Marker._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION faults_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$"
        )
        cursor.execute(
            f"CREATE CONSTRAINT TRIGGER faults_slow_commit AFTER INSERT ON {table} "
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.value = {SLOW_ITEM}) "
            "EXECUTE FUNCTION faults_slow_commit()"
        )
    yield
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TRIGGER faults_slow_commit ON {table}")
        cursor.execute("DROP FUNCTION faults_slow_commit()")


def committing_session(within: float = 20.0) -> int | None:
    """The session running the slow COMMIT (asleep in the trigger), or None."""
    deadline = time.monotonic() + within
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                "AND query = 'COMMIT' AND wait_event = 'PgSleep'",
                [connection.settings_dict["NAME"]],
            )
            row = cursor.fetchone()
        if row:
            return int(row[0])
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def kill_workers_in_commit() -> int:
    """SIGKILL every worker once one of them is in COMMIT."""
    if committing_session() is None:
        return 0
    for worker in worker_processes():
        worker.kill()
    return 1


def end_session_in_commit() -> int:
    """pg_terminate_backend the session that is in COMMIT."""
    session = committing_session()
    if session is None:
        return 0
    end_session(session)
    return 1


def run_with(strike: Callable[[], int], run_id: str | None) -> bulkpool.Report:
    with injecting(strike, times=1, interval=0, workers=2) as injector:
        report = bulkpool.run(
            functools.partial(jobs.slow_marker, 0.005),
            range(ITEMS),
            backend="process",
            workers=2,
            chunk_size=10,
            run_id=run_id,
            progress=False,
        )
    assert injector.faults == 1, "the fault never met a COMMIT"
    # A killed worker's COMMIT goes on on the server and may land after the run returned:
    # that is what "unknown" means. Count the rows once it is over.
    assert slow_commit_over(within=5.0)
    return report


def slow_commit_over(within: float) -> bool:
    """Whether no session is in the slow COMMIT any more, waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while committing_session(within=0.0) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unknown(report: bulkpool.Report) -> set[str]:
    return {str(f.index) for f in report.failures if f.exc_type == "bulkpool.CommitUnknown"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql")
@JOURNALED
def test_worker_killed_during_commit(slow_commit, run_id):
    """Workers SIGKILLed while one is in COMMIT: its chunk is written once, reported unknown or found done."""
    report = run_with(kill_workers_in_commit, run_id)
    record(
        f"workers SIGKILLed during COMMIT ({'journaled' if run_id else 'plain'})", tally(range(ITEMS)), report
    )
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)
    assert set(marker_counts()) >= SLOW_CHUNK  # the server finished that COMMIT
    # Another worker may be in its own COMMIT when the kill lands (more likely on a loaded
    # machine): its chunk is in doubt too, so the slow chunk is one of the chunks in doubt.
    if run_id is None:
        assert unknown(report) >= SLOW_CHUNK, str(report)
    else:
        # Sent again and found done by the journal: reported with what it recorded, so every
        # item is ok -- none unknown, none merely "skipped".
        assert (report.ok, report.skipped, unknown(report)) == (ITEMS, 0, set()), str(report)
        assert report.retried >= len(SLOW_CHUNK), str(report)


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql")
@JOURNALED
def test_session_ended_during_commit(slow_commit, run_id):
    """A session ended while in COMMIT: the chunk is reported unknown (plain) or rerun once (journaled)."""
    report = run_with(end_session_in_commit, run_id)
    record(f"session ended during COMMIT ({'journaled' if run_id else 'plain'})", tally(range(ITEMS)), report)
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)
    if run_id is None:
        assert unknown(report) == SLOW_CHUNK, str(report)
        assert not SLOW_CHUNK & set(marker_counts())  # ending the session aborted that COMMIT
    else:
        assert report.ok == ITEMS, str(report)
