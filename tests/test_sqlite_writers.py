"""SQLite's one writer: the workers of a run queue for it on an flock (``sqlite_writers``)
instead of sleeping in SQLite's busy handler.

The queue itself is real flocks between real threads and processes (one is SIGKILLed
holding it); the runs go through ``bulkpool.run`` on the SQLite test database with a busy
timeout of 5 ms, so that a worker that met another's write lock would fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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
from bulkpool.transactions import open_transaction
from tests.testapp.models import Marker

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")


@pytest.fixture
def queue_path(tmp_path: Path) -> str:
    path = tmp_path / "writer.lock"
    path.touch()
    return str(path)


def test_one_worker_holds_the_queue_and_the_next_gets_it_the_moment_it_is_left(queue_path):
    first, second = WriterQueue(queue_path), WriterQueue(queue_path)
    waiting = threading.Thread(target=second.take)
    try:
        first.take()
        waiting.start()
        time.sleep(0.3)
        assert not second.held, "two workers held the queue at once"
        left = time.monotonic()
        first.leave()
        waiting.join(5)
        assert second.held
        assert time.monotonic() - left < 0.5  # it looked again at once
    finally:
        waiting.join(15)
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


def test_a_worker_killed_holding_the_queue_frees_it(queue_path, monkeypatch):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, queue_path], stdout=subprocess.PIPE, text=True)
    queue = WriterQueue(queue_path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        monkeypatch.setattr("bulkpool.sqlite_writers.PATIENCE", 0.3)
        queue.take()
        assert not queue.held, "the queue let a second worker in"
        queue.leave()  # the transaction that gave up ends
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        monkeypatch.setattr("bulkpool.sqlite_writers.PATIENCE", 5.0)
        queue.take()
        assert queue.held, "the queue stayed taken by a dead worker"
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        queue.leave()
        queue.close()


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db
def test_the_queue_file_of_a_caller_that_was_killed_is_removed_by_the_next_run():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path(tempfile.gettempdir()) / f"bulkpool-sqlite-writer-{dead.pid}-test.lock"
    orphan.touch()
    mine = new_queue(connections["default"])
    try:
        assert mine is not None and f"-{os.getpid()}-" in mine
        assert not orphan.exists()
    finally:
        remove_queue(mine)
        orphan.unlink(missing_ok=True)


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
    """Workers whose SQLite connections wait 5 ms for a lock, much less than a chunk holds
    the write lock: a worker that met another's would fail with "database is locked"."""
    options = connections.settings["default"].setdefault("OPTIONS", {})
    monkeypatch.setitem(options, "timeout", 0.005)  # a moment's read lock is waited for
    monkeypatch.setattr("bulkpool.work.worker.SQLITE_BUSY_TIMEOUT", 0.005)


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("backend", "atomic"), [("thread", "chunk"), ("process", "chunk"), ("thread", "item")]
)
def test_workers_wait_in_the_queue_never_in_sqlite(backend, atomic, no_busy_timeout, monkeypatch):
    """Four workers writing at once, each chunk holding the lock a while: with a 5 ms busy
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


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("mode", ["rollback journal", "WAL"])
def test_a_deferred_transaction_queues_from_the_statement_that_holds_writers_back(mode, queue_path, request):
    """One heavy item's transaction: in WAL mode a read takes no write lock, so the item
    queues at its first write; in rollback-journal mode its read already keeps every other
    writer from committing, so it queues there. It leaves the queue when it ends."""
    if mode == "WAL":
        request.getfixturevalue("wal_on_sqlite")
    connection = connections["default"]
    try:
        with open_transaction("default", deferred=True, writer_queue=queue_path):
            queue = queue_of(connection, queue_path)
            assert queue is not None and not queue.held
            Marker.objects.filter(key="nothing").exists()
            assert queue.held == (mode == "rollback journal")
            Marker.objects.create(key="1", value=1)
            assert queue.held
        assert not queue.held
        with open_transaction("default", writer_queue=queue_path):  # a chunk's: from BEGIN on
            assert queue.held
        assert not queue.held
    finally:
        close_queue(connection)
    assert Marker.objects.count() == 1


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
