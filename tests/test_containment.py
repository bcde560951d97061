"""Worker.run contains every error of a chunk and reports it against the right items.

Most tests drive a ``Worker`` directly (as an executor does), on the test's own
connection; a few go through ``bulkpool.run`` to show the user-visible result. Rows are
counted from the database, never taken from the worker's word.
"""

from __future__ import annotations

import functools
import pickle
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, OperationalError, connection, transaction

import bulkpool
from bulkpool.journal import JournalRef
from bulkpool.models import Run, RunChunk, RunFailure
from bulkpool.protocol import PICKLE, Chunk, ChunkResult, Task
from bulkpool.work import Worker, journaling
from tests.testapp.models import Author, Book, Marker

pytestmark = pytest.mark.django_db(transaction=True)

MISSING_AUTHOR = 10**9  # no Author has this primary key


# -- jobs (module-level, so that process workers can import them) ----------------------------


def write_book(author_id: int) -> int:
    """Write a Book by ``author_id``, which may not exist (a dangling foreign key)."""
    return Book.objects.create(title=f"by {author_id}", author_id=author_id).pk


def write_marker_job(i: int) -> int:
    """Write one Marker for the item."""
    Marker.objects.create(key=str(i), value=i)
    return i


def write_marker_with_callback(calls: str, failing: int, i: int) -> int:
    """Write a Marker and register an on_commit callback (item 3's raises); item ``failing`` fails."""
    Marker.objects.create(key=str(i), value=i)
    transaction.on_commit(functools.partial(note_callback, calls, i))
    if i == failing:
        raise ValueError(f"item {i} fails")
    return i


def note_callback(calls: str, i: int) -> None:
    """Note that item ``i``'s callback ran; item 3's then raises."""
    with open(calls, "a") as file:
        file.write(f"{i}\n")
    if i == 3:
        raise ZeroDivisionError("the callback of item 3 divides by zero")


def raise_at_2(kind: type[BaseException], i: int) -> int:
    """Write a Marker, then raise ``kind`` for item 2."""
    Marker.objects.create(key=str(i), value=i)
    if i == 2:
        raise kind(f"item {i} raises {kind.__name__}")
    return i


def unsendable_at_2(i: int) -> Any:
    """Write a Marker; item 2 returns a lock, which cannot be pickled."""
    Marker.objects.create(key=str(i), value=i)
    return threading.Lock() if i == 2 else i


# -- helpers ---------------------------------------------------------------------------------


def make_task(func: Any, **fields: Any) -> Task:
    defaults: dict[str, Any] = {
        "setup": None,
        "atomic": "chunk",
        "database": "default",
        "retries": 0,
        "keep_values": True,
        "own_connections": False,
    }
    return Task(func=func, **{**defaults, **fields})


def authors_with_a_missing_one(count: int, missing_at: int) -> list[int]:
    """``count`` author primary keys, the one at ``missing_at`` dangling."""
    pks = [Author.objects.create(name=f"author {n}").pk for n in range(count - 1)]
    pks.insert(missing_at, MISSING_AUTHOR)
    return pks


def written_markers() -> list[int]:
    return sorted(Marker.objects.values_list("value", flat=True))


def callback_calls(path: Path) -> list[int]:
    return sorted(int(line) for line in path.read_text().split()) if path.exists() else []


def journal(run_id: str) -> JournalRef:
    run = Run.objects.create(run_id=run_id, func="tests", chunk_size=8)
    return JournalRef(run.pk, max_size=8)


# -- constraint violations at COMMIT ---------------------------------------------------------


def test_dangling_foreign_key_fails_alone():
    """A row whose foreign key dangles fails alone with IntegrityError; its chunk-mates are written."""
    authors = authors_with_a_missing_one(8, missing_at=5)
    result = Worker(make_task(write_book)).run(Chunk(0, 0, authors))
    assert set(result.errors) == {5}
    assert result.errors[5].exc_type.endswith("IntegrityError")
    assert sorted(Book.objects.values_list("author_id", flat=True)) == sorted(authors[:5] + authors[6:])
    assert result.values is not None
    assert result.values[5] is None
    assert set(result.values[:5] + result.values[6:]) == set(Book.objects.values_list("pk", flat=True))


