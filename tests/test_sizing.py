"""workers="auto" and chunk_size="auto": the policy fed numbers, then real runs that use it."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from django.db import connection

import bulkpool
from bulkpool.models import RunChunk
from bulkpool.pooling import Pool
from bulkpool.protocol import Chunk, Timings
from bulkpool.sizing import (
    CEILING,
    FIRST_CHUNK,
    GROWTH,
    MEASURING_FIRST_CHUNK,
    STEADY_SAMPLE,
    WARM_CHUNK_SECONDS,
    ChunkSizer,
    Limits,
    Pace,
    _cgroup_cpus,
    choose_workers,
    cpu_quota,
    measuring_width,
    shared_out,
)
from bulkpool.work.timing import runnable_seconds
from tests import jobs
from tests.testapp.models import Marker

SERVER = Limits(cpus=2, free_connections=100, single_writer=False, start_seconds=0.1)
SQLITE = Limits(cpus=2, free_connections=None, single_writer=True, start_seconds=0.1)


def pace(
    per_item: float, items: int = 50, *, locked: float = 1.0, cpu: float = 1.0, runnable: float = 0.0
) -> Pace:
    """A pace of ``items`` measured at ``per_item`` seconds each; ``locked``, ``cpu`` and
    ``runnable`` are the shares of that time spent in the transaction, on the CPU, and
    waiting for a CPU."""
    measured = Pace()
    for n in (items, 1):
        seconds = per_item * n
        timings = Timings(
            work=seconds * locked, total=seconds, cpu=seconds * cpu, runnable=seconds * runnable
        )
        measured.add(n, timings)
    return measured


# -- chunk sizes -------------------------------------------------------------------------


def test_chunk_sizes_start_small_and_stop_at_the_ceiling():
    sizer = ChunkSizer()
    light = pace(0.00001)  # 10 microseconds an item: a chunk of 0.2 s would be 20,000
    sizes = [sizer.next(Pace())] + [sizer.next(light) for _ in range(3)]
    # Even a quarter of the target is 5,000 items at that pace: the ceiling at once.
    assert sizes == [FIRST_CHUNK, CEILING, CEILING, CEILING]
    for size in sizes:
        sizer.read(size)
    expected = f"chunks of {FIRST_CHUNK} to {CEILING:,} items, each about 0.2 s at the pace measured"
    assert sizer.summary() == f"chunk_size=auto: {expected}"


def test_chunk_sizes_grow_by_steps_past_a_quarter_of_the_target():
    """0.5 ms an item: a quarter of the target (100 items) at once, then GROWTH-fold (400,
    the target) -- never a chunk much longer than the pace measured says."""
    sizer = ChunkSizer()
    medium = pace(0.0005)
    sizes = [sizer.next(Pace())] + [sizer.next(medium) for _ in range(3)]
    assert sizes == [FIRST_CHUNK, 100, 400, 400]


def test_a_sample_of_fewer_items_grows_only_by_steps():
    """Until STEADY_SAMPLE items are measured, a chunk grows GROWTH-fold at most: one cheap
    item does not make a chunk of a thousand."""
    sizer = ChunkSizer(first=MEASURING_FIRST_CHUNK)
    sizer.next(Pace())
    one_item = Pace()
    one_item.add(1, Timings(work=0.00001, total=0.00001, cpu=0.00001))
    assert sizer.next(one_item) == MEASURING_FIRST_CHUNK * GROWTH
    assert STEADY_SAMPLE > 1


def test_heavy_items_get_chunks_of_about_the_target_time():
    sizer = ChunkSizer()
    sizer.next(Pace())
    assert sizer.next(pace(0.02)) == 10  # 20 ms an item: 10 items are 0.2 s
    assert sizer.next(pace(1.0)) == 1  # never fewer than one


def test_with_a_pool_the_rest_of_a_known_input_is_shared_out():
    sizer = ChunkSizer()
    sizer.next(Pace())
    assert sizer.next(pace(0.0005), left=400, workers=2) == 50  # 400 items / (2 workers * 4 chunks)
    assert sizer.next(pace(0.0005), left=200, workers=2) == 40  # 25 each, but 20 ms is 40 items


def test_the_end_of_an_input_of_unknown_length_is_held_to_the_same_floor():
    """The chunk a generator ends in is cut into pieces for every worker (``Pool.share_out``):
    into 8 of 2 items for 2 workers before anything is measured, but sent whole once the
    pace says 16 items take 16 ms, under the 20 ms floor."""
    from bulkpool.executors import ThreadExecutor
    from bulkpool.options import Options
    from bulkpool.pooling import Pool

    pool = Pool(ThreadExecutor(workers=2), Options(), length=None, note=lambda _: None)
    end = Chunk(0, 0, list(range(16)))
    assert [len(piece) for piece in pool.share_out(end)] == [2] * 8
    pool.pace.add(50, Timings(work=0.05, total=0.05, cpu=0.05))  # 1 ms an item
    assert [len(piece) for piece in pool.share_out(end)] == [16]


def test_the_pool_is_chosen_without_each_workers_first_chunk_unless_it_was_long():
    """A worker's first chunk (``warming``: it opened a connection) is left out of the pace
    the pool is chosen from -- each worker's, not only the pool's first -- unless it took
    WARM_CHUNK_SECONDS; every chunk still sizes the next ones."""
    from bulkpool.executors import ThreadExecutor
    from bulkpool.options import Options

    pool = Pool(ThreadExecutor(), Options(), length=1_000, note=lambda _: None)
    slow_connect = Timings(work=0.001, total=0.15, cpu=0.002, warming=True)
    pool.measured(Chunk(0, 0, [0]), slow_connect)  # the first worker's first: left out
    pool.measured(Chunk(1, 1, [1]), slow_connect)  # the second worker's first: left out too
    pool.measured(Chunk(2, 2, [2]), Timings(work=0.3, total=WARM_CHUNK_SECONDS + 0.1, cpu=0.3, warming=True))
    pool.measured(Chunk(3, 3, list(range(3, 7))), Timings(work=0.004, total=0.004, cpu=0.004))
    deciding = pool._deciding  # what choose_workers is fed
    assert (deciding.chunks, deciding.items) == (2, 5)
    assert deciding.seconds == pytest.approx(WARM_CHUNK_SECONDS + 0.1 + 0.004)
    assert (pool.pace.chunks, pool.pace.items) == (4, 7)


def test_light_items_are_not_shared_out_in_chunks_shorter_than_a_tenth_of_the_target():
    """Each chunk costs a COMMIT and a round trip: the last items of a run are not cut into
    single items, but into chunks of 20 ms at least (a tenth of the 0.2 s target)."""
    assert shared_out(200, workers=2) == 25  # no pace yet: 200 items / (2 workers * 4 chunks)
    assert shared_out(200, workers=2, per_item=0.001) == 25  # 20 ms: 20 items, fewer than 25
    assert shared_out(7, workers=2) == 1
    assert shared_out(7, workers=2, per_item=0.001) == 20  # the 7 go out as one chunk
    assert shared_out(7, workers=2, per_item=0.03) == 1  # 30 ms items: one each
    assert shared_out(7, workers=2, per_item=0.001, target=0.5) == 50  # a broker's target: 50 ms


def test_a_fixed_chunk_size_is_kept():
    sizer = ChunkSizer(fixed=7)
    assert [sizer.next(pace(0.001)) for _ in range(3)] == [7, 7, 7]
    assert sizer.ceiling == 7 and sizer.summary() == ""


# -- the pool ----------------------------------------------------------------------------


def test_nothing_is_chosen_before_the_first_chunks_are_measured():
    one_chunk = Pace()
    one_chunk.add(10, Timings(work=0.001, total=0.001, cpu=0.001))
    assert choose_workers(one_chunk, left=10_000, limits=SERVER) is None
    few_items = Pace()  # two chunks, but of 4 and 16 items: too few to go by
    few_items.add(4, Timings(work=0.004, total=0.004, cpu=0.004))
    few_items.add(16, Timings(work=0.016, total=0.016, cpu=0.016))
    assert choose_workers(few_items, left=10_000, limits=SERVER) is None


def test_a_tenth_of_a_second_of_heavy_items_is_enough_to_choose():
    """Items of 6 ms: the chunks of 4 and 16 items measure them well enough; waiting for 50
    would keep the pool's other workers idle for another 0.2 s."""
    heavy = Pace()
    heavy.add(4, Timings(work=0.024, total=0.024, cpu=0.024))
    heavy.add(16, Timings(work=0.096, total=0.096, cpu=0.096))
    choice = choose_workers(heavy, left=None, limits=SERVER)
    assert choice is not None and choice.workers == 2, choice


