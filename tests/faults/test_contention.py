"""Point 3: deadlocks between workers (PostgreSQL, MariaDB) and lock contention on one SQLite file."""

from __future__ import annotations

import functools

import pytest

import bulkpool
from tests.faults import jobs
from tests.faults.support import record, tally
from tests.testapp.models import Marker

ITEMS = 60
GROUP = 3  # items per chunk: each chunk takes the two counters in one order, the next in the other


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql", "mysql")
def test_deadlocked_chunks_are_retried_and_applied_once():
    """Workers locking two counter rows in opposite orders deadlock; every item is still applied once."""
    for key in jobs.COUNTERS:
        Marker.objects.create(key=key, value=0)
    func = functools.partial(jobs.cross_counters, GROUP, 0.02)
    report = bulkpool.run(func, range(ITEMS), backend="process", workers=2, chunk_size=GROUP, progress=False)
    found = tally(range(ITEMS))
    counters = dict(Marker.objects.filter(key__in=jobs.COUNTERS).values_list("key", "value"))
    record("two workers deadlock on two rows", found, report, counters=sorted(counters.values()))
    assert found.exactly_once, found
    assert counters == dict.fromkeys(jobs.COUNTERS, ITEMS)
    assert (report.ok, report.failed) == (ITEMS, 0), str(report)
    assert report.retried > 0  # there were deadlocks, and they were retried


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("sqlite")
def test_four_workers_on_one_sqlite_file_never_see_database_is_locked():
    """Four process workers writing one hot row of a SQLite file: no 'database is locked' in the report."""
    Marker.objects.create(key=jobs.COUNTERS[0], value=0)
    items = 600
    report = bulkpool.run(
        jobs.hot_counter, range(items), backend="process", workers=4, chunk_size=5, progress=False
    )
    found = tally(range(items))
    counter = Marker.objects.get(key=jobs.COUNTERS[0]).value
    record("4 workers, one SQLite file, one hot row", found, report, counters=[counter])
    assert "locked" not in str(report)
    assert (report.ok, report.failed) == (items, 0), str(report)
    assert found.exactly_once, found
    assert counter == items