def test_dangling_foreign_key_journaled_records_every_item_once(db_vendor):
    """With a journal, the refused chunk's items are recorded once each, the bad one as failed."""
    authors = authors_with_a_missing_one(8, missing_at=5)
    ref = journal("fk")
    result = Worker(make_task(write_book, journal=ref)).run(Chunk(0, 0, authors))
    assert set(result.errors) == {5}
    assert Book.objects.count() == 7
    records = sorted(RunChunk.objects.values_list("start", "size", "failed"))
    covered = [index for start, size, _ in records for index in range(start, start + size)]
    assert covered == list(range(8))  # every item in exactly one record
    assert sum(failed for *_, failed in records) == 1
    failure = RunFailure.objects.get()
    assert (failure.index, failure.exc_type.endswith("IntegrityError")) == (5, True)
    if db_vendor == "sqlite":  # COMMIT refused the chunk: it was split into pieces
        assert len(records) > 1
    else:  # checked before COMMIT (PostgreSQL) or at once (MySQL): one record
        assert len(records) == 1


def test_dangling_foreign_key_in_a_chunk_that_does_not_start_at_zero():
    """Offsets in the result are offsets in the chunk, wherever the chunk and its pieces start."""
    authors = authors_with_a_missing_one(6, missing_at=4)
    result = Worker(make_task(write_book)).run(Chunk(3, 30, authors))
    assert set(result.errors) == {4}
    assert Book.objects.count() == 5


def test_two_dangling_foreign_keys_with_a_failing_item():
    """Two dangling rows and an item failing in func: exactly those three fail."""
    authors = [Author.objects.create(name=f"author {n}").pk for n in range(6)]
    authors[1] = authors[6 - 1] = MISSING_AUTHOR
    authors[3] = -1  # func fails at once for it: a negative primary key finds no row either

    def write_or_fail(author_id: int) -> int:
        if author_id < 0:
            raise ValueError("no such author")
        return write_book(author_id)

    result = Worker(make_task(write_or_fail)).run(Chunk(0, 0, authors))
    assert set(result.errors) == {1, 3, 5}
    assert result.errors[3].exc_type == "ValueError"
    assert Book.objects.count() == 3


def test_an_item_that_failed_is_not_run_again_while_the_chunk_is_searched():
    """The redo and the pieces of a refused chunk skip an item that failed in func: it runs once."""
    authors = authors_with_a_missing_one(8, missing_at=6)
    authors[2] = -1
    calls: Counter[int] = Counter()

    def write_or_fail(author_id: int) -> int:
        calls[author_id] += 1
        if author_id < 0:
            raise ValueError("no such author")
        return write_book(author_id)

    worker = Worker(make_task(write_or_fail))
    result = worker.run(Chunk(0, 0, authors))
    assert set(result.errors) == {2, 6}
    # The worker stays careful after a failing chunk: item 2 now fails inside its savepoint.
    authors[2] = -2
    again = worker.run(Chunk(1, 8, authors))
    assert set(again.errors) == {2, 6}
    assert (calls[-1], calls[-2]) == (1, 1)
    assert Book.objects.count() == 12


def test_dangling_foreign_key_with_atomic_item():
    """atomic='item': the item whose COMMIT is refused fails alone with IntegrityError."""
    authors = authors_with_a_missing_one(4, missing_at=1)
    result = Worker(make_task(write_book, atomic="item")).run(Chunk(0, 0, authors))
    assert set(result.errors) == {1}
    assert result.errors[1].exc_type.endswith("IntegrityError")
    assert Book.objects.count() == 3


@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_dangling_foreign_key_through_run(backend):
    """bulkpool.run reports the dangling row as the one failure; every other row is written."""
    authors = authors_with_a_missing_one(25, missing_at=13)
    report = bulkpool.run(write_book, authors, backend=backend, workers=2, chunk_size=10)
    assert (report.ok, report.failed) == (24, 1)
    (failure,) = report.failures
    assert failure.index == 13
    assert failure.exc_type.endswith("IntegrityError")
    assert Book.objects.count() == 24