def test_a_measuring_pool_starts_with_chunks_of_one_item_and_ramps_up():
    """On a pool's first worker, heavy items show in the first chunk, not after ten of them."""
    sizer = ChunkSizer(first=MEASURING_FIRST_CHUNK)
    light = pace(0.00001)
    assert [sizer.next(Pace())] + [sizer.next(light) for _ in range(2)] == [1, CEILING, CEILING]


def test_a_small_run_stays_serial():
    choice = choose_workers(pace(0.0003), left=1_000, limits=SERVER)  # 0.3 s of work left
    assert choice is not None and choice.workers == 1
    assert "too little for starting more workers to pay" in choice.why


def test_a_pool_measures_on_two_workers_where_a_second_is_cheap_and_the_database_has_writers_to_spare():
    assert measuring_width(SERVER) == 2
    assert measuring_width(SQLITE) == 1  # its one writer would keep the second waiting
    assert measuring_width(replace(SERVER, cpus=1)) == 1
    assert measuring_width(replace(SERVER, start_seconds=1.0)) == 1  # spawn: a fresh interpreter
    assert measuring_width(replace(SERVER, shared_interpreter=True)) == 1  # threads: one GIL
    assert measuring_width(replace(SERVER, free_connections=6)) == 1  # 5 slots left for others


