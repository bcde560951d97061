"""One ``Worker`` instance serves several threads at once (as a Celery thread pool uses it)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connections

from bulkpool.protocol import Chunk, ChunkResult, Task
from bulkpool.work import Worker
from tests.testapp.models import Marker

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 4
CHUNKS_PER_THREAD = 6
CHUNK_SIZE = 10


def write_then_fail_multiples_of_7(i: int) -> int:
    """Write a Marker, pause (so that the threads' chunks interleave), fail for multiples of 7."""
    Marker.objects.create(key=str(i), value=i)
    time.sleep(0.001)
    if i % 7 == 0:
        raise ValueError(f"{i} is a multiple of 7")
    return i


def run_from_threads(worker: Worker) -> dict[int, tuple[Chunk, ChunkResult]]:
    """Each of THREADS threads runs its own chunks through ``worker``, all at once."""
    results: dict[int, tuple[Chunk, ChunkResult]] = {}
    together = threading.Barrier(THREADS)

    def serve(thread: int) -> None:
        try:
            together.wait()
            for n in range(CHUNKS_PER_THREAD):
                number = thread * CHUNKS_PER_THREAD + n
                start = number * CHUNK_SIZE
                chunk = Chunk(number, start, list(range(start, start + CHUNK_SIZE)))
                results[number] = (chunk, worker.run(chunk))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("atomic", ["chunk", "item", False])
def test_one_worker_runs_chunks_from_four_threads_at_once(atomic):
    """Each chunk's result holds exactly that chunk's values and errors, whichever thread ran it."""
    task = Task(
        func=write_then_fail_multiples_of_7,
        setup=None,
        atomic=atomic,
        database="default",
        retries=3,
        keep_values=True,
        own_connections=True,
    )
    results = run_from_threads(Worker(task))
    assert len(results) == THREADS * CHUNKS_PER_THREAD
    for chunk, result in results.values():
        assert result.number == chunk.number
        assert result.values == [None if i % 7 == 0 else i for i in chunk.items]
        assert sorted(result.errors) == [offset for offset, i in enumerate(chunk.items) if i % 7 == 0]
        for offset, error in result.errors.items():
            assert error.message == f"{chunk.items[offset]} is a multiple of 7"
    everything = range(THREADS * CHUNKS_PER_THREAD * CHUNK_SIZE)
    # In autocommit, what a failing item wrote before its error stays written.
    kept = everything if atomic is False else [i for i in everything if i % 7]
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(kept)