def test_dangling_foreign_key_through_a_journaled_run():
    """A journaled run records every item once, in whole chunks or in pieces, the bad one failed."""
    authors = authors_with_a_missing_one(25, missing_at=13)
    report = bulkpool.run(write_book, authors, backend="serial", chunk_size=10, run_id="fk-run")
    assert (report.ok, report.failed) == (24, 1)
    assert Book.objects.count() == 24
    records = sorted(RunChunk.objects.values_list("start", "size"))
    assert [index for start, size in records for index in range(start, start + size)] == list(range(25))
    assert list(RunFailure.objects.values_list("index", flat=True)) == [13]


@pytest.mark.vendor("postgresql", "mysql")
def test_dry_run_reports_a_dangling_foreign_key():
    """A dry run names the dangling row too (checked before its rollback), and writes nothing."""
    authors = authors_with_a_missing_one(6, missing_at=2)
    result = Worker(make_task(write_book, dry_run=True)).run(Chunk(0, 0, authors))
    assert set(result.errors) == {2}
    assert Book.objects.count() == 0


@pytest.mark.vendor("postgresql", "sqlite")
def test_constraint_check_leaves_deferred_constraints_deferred():
    """After the per-item checks, a later item may still write its rows in either order."""

    def book_before_author(i: int) -> int:
        # The book names an author created after it: fine while the FK check is deferred.
        author_pk = 10_000 + i
        Book.objects.create(title=str(i), author_id=author_pk if i != 1 else MISSING_AUTHOR)
        Author.objects.create(pk=author_pk, name=f"late {i}")
        return i

    result = Worker(make_task(book_before_author)).run(Chunk(0, 0, [0, 1, 2, 3]))
    assert set(result.errors) == {1}  # item 1's book dangles; 2 and 3 came after the checks
    assert Book.objects.count() == 3


# -- on_commit callbacks that raise ----------------------------------------------------------


@pytest.mark.parametrize("failing", [None, 1], ids=["all-ok", "item-1-fails"])
def test_raising_on_commit_callback_is_reported_against_its_item(tmp_path, failing):
    """The chunk commits, its items are ok, the callback's error is kept at its item's offset."""
    calls = tmp_path / "calls"
    func = functools.partial(write_marker_with_callback, str(calls), -1 if failing is None else failing)
    result = Worker(make_task(func)).run(Chunk(0, 0, list(range(6))))
    expected_ok = [i for i in range(6) if i != failing]
    assert set(result.errors) == ({failing} if failing is not None else set())
    assert set(result.callback_errors) == {3}
    assert result.callback_errors[3].exc_type == "ZeroDivisionError"
    assert written_markers() == expected_ok
    assert callback_calls(calls) == expected_ok  # each once; the ones after item 3's still ran


def test_raising_on_commit_callback_with_atomic_item(tmp_path):
    """atomic='item': the callback's error is kept at its item's offset; the item is written."""
    calls = tmp_path / "calls"
    func = functools.partial(write_marker_with_callback, str(calls), -1)
    result = Worker(make_task(func, atomic="item")).run(Chunk(0, 0, list(range(5))))
    assert result.errors == {}
    assert set(result.callback_errors) == {3}
    assert written_markers() == list(range(5))
    assert callback_calls(calls) == list(range(5))


def test_raising_on_commit_callback_in_autocommit_is_the_items_error(tmp_path):
    """atomic=False: on_commit runs at once, inside func, so its error is the item's failure."""
    calls = tmp_path / "calls"
    func = functools.partial(write_marker_with_callback, str(calls), -1)
    result = Worker(make_task(func, atomic=False)).run(Chunk(0, 0, list(range(5))))
    assert set(result.errors) == {3}
    assert result.errors[3].exc_type == "ZeroDivisionError"
    assert written_markers() == list(range(5))  # autocommit: item 3's row stays written