def test_a_long_run_on_a_server_gets_a_worker_per_cpu():
    choice = choose_workers(pace(0.0003), left=100_000, limits=SERVER)
    assert choice is not None and choice.workers == 2
    assert "2 CPUs" in choice.why


def test_items_that_mostly_wait_get_more_workers_than_cpus():
    choice = choose_workers(pace(0.005, cpu=0.1), left=10_000, limits=SERVER)  # 90% waiting
    assert choice is not None and choice.workers == 8  # capped at 4 per CPU
    assert "90% waiting" in choice.why


def test_time_spent_waiting_for_a_cpu_is_not_the_items_waiting():
    """Half the time off the CPU, all of it waiting for a CPU (two workers measuring on two
    CPUs beside the caller): CPU-bound items, a worker per CPU, not more."""
    choice = choose_workers(pace(0.0003, cpu=0.5, runnable=0.5), left=100_000, limits=SERVER)
    assert choice is not None and choice.workers == 2 and "waiting" not in choice.why, choice


@pytest.mark.skipif(not Path("/proc/thread-self/schedstat").exists(), reason="Linux's schedstat only")
def test_a_thread_that_shares_too_few_cpus_is_measured_waiting_for_one():
    """More busy processes than CPUs: a busy thread here waits for a CPU part of the time."""
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range((os.cpu_count() or 1) + 2)]
    try:
        time.sleep(0.2)  # the spinners are running
        before, end = runnable_seconds(), time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        waited = runnable_seconds() - before
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert 0.05 < waited < 1.0, waited


