"""One ``Worker`` instance serves several threads at once (as a Celery thread pool uses it)."""

from __future__ import annotations

import threading
import time
from typing import Any

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


def task_of(atomic: Any) -> Task:
    return Task(
        func=write_then_fail_multiples_of_7,
        setup=None,
        atomic=atomic,
        database="default",
        retries=3,
        keep_values=True,
        own_connections=True,
    )


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
    results = run_from_threads(Worker(task_of(atomic)))
    assert len(results) == THREADS * CHUNKS_PER_THREAD
    for chunk, result in results.values():
        assert result.number == chunk.number
        assert result.values == [None if i % 7 == 0 else i for i in chunk.items]
        assert sorted(result.errors) == [offset for offset, i in enumerate(chunk.items) if i % 7 == 0]
        for offset, error in result.errors.items():
            assert error.message == f"{chunk.items[offset]} is a multiple of 7"
        # Each thread's first chunk opened its connection: its timings say so, and no other's.
        assert result.timings.warming == (chunk.number % CHUNKS_PER_THREAD == 0), chunk.number
    everything = range(THREADS * CHUNKS_PER_THREAD * CHUNK_SIZE)
    # In autocommit, what a failing item wrote before its error stays written.
    kept = everything if atomic is False else [i for i in everything if i % 7]
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(kept)


def test_the_first_chunk_after_a_worker_closed_its_connections_is_warming_again():
    """After ``close()`` (an executor does so when a chunk was lost), the next chunk opens a
    connection again: it is left out of the pace the pool is chosen from, as a first one is."""
    worker = Worker(task_of("chunk"))
    warming = []
    for number in range(4):
        if number == 2:
            worker.close()
        start = 100 + number * CHUNK_SIZE
        warming.append(
            worker.run(Chunk(number, start, list(range(start, start + CHUNK_SIZE)))).timings.warming
        )
    worker.close()
    assert warming == [True, False, True, False]
    written = [i for i in range(100, 100 + 4 * CHUNK_SIZE) if i % 7]
    assert sorted(Marker.objects.values_list("value", flat=True)) == written