def test_callbacks_in_the_callers_transaction_are_left_to_the_caller(tmp_path):
    """Inside the caller's transaction the callbacks are the caller's: they run at its COMMIT."""
    calls = tmp_path / "calls"
    func = functools.partial(write_marker_with_callback, str(calls), -1)
    result: ChunkResult | None = None
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        result = Worker(make_task(func)).run(Chunk(0, 0, list(range(5))))
        assert callback_calls(calls) == []
    assert result is not None
    assert (result.errors, result.callback_errors) == ({}, {})


@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_raising_on_commit_callback_through_run(tmp_path, backend):
    """bulkpool.run neither raises nor hangs: every item is written once, its callback run once."""
    calls = tmp_path / "calls"
    func = functools.partial(write_marker_with_callback, str(calls), -1)
    report = bulkpool.run(func, range(12), backend=backend, workers=2, chunk_size=5)
    assert (report.ok, report.failed) == (12, 0)
    assert written_markers() == list(range(12))
    assert callback_calls(calls) == list(range(12))


# -- BaseException from user code ------------------------------------------------------------


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_base_exception_from_func_is_the_items_failure(kind):
    """SystemExit, a KeyboardInterrupt raised in a worker thread, GeneratorExit: the item fails alone."""
    result = Worker(make_task(functools.partial(raise_at_2, kind))).run(Chunk(0, 0, list(range(5))))
    assert set(result.errors) == {2}
    assert result.errors[2].exc_type == kind.__name__
    assert written_markers() == [0, 1, 3, 4]


def test_keyboard_interrupt_in_the_callers_thread_propagates():
    """In the caller's thread, Ctrl-C is the caller's: run() raises it, the chunk rolls back."""
    worker = Worker(make_task(functools.partial(raise_at_2, KeyboardInterrupt)), in_caller_thread=True)
    with pytest.raises(KeyboardInterrupt):
        worker.run(Chunk(0, 0, list(range(5))))
    assert not worker.committing
    assert written_markers() == []


def test_system_exit_through_run():
    """bulkpool.run reports a SystemExit from func as that item's failure and goes on."""
    report = bulkpool.run(functools.partial(raise_at_2, SystemExit), range(6), backend="serial")
    assert (report.ok, report.failed) == (5, 1)
    assert report.failures[0].exc_type == "SystemExit"
    assert written_markers() == [0, 1, 3, 4, 5]


# -- values that cannot be sent back ---------------------------------------------------------


@pytest.mark.parametrize("atomic", ["chunk", "item"])
def test_unsendable_value_fails_its_item_and_rolls_it_back(atomic):
    """A value check_value refuses fails its item, whose work is rolled back; the rest is written."""
    task = make_task(unsendable_at_2, atomic=atomic, check_value=PICKLE.check_value)
    result = Worker(task).run(Chunk(0, 0, list(range(5))))
    assert set(result.errors) == {2}
    assert result.errors[2].message.startswith("its return value cannot be sent back:")
    assert written_markers() == [0, 1, 3, 4]
    assert result.values == [0, 1, None, 3, 4]
    pickle.dumps(result)  # what goes back is sendable


def test_unsendable_value_in_autocommit_is_marked_unsafe():
    """atomic=False: the item's work stays written, so its failure is marked unsafe to retry."""
    task = make_task(unsendable_at_2, atomic=False, check_value=PICKLE.check_value)
    result = Worker(task).run(Chunk(0, 0, list(range(4))))
    assert set(result.errors) == {2}
    assert result.errors[2].unsafe
    assert written_markers() == [0, 1, 2, 3]


def test_values_are_not_checked_when_not_kept():
    """Without keep_values nothing is sent back, so nothing is checked."""
    task = make_task(unsendable_at_2, keep_values=False, check_value=PICKLE.check_value)
    result = Worker(task).run(Chunk(0, 0, list(range(4))))
    assert result.errors == {}
    assert written_markers() == [0, 1, 2, 3]


# -- the journal write fails -----------------------------------------------------------------