def test_free_connection_slots_bound_the_pool():
    few = Limits(cpus=8, free_connections=8, single_writer=False, start_seconds=0.1)
    choice = choose_workers(pace(0.001), left=100_000, limits=few)
    assert choice is not None and choice.workers == 3  # 8 free, 5 left for everyone else
    assert "8 free database connections" in choice.why


def test_sqlite_with_all_the_work_in_the_transaction_stays_serial():
    choice = choose_workers(pace(0.002), left=100_000, limits=SQLITE)
    assert choice is not None and choice.workers == 1
    assert "SQLite writes one transaction at a time" in choice.why and "prepare=" in choice.why


def test_sqlite_with_work_outside_the_transaction_gets_a_pool():
    choice = choose_workers(pace(0.002, locked=0.2), left=100_000, limits=SQLITE)
    assert choice is not None and choice.workers == 2


def test_an_input_of_unknown_length_grows_the_pool_once_the_work_pays_for_its_workers():
    """No length to go by: the pool grows once the work measured has cost more than its new
    workers cost to start (0.1 s here), not after a second of work on one worker."""
    assert choose_workers(pace(0.0003), left=None, limits=SERVER) is None  # 15 ms measured so far
    heavy = pace(0.02, items=10)  # two chunks, 0.22 s: more than the workers cost
    choice = choose_workers(heavy, left=None, limits=SERVER)
    assert choice is not None and choice.workers == 2 and "unknown length" in choice.why


def test_cgroup_quota_bounds_the_cpus(tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert _cgroup_cpus(quota) == 2
    quota.write_text("max 100000\n")
    assert _cgroup_cpus(quota) is None
    assert 1 <= cpu_quota() <= len(os.sched_getaffinity(0))


# -- real runs ---------------------------------------------------------------------------

pytestmark_db = pytest.mark.django_db(transaction=True)


def writers() -> Counter[int]:
    """Rows written per process id (write_marker_pid)."""
    return Counter(Marker.objects.values_list("value", flat=True))


def assert_each_once(count: int) -> None:
    keys = Counter(Marker.objects.values_list("key", flat=True))
    assert len(keys) == count and set(keys.values()) == {1}


def measuring_workers(backend: str = "process") -> int:
    """The workers a pool measures on here: one on SQLite or in threads, two processes on a
    server with 2 CPUs."""
    return 1 if connection.vendor == "sqlite" or backend == "thread" else min(2, cpu_quota())


@pytestmark_db
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_small_light_run_stays_on_the_workers_that_measured_it_and_says_why(backend, caplog, measured):
    """No option given: a light run of 100 items runs on the workers that measured it (one
    on SQLite, two on a server; processes of the pool, not the caller, on the process
    backend), in growing chunks. (Small enough that even on a loaded machine its items
    take well under the second that would pay for more workers: with 200, a COMMIT that
    stalled on MariaDB's fsync while the pool measured once made it choose four.)

    A chunk that stalls for longer (a COMMIT, a machine busy elsewhere) still makes these
    items look heavy, and the pool then rightly grows: that alone is accepted, where a chunk
    other than a worker's first (which the choice leaves out) took over 10 ms per item."""
    items = 100
    with caplog.at_level(logging.INFO, logger="bulkpool"):
        report = bulkpool.run(jobs.write_marker_pid, range(items), backend=backend, run_id="small")
    assert report.ok == items
    assert_each_once(items)
    workers = measuring_workers(backend)
    if grew_for_a_stall(report.notes, workers, measured):
        return
    if backend == "process":
        assert len(writers()) == workers and os.getpid() not in writers(), report.notes
    sizing = [note for note in report.notes if note.startswith("Sizing: ")]
    # The smallest chunk may be the last (what is left of the input): sizes are checked below.
    chosen = f"Sizing: workers={workers}: "
    assert sizing[0].startswith(chosen) and "chunk_size=auto: chunks of " in sizing[1]
    assert chosen in str(report) and chosen in caplog.text
    sizes = list(
        RunChunk.objects.filter(run__run_id="small").order_by("start").values_list("size", flat=True)
    )
    # The first chunk pays for the new worker's database connection, so the second may
    # not grow at all on a loaded machine (one item measured: GROWTH-fold at most).
    first = MEASURING_FIRST_CHUNK
    assert sizes[0] == first and first <= sizes[1] <= first * GROWTH
    assert max(sizes) > first * GROWTH and max(sizes) <= CEILING and sum(sizes) == items


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Chunk, Timings]]:
    """Each chunk and its timings, as the pool is told of them (``Pool.measured``)."""
    seen: list[tuple[Chunk, Timings]] = []
    told = Pool.measured

    def spy(pool: Pool, chunk: Chunk, timings: Timings) -> None:
        seen.append((chunk, timings))
        told(pool, chunk, timings)

    monkeypatch.setattr(Pool, "measured", spy)
    return seen


