"""An input that holds SQLite's read lock open: a clear error, at once, and nothing lost.

In rollback-journal mode (the test database's, Django's default) a generator over
``QuerySet.iterator()`` keeps a read open between chunks, and no worker could commit while
it is: without ``sqlite_locks`` each worker waited out its busy timeout and retried, minutes
per chunk, and failed with "database is locked".
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Generator, Iterator

import pytest
from django.db import connections

import bulkpool
from bulkpool import sqlite_locks
from bulkpool.errors import InputFailed
from bulkpool.models import Run
from tests.jobs import write_marker
from tests.testapp.models import Author, Marker

pytestmark = [
    pytest.mark.vendor("sqlite"),
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watch reads /proc/self/fdinfo"),
]

ROWS = 3000  # more than one fetchmany() of QuerySet.iterator() (2,000): the read stays open


def make_authors(count: int = ROWS) -> None:
    Author.objects.bulk_create([Author(name=f"author-{n}") for n in range(count)])


def author_pks() -> Generator[int, None, None]:
    for author in Author.objects.iterator():
        yield author.pk


def plain_then_author_pks(plain: int) -> Iterator[int]:
    """Items that read nothing, then a read of the database left open between chunks."""
    yield from range(-plain, 0)
    yield from author_pks()


@pytest.mark.parametrize("backend", ["process", "thread"])
def test_a_generator_over_iterator_stops_before_any_work_with_what_to_do(backend):
    """The first chunk's read holds the lock: the run stops before its pool starts, and
    says why and how to fix it; nothing ran, nothing failed."""
    make_authors()
    with pytest.raises(InputFailed) as caught:
        bulkpool.run(write_marker, author_pks(), backend=backend, workers=2, progress=False)
    message = str(caught.value)
    assert "holds SQLite's read lock on database 'default'" in message
    assert "QuerySet.iterator()" in message
    assert "Pass the QuerySet itself" in message
    report = caught.value.report
    assert report.total > 0
    assert (report.ok, len(report.failures)) == (0, 0)
    assert report.total == report.not_run
    assert Marker.objects.count() == 0


def test_a_read_left_open_mid_run_stops_it_and_the_chunks_in_flight_commit():
    """The read begins after some chunks went out: they commit (the input is closed, which
    ends its read), the chunk that read it does not run, and no item fails."""
    make_authors()
    with pytest.raises(InputFailed, match="holds SQLite's read lock") as caught:
        bulkpool.run(write_marker, plain_then_author_pks(2000), backend="process", progress=False)
    report = caught.value.report
    assert report.ok > 0
    assert report.failures == []
    assert report.not_run > 0
    assert Marker.objects.count() == report.ok
    written = set(Marker.objects.values_list("value", flat=True))
    assert written == set(range(-2000, -2000 + report.ok))  # the items before the read, in order


def test_a_finished_run_read_again_through_an_open_read_is_not_stopped():
    """A rerun of a finished run_id sends nothing (the journal says it is done), so a
    read the input keeps open stops nothing: every item is reported done before."""
    make_authors(50)
    first = bulkpool.run(write_marker, list(Author.objects.values_list("pk", flat=True)), run_id="rerun")
    assert first.ok == 50
    again = bulkpool.run(write_marker, author_pks(), run_id="rerun", progress=False)
    assert (again.total, again.failures) == (50, [])
    assert Marker.objects.count() == 50
    assert Run.objects.get(run_id="rerun").status == Run.Status.FINISHED


def test_a_read_another_thread_began_before_is_not_blamed_on_the_input():
    """The lock is the whole process's: one held before the chunk was read is not the
    input's doing, and the run goes on (it commits once that thread's read ends)."""
    make_authors()
    reading, done = threading.Event(), threading.Event()

    def hold_a_read() -> None:
        try:
            rows = Author.objects.iterator()
            next(rows)
            reading.set()
            done.wait(1.5)
            rows.close()
        finally:
            connections.close_all()

    reader = threading.Thread(target=hold_a_read)
    reader.start()
    try:
        assert reading.wait(10)
        # forkserver: a worker forked from this process while the thread reads would
        # inherit its lock (the backends guide says so)
        forkserver = bulkpool.ProcessExecutor(start_method="forkserver")
        report = bulkpool.run(write_marker, list(range(300)), backend=forkserver, progress=False)
    finally:
        done.set()
        reader.join()
    assert (report.ok, report.failures) == (300, [])


def test_a_queryset_input_is_read_in_pages_and_never_holds_the_lock():
    """The QuerySet itself, the fix the error names: every row runs on the process pool."""
    make_authors()
    report = bulkpool.run(write_marker, Author.objects.values_list("pk", flat=True), progress=False)
    assert (report.ok, report.failures) == (ROWS, [])
    assert Marker.objects.count() == ROWS


def test_the_serial_backend_reads_and_writes_on_one_connection_and_is_not_stopped():
    """backend='serial', the other fix named: the caller's connection both reads and writes."""
    make_authors(50)
    report = bulkpool.run(write_marker, author_pks(), backend="serial", progress=False)
    assert (report.ok, report.failures) == (50, [])


def test_the_watch_sees_a_read_left_open_and_not_one_that_ended():
    """The watch over this process's locks, on its own: held while an iterator is open."""
    make_authors()
    watch = sqlite_locks.watch("default")
    assert watch is not None
    assert not watch.held()
    open_read = author_pks()
    next(open_read)
    assert watch.held()
    open_read.close()
    assert not watch.held()
    assert list(Author.objects.values_list("pk", flat=True)[:5])  # a read run to its end
    assert not watch.held()


def test_no_watch_where_no_other_connection_can_be_blocked():
    """In-memory SQLite: the one connection is the only one there is."""
    assert sqlite_locks.watch("memory") is None
