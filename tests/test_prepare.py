"""prepare=: per-item work on the worker, outside any transaction, its value passed to func."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection

import bulkpool
from bulkpool import ConfigurationError
from tests import jobs
from tests.params import EXECUTORS
from tests.testapp.models import Marker

WORKER_EXECUTORS = EXECUTORS[1:]  # thread and process: workers with their own connections


@pytest.mark.parametrize("backend", WORKER_EXECUTORS)
@pytest.mark.parametrize("atomic", ["chunk", "item", False])
def test_prepare_runs_outside_any_transaction_and_func_gets_its_value(backend, atomic):
    """prepare sees no open transaction; func gets its value, inside the chunk's transaction."""
    report = bulkpool.imap(
        jobs.write_prepared,
        range(20),
        prepare=jobs.prepare_outside_transaction,
        backend=backend,
        workers=2,
        chunk_size=6,
        atomic=atomic,
    )
    outcomes = list(report)
    values = {o.index: o.value for o in outcomes if o.error is None}
    assert sorted(values) == [i for i in range(20) if i != 13]
    assert all(value == (i, False, atomic is not False) for i, value in values.items())
    assert Marker.objects.count() == 19


@pytest.mark.parametrize("backend", WORKER_EXECUTORS)
def test_a_failing_prepare_fails_its_item_alone(backend):
    """An exception in prepare is that item's failure: func never runs for it, its chunk-mates are written."""
    report = bulkpool.run(
        jobs.write_prepared,
        range(20),
        prepare=jobs.prepare_outside_transaction,
        backend=backend,
        workers=2,
        chunk_size=20,
    )
    assert (report.ok, report.failed) == (19, 1)
    failure = report.failures[0]
    assert (failure.index, failure.exc_type) == (13, "ValueError")
    assert "13 cannot be prepared" in failure.message
    assert not Marker.objects.filter(key="13").exists()
    assert Marker.objects.count() == 19


@pytest.mark.parametrize("backend", EXECUTORS)
def test_prepare_gets_the_workers_setup_state(backend):
    """With setup, prepare(item, state) and func(value, state) see the same worker's state."""
    outcomes = list(
        bulkpool.imap(
            jobs.echo_with_state,
            range(10),
            setup=jobs.worker_identity,
            prepare=jobs.prepare_with_state,
            backend=backend,
            workers=2,
            chunk_size=3,
        )
    )
    assert [o.error for o in outcomes] == [None] * 10
    assert [o.value.split("@")[0] for o in outcomes] == [str(i) for i in range(10)]


@pytest.mark.django_db(transaction=True)
def test_prepare_is_not_run_again_when_the_chunk_is_redone():
    """A failure in func makes the chunk redo with savepoints; its items are not prepared twice."""
    calls: list[int] = []

    def prepare(i: int) -> int:
        calls.append(i)
        return i

    report = bulkpool.run(
        jobs.fail_multiples_of_7, range(1, 15), prepare=prepare, backend="thread", workers=1
    )
    assert (report.ok, report.failed) == (12, 2)
    assert sorted(calls) == list(range(1, 15))
    assert Marker.objects.count() == 12


@pytest.mark.django_db
def test_prepare_is_refused_with_a_queryset():
    """QuerySet rows load inside the chunk's transaction, so a prepare outside it is refused, saying why."""
    with pytest.raises(ConfigurationError, match="prepare= cannot be used with a QuerySet"):
        bulkpool.run(jobs.identity, Marker.objects.all(), prepare=jobs.identity, backend="serial")


@pytest.mark.django_db
def test_prepare_must_be_callable():
    """A prepare that is not callable is refused before item one."""
    with pytest.raises(ConfigurationError, match="prepare must be a callable"):
        bulkpool.run(jobs.identity, range(3), prepare="tests.jobs.identity", backend="serial")


@pytest.mark.django_db(transaction=True)
def test_create_rows_can_be_prepared():
    """create(prepare=...) turns each item into the row the object is made from."""
    report = bulkpool.create(
        Marker, range(5), prepare=jobs.marker_row, backend="thread", workers=2, chunk_size=2
    )
    assert report.ok == 5
    assert sorted(Marker.objects.values_list("value", flat=True)) == [0, 10, 20, 30, 40]
    assert connection.in_atomic_block is False


@pytest.mark.django_db(transaction=True)
def test_a_journaled_run_with_prepare_resumes_on_its_raw_items():
    """The journal records the items as given, not what prepare made of them: a rerun skips them all."""
    options: dict[str, Any] = {
        "prepare": jobs.marker_row,
        "backend": "thread",
        "workers": 2,
        "chunk_size": 3,
        "run_id": "p",
    }
    first = bulkpool.create(Marker, range(7), **options)
    second = bulkpool.create(Marker, range(7), **options)
    assert (first.ok, second.skipped) == (7, 7)
    assert Marker.objects.count() == 7
