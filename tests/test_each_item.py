"""SQLite, heavy items: each item in a transaction of its own, its write lock taken at its
first write (``Chunk.each_item``), chosen by the pool from what the chunks measured.

The sizing policy is fed numbers; the worker runs real chunks on the test database; the
runs go through ``bulkpool.run``. The fault suite (tests/faults/test_each_item.py) kills
workers and callers on this path.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import replace

import pytest
from django.db import connections, transaction

import bulkpool
from bulkpool.models import RunChunk, RunFailure
from bulkpool.protocol import Chunk, Task, Timings
from bulkpool.sizing import Limits, Pace, choose_workers, each_item_pays
from bulkpool.work import Worker
from tests.conftest import sqlite_in_wal_mode
from tests.testapp.models import Marker

SQLITE = Limits(cpus=2, free_connections=None, single_writer=True, start_seconds=0.1)
SERVER = Limits(cpus=2, free_connections=100, single_writer=False, start_seconds=0.1)
EACH_ITEM = "each item in a transaction of its own"


def measured(per_item: float, before_write: float, *, items: int = 20, commit: float = 0.002) -> Pace:
    """Three chunks of ``items`` items, each ``per_item`` seconds of CPU in func, the first
    ``before_write`` of it before the item's first write, and one COMMIT."""
    pace = Pace()
    for _ in range(3):
        work = per_item * items
        timings = Timings(
            work=work, commit=commit, total=work + commit, cpu=work, unlocked=before_write * items, commits=1
        )
        pace.add(items, timings)
    return pace


# -- the choice ---------------------------------------------------------------------------


def test_heavy_work_before_the_first_write_gets_each_item_and_a_pool():
    choice = choose_workers(measured(0.003, 0.0027), left=10_000, limits=SQLITE)
    assert choice is not None and choice.each_item and choice.workers == 2, choice
    assert EACH_ITEM in choice.why


def test_a_lock_free_for_one_and_a_half_workers_gets_two():
    pace = measured(0.003, 0.0013, commit=0.0005)
    assert 1.5 <= pace.each_item_gain() < 2.5
    choice = choose_workers(pace, left=10_000, limits=replace(SQLITE, cpus=8))
    assert choice is not None and (choice.workers, choice.each_item) == (2, True), choice


def test_a_lock_free_for_three_workers_and_a_third_gets_four():
    """Three would leave the writer idle a tenth of the time: the pool rounds up."""
    pace = measured(0.005, 0.0043, commit=0.001)
    assert 3.1 <= pace.each_item_gain() < 3.5, pace.each_item_gain()
    choice = choose_workers(pace, left=10_000, limits=replace(SQLITE, cpus=8))
    assert choice is not None and (choice.workers, choice.each_item) == (4, True), choice


def test_work_after_the_first_write_stays_on_one_worker_in_chunk_transactions():
    """The item writes first, then works: the lock is held for all of it either way."""
    choice = choose_workers(measured(0.003, 0.00001), left=10_000, limits=SQLITE)
    assert choice is not None and (choice.workers, choice.each_item) == (1, False), choice
    assert "from its first write on" in choice.why and "prepare=" in choice.why


def test_light_items_stay_in_chunk_transactions_a_commit_per_item_would_cost_more():
    """0.1 ms items, nearly all before the write, against a 2 ms COMMIT: not worth one each."""
    pace = measured(0.0001, 0.00009, items=500)
    assert not each_item_pays(pace, SQLITE)
    choice = choose_workers(pace, left=100_000, limits=SQLITE)
    assert choice is not None and not choice.each_item, choice


def test_servers_never_get_each_item():
    """PostgreSQL and MariaDB lock rows, not the database: a chunk's transaction is no bottleneck."""
    pace = measured(0.003, 0.0027)
    assert not each_item_pays(pace, SERVER)
    choice = choose_workers(pace, left=10_000, limits=SERVER)
    assert choice is not None and not choice.each_item and choice.workers == 2, choice


# -- the worker ---------------------------------------------------------------------------


@pytest.fixture(params=["rollback journal", "WAL"])
def journal_mode(request):
    """The SQLite test database in its default rollback-journal mode, or in WAL mode (what
    a careful user sets), for the test, then back: each takes locks its own way."""
    if request.param == "rollback journal":
        yield request.param
        return
    with sqlite_in_wal_mode():
        yield request.param


def task(func, **fields) -> Task:
    return Task(
        func=func,
        setup=None,
        atomic="chunk",
        database="default",
        retries=3,
        keep_values=True,
        own_connections=True,
        **fields,
    )


