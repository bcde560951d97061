"""SQLite's one writer: the workers of a run queue for it on an flock (``sqlite_writers``)
instead of sleeping in SQLite's busy handler.

The queue itself is real flocks between real threads and processes (one is SIGKILLed
holding it); the runs go through ``bulkpool.run`` on the SQLite test database with no busy
timeout at all, so that a worker that met another's write lock would fail at once.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.db import connections

import bulkpool
from bulkpool import pooling
from bulkpool.executors import ProcessExecutor
from bulkpool.sqlite_writers import (
    WriterQueue,
    close_queue,
    holds_back_writers,
    new_queue,
    queue_of,
    remove_queue,
)
from tests.testapp.models import Marker

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")


@pytest.fixture
def queue_path(tmp_path: Path) -> str:
    path = tmp_path / "writer.lock"
    path.touch()
    return str(path)


def taken_within(queue: WriterQueue, seconds: float) -> bool:
    """Whether another thread's ``take()`` of ``queue`` returns within ``seconds``."""
    taken = threading.Event()

    def take() -> None:
        queue.take()
        taken.set()

    threading.Thread(target=take, daemon=True).start()
    return taken.wait(seconds)


def test_one_worker_holds_the_queue_and_the_next_gets_it_the_moment_it_is_left(queue_path):
    first, second = WriterQueue(queue_path), WriterQueue(queue_path)
    try:
        first.take()
        assert not taken_within(second, 0.3), "two workers held the queue at once"
        left = time.monotonic()
        first.leave()
        deadline = time.monotonic() + 5
        while not second.held and time.monotonic() < deadline:
            time.sleep(0.001)
        assert second.held
        assert time.monotonic() - left < 0.5  # woken, not polling
        assert not taken_within(first, 0.2), "the queue let a second worker in"
    finally:
        second.leave()
        first.close()
        second.close()


HOLDER = """
import sys, time
from bulkpool.sqlite_writers import WriterQueue
queue = WriterQueue(sys.argv[1])
queue.take()
print("holding", flush=True)
time.sleep(60)
"""


def test_a_worker_killed_holding_the_queue_frees_it(queue_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, queue_path], stdout=subprocess.PIPE, text=True)
    queue = WriterQueue(queue_path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        assert not taken_within(queue, 0.3), "the queue let a second worker in"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 5
        while not queue.held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue.held, "the queue stayed taken by a dead worker"
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        queue.leave()
        queue.close()


def test_what_holds_other_writers_back_depends_on_the_journal_mode():
    assert holds_back_writers('INSERT INTO "t" VALUES (1)', wal=True)
    assert holds_back_writers("  update t set x = 1", wal=True)
    assert not holds_back_writers('SELECT 1 FROM "t"', wal=True)  # WAL: readers never block a writer
    assert holds_back_writers('SELECT 1 FROM "t"', wal=False)  # a read lock keeps a COMMIT waiting


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
def test_each_thread_has_its_place_and_a_gone_file_means_no_queue(queue_path):
    """Django's connections are per thread: so are the queue's open files. Once the run's
    file is removed, a worker still starting finds none and relies on SQLite alone."""
    connection = connections["default"]
    mine = queue_of(connection, queue_path)
    assert mine is not None and queue_of(connection, queue_path) is mine
    try:
        assert queue_of_another_thread(queue_path) not in (None, mine)
        remove_queue(queue_path)
        assert queue_of_another_thread(queue_path) is None
    finally:
        close_queue(connection)
    assert new_queue(connections["memory"]) is None  # an in-memory database has no other writer


def queue_of_another_thread(path: str) -> WriterQueue | None:
    found: list[WriterQueue | None] = []

    def look() -> None:
        found.append(queue_of(connections["default"], path))
        close_queue(connections["default"])

    thread = threading.Thread(target=look)
    thread.start()
    thread.join()
    return found[0]


def mark_slowly(i: int) -> int:
    """A chunk's transaction holds the write lock while it sleeps: the others must wait."""
    Marker.objects.create(key=str(i), value=i)
    time.sleep(0.003)
    return i


@pytest.fixture
def no_busy_timeout(monkeypatch):
    """Workers whose SQLite connections do not wait for the write lock at all: a worker that
    met another's lock would fail at once with "database is locked"."""
    options = connections.settings["default"].setdefault("OPTIONS", {})
    monkeypatch.setitem(options, "timeout", 0)
    monkeypatch.setattr("bulkpool.work.worker.SQLITE_BUSY_TIMEOUT", 0)


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("backend", "atomic"), [("thread", "chunk"), ("process", "chunk"), ("thread", "item")]
)
def test_workers_wait_in_the_queue_never_in_sqlite(backend, atomic, no_busy_timeout, monkeypatch):
    """Four workers writing at once, each chunk holding the lock a while: with no busy
    timeout, only the queue keeps them from meeting "database is locked" (retried, then
    failed). Every item is written once, none was retried, and the queue's file is gone."""
    made: list[str | None] = []

    def making(connection):
        made.append(new_queue(connection))
        return made[-1]

    monkeypatch.setattr(pooling, "new_queue", making)
    executor = ProcessExecutor(4, start_method="fork") if backend == "process" else "thread"
    report = bulkpool.run(
        mark_slowly, range(200), backend=executor, workers=4, chunk_size=5, atomic=atomic, progress=False
    )
    assert (report.ok, report.failed, report.retried) == (200, 0, 0), str(report)
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(range(200))
    assert len(made) == 1 and made[0] is not None and not os.path.exists(made[0])


calls: collections.Counter[int] = collections.Counter()


def think_then_mark(i: int) -> int:
    calls[i] += 1
    time.sleep(0.01)
    Marker.objects.create(key=str(i), value=i)
    return i


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
def test_in_wal_mode_each_item_queues_at_its_first_write(no_busy_timeout, wal_on_sqlite):
    """Heavy items, each in a transaction of its own that takes the lock at its first write:
    with no busy timeout, a first write that met another worker's lock would fail at once
    and run its item again. Queued from the first write on, every item runs once."""
    calls.clear()
    report = bulkpool.run(think_then_mark, range(120), backend="thread", workers=4, chunk_size=10)
    assert (report.ok, report.failed, report.retried) == (120, 0, 0), str(report)
    assert any("each item in a transaction of its own" in note for note in report.notes), report.notes
    assert set(calls) == set(range(120)) and set(calls.values()) == {1}, calls


def test_a_waiter_that_runs_out_of_patience_goes_on_without_the_queue(queue_path, monkeypatch):
    """A worker that wrote past Django's cursor holds SQLite's lock and waits in the queue,
    while the queue's holder waits for that lock: the waiter goes on after PATIENCE, so
    neither waits out its busy timeout; it does not wait again in the same transaction."""
    monkeypatch.setattr("bulkpool.sqlite_writers.PATIENCE", 0.2)
    holder, waiter = WriterQueue(queue_path), WriterQueue(queue_path)
    try:
        holder.take()
        started = time.monotonic()
        waiter.take()
        assert not waiter.held and 0.2 <= time.monotonic() - started < 2
        started = time.monotonic()
        waiter.take()  # the same transaction: on at once
        assert time.monotonic() - started < 0.1
        waiter.leave()  # its transaction ended: the next one queues again
        holder.leave()
        waiter.take()
        assert waiter.held
    finally:
        waiter.leave()
        holder.close()
        waiter.close()