def grew_for_a_stall(notes: list[str], measuring: int, measured: list[tuple[Chunk, Timings]]) -> bool:
    """Whether the pool grew past the workers that measured a light run because a chunk the
    choice counts (not a worker's first) stalled: over 10 ms per item."""
    chosen = re.search(r"Sizing: workers=(\d+): ", "\n".join(notes))
    assert chosen is not None, notes
    if int(chosen[1]) <= measuring:
        return False
    paces = [timings.total / len(chunk) for chunk, timings in measured if not timings.warming]
    assert max(paces, default=0) > 0.010, f"a light run grew its pool: {notes}, {paces}"
    return True


@pytestmark_db
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_each_workers_first_chunk_is_told_apart_from_its_others(backend, measured):
    """The pool is chosen without each worker's first chunk, which also opened its
    connection: the worker marks it ``warming``, once per process or thread that ran
    chunks (each writes its name beside every item it runs)."""
    report = bulkpool.run(
        jobs.write_marker_with_state,
        range(40),
        setup=jobs.setup_records_worker,
        backend=backend,
        workers=2,
        chunk_size=4,
    )
    assert report.ok == 40 and len(measured) == 10
    warming = sorted(chunk.start for chunk, timings in measured if timings.warming)
    items_by_worker: dict[str, list[int]] = {}
    for key, item in Marker.objects.filter(key__startswith="state:").values_list("key", "value"):
        items_by_worker.setdefault(key, []).append(item)
    assert warming == sorted(min(items) for items in items_by_worker.values()), items_by_worker
    if backend == "process":
        assert len(items_by_worker) == 2  # each process is sent a chunk as it starts


@pytestmark_db
def test_a_run_that_waits_on_a_slow_service_grows_the_pool_after_measuring():
    """3 ms of waiting per item in prepare: after its first chunks on one worker, the run
    grows to more process workers than the CPUs, and every item is written once."""
    prepare = functools.partial(jobs.wait_then_pass, 0.003)
    report = bulkpool.run(jobs.write_marker_pid, range(1_500), backend="process", prepare=prepare)
    assert report.ok == 1_500
    assert_each_once(1_500)
    by_process = writers()
    assert os.getpid() not in by_process  # measured in the pool's first worker, not the caller
    assert len(by_process) > 2  # then more workers than this machine's CPUs (the items wait)
    note = next(note for note in report.notes if note.startswith("Sizing: workers="))
    assert not note.startswith("Sizing: workers=1:")
    assert ("waiting" in note) or ("SQLite's one writer" in note)


@pytestmark_db
def test_a_pool_that_cannot_grow_after_measuring_goes_on_with_the_workers_that_measured(tmp_path, caplog):
    """If the workers the pool grows by fail to start once its first workers measured the
    first chunks, the run goes on with those, says so, and loses nothing."""
    workers = measuring_workers()
    prepare = functools.partial(jobs.wait_then_pass_with_state, 0.003)
    setup = functools.partial(jobs.setup_works_in_the_first, workers, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="bulkpool"):
        report = bulkpool.run(
            jobs.write_marker_pid_with_state, range(1_200), backend="process", prepare=prepare, setup=setup
        )
    assert report.ok == 1_200
    assert_each_once(1_200)
    assert len(writers()) == workers and os.getpid() not in writers()
    assert "Could not start more process workers" in caplog.text
    chosen = f"Sizing: workers={workers}: the process workers could not start"
    assert any(chosen in note for note in report.notes), report.notes