def write_marker_failing_at_3(i: int) -> int:
    if i == 3:
        raise ValueError("3 is refused")
    Marker.objects.create(key=str(i), value=i)
    return i * 10


@pytest.mark.django_db(transaction=True)
def test_each_item_chunk_settles_item_by_item_and_tells_progress():
    """Each item commits on its own (a failing one fails alone), and progress hears of each."""
    heard = []
    worker = Worker(task(write_marker_failing_at_3), progress=lambda *settled: heard.append(settled))
    worker.start()
    try:
        result = worker.run(Chunk(0, 0, list(range(6)), each_item=True))
    finally:
        worker.close()
    assert result.values == [0, 10, 20, None, 40, 50]
    assert list(result.errors) == [3] and result.errors[3].message == "3 is refused"
    assert [(offset, error is None, value) for offset, error, value in heard] == [
        (0, True, 0),
        (1, True, 10),
        (2, True, 20),
        (3, False, None),
        (4, True, 40),
        (5, True, 50),
    ]
    # A transaction per item; the one that failed rolled back, and ended in a second one
    # (which holds its journal row, in a journaled run).
    assert result.timings.commits == 7
    assert sorted(Marker.objects.values_list("value", flat=True)) == [0, 1, 2, 4, 5]


class WriterBetweenReadAndWrite:
    """Item 1 reads (its snapshot begins); then, the first time only, another connection
    writes, and item 1 writes after it. Item 1's write cannot wait for the lock: in WAL mode
    the other write commits after item 1's snapshot began; in rollback-journal mode the
    other writer holds the lock and waits for item 1's read lock to go. SQLite says
    "database is locked" at once, and the worker runs item 1 again, IMMEDIATE."""

    def __init__(self) -> None:
        self.calls = 0
        self.writer: threading.Thread | None = None
        self._holds_the_lock = threading.Event()

    def __call__(self, i: int) -> int:
        self.calls += 1
        Marker.objects.filter(key="nothing").count()  # a read: the snapshot begins
        if i == 1 and self.writer is None:
            self.writer = threading.Thread(target=self._write_elsewhere)
            self.writer.start()
            assert self._holds_the_lock.wait(30), "the other writer never wrote"
        Marker.objects.create(key=str(i), value=i)
        return i

    def _write_elsewhere(self) -> None:
        try:
            with transaction.atomic():
                Marker.objects.create(key="elsewhere", value=-1)  # the write lock is its now
                self._holds_the_lock.set()
        finally:
            connections.close_all()


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
def test_a_stale_snapshot_runs_the_item_again_holding_the_lock(journal_mode):
    func = WriterBetweenReadAndWrite()
    worker = Worker(task(func))
    worker.start()
    try:
        result = worker.run(Chunk(0, 0, [0, 1, 2], each_item=True))
    finally:
        worker.close()
    assert func.writer is not None
    func.writer.join()
    assert result.errors == {}
    assert result.timings.stale == 1 and func.calls == 4  # item 1 ran twice, once written
    assert sorted(Marker.objects.values_list("key", flat=True)) == ["0", "1", "2", "elsewhere"]


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
def test_the_first_write_is_measured(journal_mode):
    """Timings.unlocked: the time func ran before each item's first write."""

    def think_then_write(i: int) -> None:
        time.sleep(0.02)
        Marker.objects.create(key=str(i), value=i)
        time.sleep(0.005)

    worker = Worker(task(think_then_write))
    worker.start()
    try:
        timings = worker.run(Chunk(0, 0, [0, 1, 2, 3])).timings
    finally:
        worker.close()
    assert 0.08 <= timings.unlocked < timings.work - 0.015, timings


# -- whole runs ---------------------------------------------------------------------------


def think_then_mark_failing_at_100(i: int) -> int:
    # 30 ms: the choice must hold where a COMMIT takes 20 ms (a busy CI disk's fsync), and
    # the first chunks' wait for each other's lock makes chunk transactions look parallel
    time.sleep(0.03)
    if i == 100:
        raise ValueError("100 is refused")
    Marker.objects.create(key=str(i), value=i)
    return i


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_fixed_pool_on_sqlite_takes_each_item_once_measured(backend, journal_mode):
    """workers=2: after the first chunks, the items run each in a transaction of its own,
    each with its own journal record (a failure too); every other item is written once,
    and a resume runs nothing again."""
    run_id = f"each-{backend}"
    func = think_then_mark_failing_at_100
    report = bulkpool.run(func, range(120), backend=backend, workers=2, chunk_size=10, run_id=run_id)
    assert (report.ok, [f.index for f in report.failures]) == (119, [100])
    assert any(EACH_ITEM in note for note in report.notes), report.notes
    written = [i for i in range(120) if i != 100]
    assert sorted(Marker.objects.values_list("value", flat=True)) == written
    one_item_records = RunChunk.objects.filter(run__run_id=run_id, size=1).count()
    assert one_item_records >= 60, one_item_records  # the probe chunks ran whole
    failure = RunFailure.objects.get(chunk__run__run_id=run_id)
    assert (failure.index, failure.message, failure.chunk.size) == (100, "100 is refused", 1)
    again = bulkpool.run(func, range(120), backend=backend, workers=2, chunk_size=10, run_id=run_id)
    assert (again.ok, again.skipped, [f.index for f in again.failures]) == (0, 119, [100]), str(again)
    assert sorted(Marker.objects.values_list("value", flat=True)) == written


