"""The fence: a chunk of an attempt that is over writes nothing (a late broker delivery)."""

from __future__ import annotations

import functools
from collections import Counter

import pytest

import bulkpool
from bulkpool.journal import JournalRef
from bulkpool.models import Run
from bulkpool.protocol import Chunk, Task
from bulkpool.work import Worker
from tests import jobs
from tests.testapp.models import Marker

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = Chunk(0, 0, [1, 2, 3, 4, 5])


def _worker(run: Run, attempt: int, func=jobs.write_marker) -> Worker:
    task = Task(
        func=func,
        setup=None,
        atomic="chunk",
        database="default",
        retries=0,
        keep_values=False,
        own_connections=False,
        journal=JournalRef(run.pk, max_size=5, attempt=attempt),
    )
    return Worker(task)


def _run(status: str, attempts: int) -> Run:
    return Run.objects.create(
        run_id="fenced", func="tests.jobs.write_marker", chunk_size=5, status=status, attempts=attempts
    )


def _written() -> Counter[str]:
    return Counter(Marker.objects.values_list("key", flat=True))


@pytest.mark.parametrize("status", ["interrupted", "stopped", "finished"])
def test_a_chunk_of_an_ended_attempt_writes_nothing(status):
    """Its attempt was closed: every item fails saying so, and no row is written."""
    result = _worker(_run(status, 1), attempt=1).run(CHUNK)
    assert _written() == {}
    assert sorted(result.errors) == [0, 1, 2, 3, 4]
    assert "attempt 1 of the run, which is over" in result.errors[0].message


def test_a_chunk_of_an_earlier_attempt_writes_nothing_while_a_later_one_runs():
    """A resume began attempt 2: attempt 1's late delivery is refused; attempt 2's runs."""
    run = _run("running", 2)
    late = _worker(run, attempt=1).run(CHUNK)
    assert _written() == {} and len(late.errors) == 5
    current = _worker(run, attempt=2).run(CHUNK)
    assert not current.errors and set(_written().values()) == {1} and len(_written()) == 5


def test_a_chunk_recorded_before_its_attempt_ended_is_still_skipped():
    """The fence refuses only what is not recorded: a chunk that committed stays done, its
    outcome read back from the journal, nothing written again."""
    run = _run("running", 1)
    _worker(run, attempt=1).run(CHUNK)
    Run.objects.filter(pk=run.pk).update(status="interrupted")
    again = _worker(run, attempt=1).run(CHUNK)
    assert again.errors == {} and not again.skipped
    assert len(_written()) == 5


def end_the_attempt_then_write(run_pk: int, i: int) -> int:
    """Close the chunk's attempt from inside it, after the journal's first look: the lock's check."""
    Run.objects.filter(pk=run_pk).update(status="interrupted")
    return jobs.write_marker(i)


def test_an_attempt_closed_while_the_chunk_runs_fences_it_at_commit():
    """The Run row is read again under its lock before COMMIT: the chunk rolls back."""
    run = _run("running", 1)
    result = _worker(run, attempt=1, func=functools.partial(end_the_attempt_then_write, run.pk)).run(CHUNK)
    assert _written() == {}
    assert len(result.errors) == 5 and "which is over" in result.errors[0].message


def test_a_ref_without_an_attempt_is_not_fenced():
    """JournalRef(attempt=0), as from code that predates the fence: no check."""
    result = _worker(_run("interrupted", 1), attempt=0).run(CHUNK)
    assert not result.errors and len(_written()) == 5


def test_a_restart_goes_on_counting_attempts_so_the_old_attempts_chunks_stay_fenced():
    """restart=True forgets the records, not the attempts: a late chunk of attempt 1 is refused
    once the restarted run is attempt 2 (it could carry the old input)."""
    bulkpool.run(jobs.write_marker, range(5), backend="serial", run_id="fenced")
    bulkpool.run(jobs.write_marker, range(5, 10), backend="serial", run_id="fenced", restart=True)
    run = Run.objects.get(run_id="fenced")
    assert run.attempts == 2
    Run.objects.filter(pk=run.pk).update(status="running")  # as if attempt 2 still ran
    late = _worker(run, attempt=1).run(Chunk(0, 20, [20, 21]))
    assert "which is over" in late.errors[0].message
    assert "20" not in _written()