@pytestmark_db
@pytest.mark.skipif("connection.vendor != 'sqlite'", reason="only on SQLite")
def test_sqlite_light_work_stays_on_one_worker_whatever_its_length():
    """SQLite's one writer: 5,000 light items stay on one worker (more would only queue)."""
    report = bulkpool.run(jobs.write_marker_pid, range(5_000))
    assert report.ok == 5_000
    assert len(writers()) == 1 and os.getpid() not in writers(), report.notes
    assert any("SQLite writes one transaction at a time" in note for note in report.notes)


@pytestmark_db
@pytest.mark.skipif("connection.vendor == 'sqlite'", reason="only on PostgreSQL and MariaDB")
@pytest.mark.skipif("cpu_quota() < 2", reason="one CPU: a pool of CPU-bound workers would not pay")
def test_a_long_run_on_a_server_starts_a_worker_per_cpu():
    """On PostgreSQL and MariaDB, 1 ms of CPU per item over 3,000 items is worth a pool."""
    report = bulkpool.run(jobs.busy_then_write_marker_pid, range(3_000), backend="process")
    assert report.ok == 3_000
    assert_each_once(3_000)
    by_process = writers()
    assert os.getpid() not in by_process  # the first chunks were measured on the pool's first worker
    assert len(by_process) >= cpu_quota()
    note = next(note for note in report.notes if note.startswith("Sizing: workers="))
    assert f"{cpu_quota()} CPUs" in note


@pytestmark_db
def test_a_serial_run_with_a_known_length_is_not_shared_out_among_cpus():
    """Serial (and the pool's first worker while it measures) is one worker: its chunks are
    not cut small to share a known input out among workers that do not exist."""
    bulkpool.run(jobs.write_marker_pid, list(range(300)), backend="serial", run_id="one-worker")
    sizes = list(
        RunChunk.objects.filter(run__run_id="one-worker").order_by("start").values_list("size", flat=True)
    )
    assert sizes[0] == FIRST_CHUNK and sum(sizes) == 300
    assert sizes[1] > 290 // 8  # shared out among 2 CPUs it would be at most 37


@pytestmark_db
@pytest.mark.parametrize("items", [list(range(7)), (i for i in range(7))], ids=["list", "generator"])
def test_the_end_of_an_input_is_shared_out_among_the_workers_whether_its_length_was_known_or_not(items):
    """A list's length shares its last items out among the workers from the start; a
    generator's end is known once a chunk read comes short, and that chunk is then shared
    out the same way (sent whole, its 7 items of 30 ms would run on one worker, the other
    idle)."""
    func = functools.partial(jobs.wait_then_write_marker_pid, 0.03)
    report = bulkpool.run(func, items, backend="process", workers=2, run_id="ends")
    assert report.ok == 7
    sizes = list(RunChunk.objects.filter(run__run_id="ends").order_by("start").values_list("size", flat=True))
    assert sizes == [1] * 7  # 7 items / (2 workers x 4 pieces each), rounded up


@pytestmark_db
def test_the_end_of_a_run_of_light_items_is_not_cut_into_single_items():
    """Light items: the pieces the end of a run is shared out in take a tenth of the
    target's time at least, not a COMMIT for each of the last few items (without that
    floor, the last 8 of these 300 items would go out one by one)."""
    report = bulkpool.run(
        jobs.write_marker_pid, list(range(300)), backend="process", workers=2, run_id="light"
    )
    assert report.ok == 300 and Marker.objects.count() == 300
    sizes = sizes_of("light")
    assert sum(sizes) == 300
    assert sizes.count(1) <= 1, sizes  # perhaps the last, a remainder