calls: collections.Counter[int] = collections.Counter()


def think_read_think_mark(i: int) -> int:
    calls[i] += 1
    time.sleep(0.01)
    Marker.objects.filter(key="nothing").exists()  # WAL: its snapshot begins; else: a read lock
    time.sleep(0.005)
    Marker.objects.create(key=str(i), value=i)
    return i


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
def test_items_that_read_before_writing(journal_mode):
    """Items that think, read, think again, then write, with other workers writing meanwhile.
    WAL: their first write finds the snapshot stale, so they run again, and the pool goes back
    to a transaction per chunk. Rollback journal: their read takes a lock that holds writers
    back, so they queue for the writer from it (sqlite_writers), and none runs twice.
    Nothing fails, nothing is written twice."""
    calls.clear()
    report = bulkpool.run(think_read_think_mark, range(200), backend="thread", workers=4, chunk_size=10)
    assert (report.ok, report.failed) == (200, 0)
    notes = "\n".join(report.notes)
    assert EACH_ITEM in notes, notes
    if journal_mode == "WAL":
        assert "back to a transaction per chunk" in notes, notes
        assert sum(calls.values()) > 200
    else:
        assert "back to" not in notes, notes
        assert set(calls) == set(range(200)) and set(calls.values()) == {1}, calls
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(range(200))


def test_the_chunk_flag_crosses_the_wire():
    from bulkpool.protocol import JSON

    chunk = Chunk(3, 30, [1, 2], each_item=True)
    assert JSON.decode(JSON.encode(chunk)) == chunk
    assert JSON.decode(JSON.encode(Chunk(3, 30, [1, 2]))).each_item is False
    halves = chunk.halves()
    assert all(half.each_item for half in halves)


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("atomic", ["item", False])
def test_only_chunk_transactions_give_way_to_each_item(atomic):
    """atomic="item" and False have a transaction per item, or none, already: the pool keeps
    their chunks as they are."""
    report = bulkpool.run(
        think_then_mark, range(60), backend="process", workers=2, chunk_size=10, atomic=atomic
    )
    assert (report.ok, report.failed) == (60, 0)
    assert not any(EACH_ITEM in note for note in report.notes), report.notes


def think_then_mark(i: int) -> int:
    time.sleep(0.01)
    Marker.objects.create(key=str(i), value=i)
    return i


PARENT = os.getpid()


def _rebuilt_only_in_a_worker(i: int) -> int:
    if os.getpid() == PARENT:
        raise RuntimeError("this value cannot be rebuilt in the caller")
    return i


class OnlyInAWorker:
    """A return value that pickles in a worker but cannot be unpickled in the caller."""

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (_rebuilt_only_in_a_worker, (self.i,))


def think_then_mark_returning_unreadable_at_105(i: int) -> object:
    time.sleep(0.01)
    Marker.objects.create(key=str(i), value=i)
    return OnlyInAWorker(i) if i == 105 else i


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
def test_a_value_the_caller_cannot_read_fails_its_item_alone():
    """In an each_item chunk, a committed item whose value the caller cannot unpickle is
    reported as such (written: unsafe to run again), and every other outcome is right."""
    outcomes = list(
        bulkpool.imap(
            think_then_mark_returning_unreadable_at_105,
            range(140),
            backend="process",
            workers=2,
            chunk_size=10,
        )
    )
    assert [o.index for o in outcomes] == list(range(140))
    failed = [(o.index, o.error.exc_type) for o in outcomes if o.error is not None]
    assert failed == [(105, "RuntimeError")], failed
    unreadable = outcomes[105].error
    assert unreadable is not None
    assert "it was written, but its return value could not be read here" in unreadable.message
    assert all(o.value == o.index for o in outcomes if o.index != 105)
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(range(140))
