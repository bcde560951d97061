"""bulkpool.run and bulkpool.imap on every executor, against the configured database."""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter

import pytest
from django.db import transaction

import bulkpool
from bulkpool import ConfigurationError, ItemFailed, ProcessExecutor, TooManyFailures, WorkerStartupError
from tests import jobs
from tests.testapp.models import Marker

BACKENDS = ["serial", "thread", "process"]
START_METHODS = ["fork", "spawn", "forkserver"]

pytestmark = pytest.mark.django_db(transaction=True)


def marker_counts() -> Counter[str]:
    return Counter(Marker.objects.values_list("key", flat=True))


def written_items() -> set[int]:
    return {int(key) for key in Marker.objects.values_list("key", flat=True) if key.isdigit()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_item_runs_exactly_once(backend):
    """Every item of the input is written once, across chunks and workers."""
    report = bulkpool.run(jobs.write_marker, range(250), backend=backend, workers=2, chunk_size=20)
    assert (report.total, report.ok, report.failed) == (250, 250, 0)
    counts = marker_counts()
    assert len(counts) == 250
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("backend", BACKENDS)
def test_failing_item_does_not_lose_its_chunk_mates(backend):
    """With atomic='chunk', failing items roll back alone; the rest of each chunk is written."""
    report = bulkpool.run(jobs.fail_multiples_of_7, range(100), backend=backend, workers=2, chunk_size=10)
    failing = {i for i in range(100) if i % 7 == 0}
    assert written_items() == set(range(100)) - failing
    assert report.failed == len(failing)
    assert report.ok == 100 - len(failing)
    assert {f.index for f in report.failures} == failing


@pytest.mark.parametrize("backend", BACKENDS)
def test_failure_names_item_error_and_worker_traceback(backend):
    """A Failure carries the input index, the item, the exception type, message and traceback."""
    report = bulkpool.run(jobs.fail_multiples_of_7, [3, 14, 5], backend=backend, workers=1)
    (failure,) = report.failures
    assert (failure.index, failure.item) == (1, 14)
    assert failure.exc_type == "ValueError"
    assert failure.message == "14 is a multiple of 7"
    assert "tests/jobs.py" in failure.traceback
    assert "raise ValueError" in failure.traceback
    assert "item 1 (14): ValueError: 14 is a multiple of 7" in str(report)


@pytest.mark.parametrize("atomic", ["item", False])
@pytest.mark.parametrize("backend", ["serial", "process"])
def test_other_transaction_modes_write_good_items(backend, atomic):
    """atomic='item' and atomic=False also write every good item and report the bad ones."""
    report = bulkpool.run(
        jobs.fail_multiples_of_7, range(30), backend=backend, workers=2, chunk_size=7, atomic=atomic
    )
    failing = {0, 7, 14, 21, 28}
    assert {f.index for f in report.failures} == failing
    good = set(range(30)) - failing
    # Without a transaction the failing item's own write stays: that is what atomic=False means.
    assert written_items() == (good if atomic == "item" else set(range(30)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_error_raise_stops_and_carries_the_partial_report(backend):
    """on_error='raise' stops feeding work and raises ItemFailed with what was done."""
    with pytest.raises(ItemFailed) as raised:
        bulkpool.run(
            jobs.fail_multiples_of_7,
            range(1, 2000),
            backend=backend,
            workers=2,
            chunk_size=5,
            on_error="raise",
        )
    report = raised.value.report
    assert raised.value.failure in report.failures
    assert raised.value.failure.item % 7 == 0
    assert report.total < 1999  # the input was not read to the end
    assert report.ok == len(written_items())  # what was reported ok was written, and only that
    assert written_items() >= set(range(1, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_failures_stops_the_run(backend):
    """max_failures stops the run once that many items failed, and raises TooManyFailures."""
    with pytest.raises(TooManyFailures) as raised:
        bulkpool.run(
            jobs.fail_multiples_of_7, range(1, 5000), backend=backend, workers=2, chunk_size=7, max_failures=3
        )
    report = raised.value.report
    assert report.failed >= 3
    assert report.total < 4999
    assert report.ok == len(written_items())


def test_rejects_file_gets_one_json_line_per_failed_item(tmp_path):
    """rejects= writes each failed item, with its error, as one JSON line."""
    path = tmp_path / "rejects.jsonl"
    bulkpool.run(
        jobs.fail_multiples_of_7, range(30), backend="process", workers=2, chunk_size=4, rejects=path
    )
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["item"] for line in lines) == [0, 7, 14, 21, 28]
    assert all(line["exc_type"] == "ValueError" for line in lines)
    assert {line["index"] for line in lines} == {0, 7, 14, 21, 28}
    assert "multiple of 7" in lines[0]["message"]


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_setup_runs_once_per_worker_and_feeds_state(backend):
    """setup runs exactly once in each worker, and func(item, state) gets that worker's state."""
    report = bulkpool.run(
        jobs.write_marker_with_state,
        range(200),
        backend=backend,
        workers=3,
        chunk_size=5,
        setup=jobs.setup_records_worker,
    )
    assert report.failed == 0, report
    counts = marker_counts()
    setups = {key.removeprefix("setup:") for key in counts if key.startswith("setup:")}
    users = {key.removeprefix("state:") for key in counts if key.startswith("state:")}
    assert len(setups) == 3  # one setup per worker, each in a different worker
    assert all(counts[f"setup:{name}"] == 1 for name in setups)
    assert users <= setups  # every item saw the state made by its own worker's setup


@pytest.mark.parametrize("backend", BACKENDS)
def test_imap_yields_in_input_order(backend):
    """imap(ordered=True) yields one Outcome per item, in input order, with values and errors."""
    outcomes = list(
        bulkpool.imap(jobs.fail_multiples_of_7, range(60), backend=backend, workers=2, chunk_size=4)
    )
    assert [o.index for o in outcomes] == list(range(60))
    assert [o.item for o in outcomes] == list(range(60))
    assert [o.value for o in outcomes if o.ok] == [i for i in range(60) if i % 7]
    assert [o.index for o in outcomes if not o.ok] == [i for i in range(60) if i % 7 == 0]


def test_imap_unordered_yields_every_item():
    """imap(ordered=False) yields every item once, as chunks finish."""
    outcomes = list(
        bulkpool.imap(jobs.identity, range(100), ordered=False, backend="process", workers=2, chunk_size=3)
    )
    assert sorted(o.value for o in outcomes) == list(range(100))


@pytest.mark.parametrize("start_method", START_METHODS)
def test_start_methods_write_to_the_test_database(start_method, django_db_setup):
    """Under fork, forkserver and spawn, workers use the caller's (test) database."""
    from django.db import connection

    executor = ProcessExecutor(start_method=start_method)
    names = {o.value for o in bulkpool.imap(jobs.database_name, range(6), backend=executor, workers=2)}
    assert names == {connection.settings_dict["NAME"]}
    report = bulkpool.run(jobs.write_marker, range(40), backend=executor, workers=2, chunk_size=3)
    assert report.ok == 40
    assert written_items() == set(range(40))


@pytest.mark.parametrize("start_method", START_METHODS)
def test_lambdas_and_closures_ship_to_process_workers(start_method):
    """A lambda closing over a local value runs on process workers under every start method."""
    offset = 1000
    outcomes = bulkpool.imap(
        lambda i: Marker.objects.create(key=str(i + offset)).pk and i + offset,
        range(10),
        backend=ProcessExecutor(start_method=start_method),
        workers=2,
    )
    assert [o.value for o in outcomes] == list(range(1000, 1010))
    assert written_items() == set(range(1000, 1010))


def test_unshippable_function_is_refused_before_any_item():
    """A function that cannot be pickled is refused up front, saying why and what to do."""
    lock = threading.Lock()

    def uses_lock(i):
        with lock:
            Marker.objects.create(key=str(i))

    with pytest.raises(ConfigurationError, match=r"cannot be sent to worker processes.*backend='thread'"):
        bulkpool.run(uses_lock, range(5), backend="process", workers=2)
    assert Marker.objects.count() == 0
    bulkpool.run(uses_lock, range(5), backend="thread", workers=2)  # threads need no pickling
    assert Marker.objects.count() == 5


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_call_inside_a_transaction_is_refused(backend):
    """Concurrent backends are refused inside an open transaction: workers cannot see its rows."""
    with transaction.atomic(), pytest.raises(ConfigurationError, match="inside a transaction"):
        bulkpool.run(jobs.write_marker, range(5), backend=backend, workers=2)
    assert Marker.objects.count() == 0


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_in_memory_sqlite_is_refused_for_concurrent_backends(backend):
    """An in-memory SQLite database cannot be shared with workers, so it is refused up front."""
    with pytest.raises(ConfigurationError, match="in-memory SQLite"):
        bulkpool.run(jobs.identity, range(5), backend=backend, workers=2, database="memory")


@pytest.mark.parametrize("workers", [2, "auto"])
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_worker_setup_failure_shows_the_real_error(backend, workers):
    """A worker whose setup fails raises WorkerStartupError carrying the worker's traceback
    (with workers="auto", the caller's, which runs the first chunks)."""
    with pytest.raises(WorkerStartupError) as raised:
        bulkpool.run(
            jobs.write_marker_with_state, range(5), backend=backend, workers=workers, setup=jobs.failing_setup
        )
    assert "setup could not reach the mail server" in str(raised.value)
    assert "failing_setup" in str(raised.value)
    assert Marker.objects.count() == 0


def test_unpicklable_items_fail_alone_with_a_clear_message():
    """Items that cannot be sent to a process are reported failed; other chunks still run."""
    items = [1, 2, threading.Lock(), 4, 5, 6]
    report = bulkpool.run(jobs.identity, items, backend="process", workers=1, chunk_size=2)
    assert report.ok == 4
    assert {f.index for f in report.failures} == {2, 3}
    assert "cannot be sent to a worker process" in report.failures[0].message


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_generators_are_consumed_lazily(backend):
    """A generator input is read only as far as the in-flight window needs."""
    read = []

    def numbers():
        for i in range(10_000):
            read.append(i)
            yield i

    outcomes = bulkpool.imap(jobs.identity, numbers(), backend=backend, workers=2, chunk_size=10)
    first = next(outcomes)
    assert first.value == 0
    assert len(read) < 200  # a few chunks per worker, not the whole input
    outcomes.close()


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_failing_item_runs_once_and_its_chunk_is_redone_carefully(backend, tmp_path):
    """A chunk runs without savepoints until an item fails; the failing item is never run twice."""
    func = functools.partial(jobs.count_calls_then_fail_multiples_of_7, str(tmp_path))
    report = bulkpool.run(func, range(1, 31), backend=backend, workers=1, chunk_size=10)
    calls = {int(path.stem): len(path.read_text()) for path in tmp_path.glob("*.calls")}
    assert {f.item for f in report.failures} == {7, 14, 21, 28}
    assert all(calls[i] == 1 for i in (7, 14, 21, 28))
    assert written_items() == {i for i in range(1, 31) if i % 7}
    assert calls[1] == 2  # run before item 7 failed, then again in the careful pass


@pytest.mark.parametrize(("atomic", "retried"), [("chunk", True), ("item", True), (False, False)])
def test_transient_errors_are_retried_only_where_a_transaction_undid_the_attempt(atomic, retried, tmp_path):
    """A transient error reruns work a transaction rolled back; without one, the item fails instead."""
    func = functools.partial(jobs.write_then_busy_once, str(tmp_path / "busy"))
    report = bulkpool.run(func, range(6), backend="serial", chunk_size=3, atomic=atomic)
    assert Counter(Marker.objects.values_list("value", flat=True)) == Counter(range(6))
    assert report.retried > 0 if retried else report.retried == 0
    assert [f.index for f in report.failures] == ([] if retried else [3])