def sizes_of(run_id: str) -> list[int]:
    chunks = RunChunk.objects.filter(run__run_id=run_id).order_by("start")
    return list(chunks.values_list("size", flat=True))


@pytestmark_db
@pytest.mark.parametrize("count", [12, 10], ids=["two items after a full chunk", "at a full chunk's end"])
def test_a_generator_that_ends_just_after_a_full_chunk_has_that_chunk_shared_out_too(count, wal_on_sqlite):
    """The engine reads a chunk ahead: the full first chunk (10 items) is known to be the
    input's last but 2 (or its last) before it is sent, so it is shared out as well -- sent
    whole, it would keep one worker busy while the other ran 2 items and waited. Items of
    30 ms, so that no piece is held to a tenth of the target. (SQLite in WAL mode: in
    rollback-journal mode the engine does not read ahead, see below.)"""
    func = functools.partial(jobs.wait_then_write_marker_pid, 0.03)
    report = bulkpool.run(func, (i for i in range(count)), backend="process", workers=2, run_id="ahead")
    assert report.ok == count
    assert sizes_of("ahead") == [2, 2, 2, 2, 2] + [1] * (count - 10)  # 10 items / 8 pieces, rounded up


def numbers_then_broken(count: int, pulled: list[int]):
    for i in range(count):
        pulled.append(i)
        yield i
    raise ValueError("the input broke")


@pytestmark_db
def test_an_input_that_breaks_at_a_chunk_read_ahead_still_runs_the_chunk_before(wal_on_sqlite):
    """The error reading the chunk ahead is raised at the next read, after the chunk before
    it was sent: every item the input gave runs, then the run stops."""
    pulled: list[int] = []
    with pytest.raises(bulkpool.InputFailed) as failed:
        bulkpool.run(jobs.write_marker_pid, numbers_then_broken(20, pulled), backend="process", workers=2)
    report = failed.value.report
    assert (report.total, report.ok, report.not_run) == (20, 20, 0)
    assert sorted(Marker.objects.values_list("key", flat=True), key=int) == [str(i) for i in range(20)]


@pytestmark_db
def test_a_chunk_read_ahead_when_the_run_stops_is_counted_as_read_and_not_run(wal_on_sqlite):
    """Failures stop the run early; the chunk it had read ahead was taken from the input,
    so the report counts it, among the items not run."""
    pulled: list[int] = []
    with pytest.raises(bulkpool.TooManyFailures) as stopped:
        bulkpool.run(
            jobs.fail_always, numbers_then_broken(5000, pulled), backend="process", workers=2, max_failures=50
        )
    report = stopped.value.report
    assert report.stopped_early and report.ok == 0
    assert report.total == len(pulled) < 5000
    assert report.not_run == len(pulled) - report.failed > 0


def interrupted_at(index: int):
    yield from range(index)
    raise KeyboardInterrupt  # Ctrl-C while the input is read: the run breaks off there


@pytestmark_db
def test_ctrl_c_while_a_chunk_is_read_ahead_counts_the_chunk_read_before_it(wal_on_sqlite):
    """Reading the chunk after the first (items 10..) is where Ctrl-C lands: the first chunk
    was read, so the report counts it, among the items not run."""
    with pytest.raises(bulkpool.RunInterrupted) as interrupted:
        bulkpool.run(jobs.identity, interrupted_at(15), backend="thread", workers=2)
    report = interrupted.value.report
    assert (report.total, report.done, report.not_run) == (10, 0, 10), str(report)