def test_journal_write_failing_fails_the_chunk_and_writes_nothing(monkeypatch):
    """record_chunk raising a DatabaseError rolls the chunk back and fails its items, saying why."""

    def broken_record(*args: Any) -> None:
        Marker.objects.create(key="journal", value=-1)  # written in the chunk's transaction
        raise DatabaseError("disk full")

    monkeypatch.setattr(journaling, "record_chunk", broken_record)
    task = make_task(write_marker_job, journal=journal("broken"))
    result = Worker(task).run(Chunk(0, 10, list(range(10, 15))))
    assert set(result.errors) == set(range(5))
    message = result.errors[0].message
    assert "the journal row for items 10..14 could not be written" in message
    assert "disk full" in message
    assert written_markers() == []


def test_journal_write_meeting_a_transient_error_is_retried(monkeypatch):
    """A transient error from the journal write rolls the chunk back and runs it again, once."""
    real_record = journaling.record_chunk
    failures = [OperationalError("database is locked")]

    def busy_once(*args: Any) -> None:
        if failures:
            raise failures.pop()
        real_record(*args)

    monkeypatch.setattr(journaling, "record_chunk", busy_once)
    task = make_task(write_marker_job, journal=journal("busy"), retries=1)
    result = Worker(task).run(Chunk(0, 0, [1, 2, 3]))
    assert (result.errors, result.retried) == ({}, 3)
    assert written_markers() == [1, 2, 3]
    assert RunChunk.objects.count() == 1


def test_journal_write_failing_through_a_journaled_run(monkeypatch):
    """A journaled serial run whose journal writes fail reports every item failed, and returns."""

    def broken_record(*args: Any) -> None:
        raise DatabaseError("disk full")

    monkeypatch.setattr(journaling, "record_chunk", broken_record)
    report = bulkpool.run(write_marker_job, range(12), backend="serial", chunk_size=5, run_id="broken")
    assert (report.ok, report.failed) == (0, 12)
    assert "could not be written" in report.failures[0].message
    assert written_markers() == []


def test_journal_tables_gone_fails_the_chunk_and_writes_nothing():
    """The journal's tables dropped under a running job: its items fail, nothing is written."""
    ref = journal("gone")
    models = [RunFailure, RunChunk]
    with connection.schema_editor() as editor:
        for model in models:
            editor.delete_model(model)
    try:
        result = Worker(make_task(write_marker_job, journal=ref)).run(Chunk(0, 0, list(range(5))))
    finally:
        with connection.schema_editor() as editor:
            for model in reversed(models):
                editor.create_model(model)
    assert set(result.errors) == set(range(5))
    assert "the journal could not be read for items 0..4" in result.errors[0].message
    assert written_markers() == []


# -- never raises; timings; committing -------------------------------------------------------


def test_an_error_outside_any_item_fails_the_chunk_without_raising(monkeypatch):
    """A bug outside func (here: the journal check) fails the chunk's items; run() returns."""

    def broken(*args: Any) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(journaling, "is_recorded", broken)
    result = Worker(make_task(write_marker_job, journal=journal("bug"))).run(Chunk(0, 0, [1, 2, 3]))
    assert set(result.errors) == {0, 1, 2}
    assert result.errors[0].exc_type == "RuntimeError"
    assert written_markers() == []


def test_before_commit_raising_fails_the_chunk_without_raising():
    """An executor's before_commit that raises (its parent is gone): rolled back, items failed."""

    def parent_gone() -> None:
        raise BrokenPipeError("the parent hung up")

    worker = Worker(make_task(write_marker_job), before_commit=parent_gone)
    result = worker.run(Chunk(0, 0, [1, 2, 3]))
    assert set(result.errors) == {0, 1, 2}
    assert result.errors[0].exc_type == "BrokenPipeError"
    assert not worker.committing
    assert written_markers() == []


def test_timings_and_committing():
    """The result says where the time went; ``committing`` is set from just before COMMIT."""
    seen: list[bool] = []
    worker = Worker(make_task(write_marker_job), before_commit=lambda: seen.append(worker.committing))
    result = worker.run(Chunk(0, 0, list(range(3))))
    assert seen == [True]
    assert not worker.committing
    timings = result.timings
    assert timings.work > 0 and timings.commit > 0
    assert timings.total >= timings.load + timings.work + timings.commit
