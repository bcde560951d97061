"""What the celery backend sends, without a broker: references to functions, and JSON items."""

from __future__ import annotations

import datetime
import decimal
import functools
import json

import pytest

from bulkpool import ConfigurationError
from bulkpool.executors.wire import encode_chunk, job_of, rebuild, reference, task_of
from bulkpool.protocol import JSON, Chunk, ChunkResult, Timings
from bulkpool.rows import CreateRow
from tests.celery_jobs import marker


def _closure():
    def inner(i):
        return i

    return inner


def test_a_partial_of_an_importable_function_travels_as_path_and_arguments():
    """functools.partial(marker, 0.5) comes back as the same function with the same arguments."""
    back = rebuild(JSON.decode(JSON.encode(reference(functools.partial(marker, 0.5), "func"))))
    assert isinstance(back, functools.partial)
    assert (back.func, back.args) == (marker, (0.5,))


def test_bulkpools_operations_travel_as_class_path_and_fields():
    """create()'s per-row callable is rebuilt from its class path and its fields."""
    row = CreateRow("testapp.Marker", validate=True, database="default")
    assert rebuild(JSON.decode(JSON.encode(reference(row, "func")))) == row


@pytest.mark.parametrize(
    ("func", "message"),
    [
        (lambda i: i, "is a lambda or a closure"),
        (functools.partial(lambda i: i), "is a lambda or a closure"),
        (_closure(), "is a lambda or a closure"),
        (CreateRow("testapp.Marker", False, "default").__call__, "is not what"),  # a bound method
    ],
)
def test_what_a_worker_cannot_import_is_refused_saying_what_to_do(func, message):
    """Lambdas, closures and names that do not import back are refused, with the fix."""
    with pytest.raises(ConfigurationError, match=message):
        reference(func, "func")


def test_an_item_json_cannot_carry_is_named():
    """The refusal names the item's input index and shows it."""
    chunk = Chunk(0, 10, [1, {"a": datetime.date(2026, 1, 2)}, decimal.Decimal("1.5"), object()])
    with pytest.raises(ConfigurationError, match=r"Item 13 \(<object object"):
        encode_chunk(chunk)


def test_dates_and_decimals_come_back_as_themselves():
    """Items with dates, decimals and UUIDs cross as tagged JSON."""
    chunk = Chunk(0, 0, [{"a": datetime.date(2026, 1, 2)}, decimal.Decimal("1.5")])
    assert JSON.decode(encode_chunk(chunk)) == chunk


def test_the_job_carries_func_setup_and_prepare_by_reference():
    """A worker rebuilds the task with the same func, setup and prepare it was given."""
    from bulkpool.protocol import Task

    task = Task(
        func=marker,
        setup=functools.partial(marker, 1),
        prepare=functools.partial(marker, 2),
        atomic="chunk",
        database="default",
        retries=3,
        keep_values=True,
        own_connections=True,
    )
    back = task_of(JSON.decode(JSON.encode(job_of(task, heartbeat=5.0))))
    assert back.func is marker
    assert isinstance(back.setup, functools.partial) and back.setup.args == (1,)
    assert isinstance(back.prepare, functools.partial) and back.prepare.args == (2,)


def test_a_retried_piece_stays_one_across_the_wire():
    """retry_failed's pieces keep their mark, so a worker replaces their recorded failures."""
    chunk = Chunk(3, 40, [{"key": "k40"}], retry=True)
    assert JSON.decode(encode_chunk(chunk)) == chunk
    assert JSON.decode(encode_chunk(Chunk(3, 40, [1]))).retry is False


def test_a_results_timings_cross_whole_and_a_newer_workers_extra_timing_is_dropped():
    """A worker's timings come back as they were sent (``warming`` too); a field that a
    worker of a later version adds is left out, not a reason to lose the chunk's result."""
    timings = Timings(work=0.25, total=0.5, cpu=0.125, commits=2, warming=True)
    result = ChunkResult(7, [1, 2], timings=timings)
    assert JSON.decode(JSON.encode(result)) == result
    sent = json.loads(JSON.encode(result))
    sent["timings"]["measured_in_a_later_version"] = 1.5
    assert JSON.decode(json.dumps(sent)) == result