@pytestmark_db
def test_a_resume_refused_with_a_chunk_read_ahead_counts_and_rejects_as_without_it(tmp_path, wal_on_sqlite):
    """The first chunk of a resume differs from the journal's: refused there, the chunk read
    ahead is dropped with it -- nothing counted, and the rejects file holds the earlier
    attempt's failures, each once."""
    first = numbers_then_broken(45, [])
    with pytest.raises(bulkpool.InputFailed):
        bulkpool.run(jobs.fail_multiples_of_7, first, backend="process", workers=2, run_id="refused")
    changed = (1003 if i == 3 else i for i in numbers_then_broken(45, []))
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(bulkpool.ResumeRefused) as refused:
        bulkpool.run(
            jobs.fail_multiples_of_7,
            changed,
            backend="process",
            workers=2,
            run_id="refused",
            rejects=str(rejects),
        )
    assert (refused.value.report.total, refused.value.report.done) == (0, 0)
    indexes = [json.loads(line)["index"] for line in rejects.read_text().splitlines()]
    assert indexes == [0, 7, 14, 21, 28, 35, 42]


@pytestmark_db
def test_a_fixed_chunk_size_is_not_shared_out_at_the_end():
    bulkpool.run(
        jobs.write_marker_pid,
        (i for i in range(7)),
        backend="process",
        workers=2,
        chunk_size=10,
        run_id="fixed",
    )
    sizes = list(
        RunChunk.objects.filter(run__run_id="fixed").order_by("start").values_list("size", flat=True)
    )
    assert sizes == [7]


@pytestmark_db
def test_an_input_longer_than_its_length_said_is_sized_as_one_of_unknown_length():
    """A length that falls behind the input (a QuerySet that grew) is no longer trusted."""

    class Shrunk(list):
        def __len__(self) -> int:
            return 5

    report = bulkpool.run(
        jobs.write_marker_pid, Shrunk(range(300)), backend="process", workers=2, run_id="grown"
    )
    assert report.ok == 300
    sizes = list(
        RunChunk.objects.filter(run__run_id="grown").order_by("start").values_list("size", flat=True)
    )
    # Shared out while the length held (chunks of 1), then sized from the pace again.
    assert sum(sizes) == 300 and max(sizes) > 4 and len(sizes) < 100  # not 300 chunks of 1


@pytestmark_db
def test_an_item_that_kills_its_process_fails_alone_under_the_default_options():
    """workers="auto" measures in a pool worker, not the caller: an item that kills its
    process (SIGKILL) fails alone as WorkerDied, the caller gets its report, and a resume
    with the run_id runs past it."""
    die_at_5 = functools.partial(jobs.die_always_at, 5)
    report = bulkpool.run(die_at_5, range(50), run_id="killer")
    assert (report.ok, report.failed) == (49, 1)
    (failure,) = report.failures
    assert failure.index == 5 and failure.exc_type == "bulkpool.WorkerDied"
    assert Counter(Marker.objects.values_list("key", flat=True)) == Counter(
        str(i) for i in range(50) if i != 5
    )
    again = bulkpool.run(die_at_5, range(50), run_id="killer")  # would die at item 5, were it run
    assert (again.skipped, again.failed, again.failed_before, again.not_run) == (49, 1, 1, 0)


@pytestmark_db
def test_a_heavy_input_of_unknown_length_gets_its_pool_from_the_first_chunks():
    """A generator of items that wait 20 ms each: the pool grows once the first chunk is
    measured, not after a second of work on one worker (which the second chunk, items 10
    to 49, would still be part of)."""
    prepare = functools.partial(jobs.wait_then_pass, 0.02)
    report = bulkpool.run(jobs.write_marker_pid, (i for i in range(200)), backend="process", prepare=prepare)
    assert report.ok == 200
    assert_each_once(200)
    written_by = dict(Marker.objects.values_list("key", "value"))
    assert os.getpid() not in written_by.values()
    assert len({written_by[str(i)] for i in range(10, 50)}) > 1  # already shared among workers
    note = next(note for note in report.notes if note.startswith("Sizing: workers="))
    assert "input of unknown length" in note and not note.startswith("Sizing: workers=1:")
