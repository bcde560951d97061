"""Executors on their own: crashes outside any item, dead threads, big messages, their flags."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import pickle
import time
from pathlib import Path

import psutil
import pytest

import bulkpool
from bulkpool import ProcessExecutor
from bulkpool.executors import EXECUTORS, Executor, SerialExecutor, ThreadExecutor
from bulkpool.executors.base import CommitWatch
from bulkpool.protocol import Chunk, ChunkDone, ChunkLost, Event, Task
from bulkpool.work import Worker
from tests import jobs

START_METHODS = ["fork", "forkserver", "spawn"]
CRASHING_CHUNK = 1


def make_task(**changes) -> Task:
    values = dict(
        func=jobs.identity,
        setup=None,
        atomic="chunk",
        database="default",
        retries=0,
        keep_values=True,
        own_connections=True,
    )
    return Task(**{**values, **changes})


def chunks(count: int, size: int = 3) -> list[Chunk]:
    return [Chunk(n, n * size, list(range(n * size, (n + 1) * size))) for n in range(count)]


def collect(executor: Executor, count: int, within: float = 60.0) -> dict[int, Event]:
    """The next ``count`` events, by chunk number (fails if they take longer than ``within``)."""
    found: dict[int, Event] = {}
    deadline = time.monotonic() + within
    while len(found) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} events within {within}s"
        found.update((event.chunk.number, event) for event in executor.events(0.5))
    return found


def run_chunks(executor: Executor, task: Task, *, workers: int, count: int) -> dict[int, Event]:
    """Start ``executor``, submit ``count`` chunks at once, and collect their events."""
    executor.start(task, workers)
    try:
        for chunk in chunks(count):
            executor.submit(chunk)
        return collect(executor, count)
    finally:
        executor.stop()


def make_executor(backend: str) -> Executor:
    """The executor named ``backend``; process workers are forked, so they inherit test patches."""
    if backend == "process":
        return ProcessExecutor(start_method="fork")
    return {"serial": SerialExecutor, "thread": ThreadExecutor}[backend]()


def crash_on_chunk_one(worker, original, chunk):
    """Worker.run, except that chunk 1 raises SystemExit outside any item."""
    if chunk.number == CRASHING_CHUNK:
        raise SystemExit("the worker bailed out")
    return original(worker, chunk)


@pytest.fixture
def crashing_worker(monkeypatch):
    """Worker.run raises SystemExit on chunk 1 (forked workers inherit the patch)."""
    monkeypatch.setattr(Worker, "run", functools.partialmethod(crash_on_chunk_one, Worker.run))


def test_local_executors_declare_delivery_and_loss_detection():
    """Serial, thread and process give each chunk to one worker and notice lost chunks themselves."""
    local: list[type[Executor]] = [SerialExecutor, ThreadExecutor, ProcessExecutor]
    for executor in local:
        assert (executor.delivery, executor.detects_loss) == ("exactly_once", True), executor
    assert (Executor.delivery, Executor.detects_loss) == ("at_least_once", False)
    assert set(EXECUTORS) == {"serial", "thread", "process", "celery", "tasks"}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_crash_outside_items_comes_back_lost_with_its_traceback(backend, crashing_worker):
    """A Worker that raises SystemExit outside any item: its chunk comes back lost, with the traceback."""
    found = run_chunks(make_executor(backend), make_task(), workers=1, count=3)
    lost = found[CRASHING_CHUNK]
    assert isinstance(lost, ChunkLost)
    assert "SystemExit: the worker bailed out" in lost.reason
    assert "crash_on_chunk_one" in lost.traceback
    assert lost.in_doubt is False
    # The worker goes on: the chunks before and after it ran.
    assert [found[n].result.values for n in (0, 2)] == [[0, 1, 2], [6, 7, 8]]  # type: ignore[union-attr]


def crash_after_commit_began(worker, chunk):
    """Worker.run that gets as far as its COMMIT, then raises (as an on_commit callback might)."""
    worker._before_commit()
    raise ZeroDivisionError("an on_commit callback failed")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_crash_once_commit_began_leaves_the_chunk_in_doubt(backend, monkeypatch):
    """A Worker that raises after its COMMIT began: the chunk comes back lost in doubt, never plainly lost."""
    monkeypatch.setattr(Worker, "run", crash_after_commit_began)
    executor = make_executor(backend)
    executor.start(make_task(), 1)
    try:
        executor.submit(chunks(1)[0])
        lost = collect(executor, 1)[0]
    finally:
        executor.stop()
    assert isinstance(lost, ChunkLost)
    assert lost.in_doubt is True
    assert "ZeroDivisionError: an on_commit callback failed" in lost.reason


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["thread", "process"])
def test_run_whose_worker_crashes_on_every_chunk_finishes(backend, monkeypatch):
    """Every chunk crashing its Worker ends the run with every item failed, instead of hanging."""
    monkeypatch.setattr(Worker, "run", lambda worker, chunk: (_ for _ in ()).throw(SystemExit(3)))
    executor = backend if backend == "thread" else ProcessExecutor(start_method="fork")
    report = bulkpool.run(jobs.identity, range(12), backend=executor, workers=2, chunk_size=4, retries=0)
    assert (report.ok, report.failed) == (0, 12)
    assert {f.exc_type for f in report.failures} == {"bulkpool.WorkerDied"}


class DyingThreadExecutor(ThreadExecutor):
    """A thread executor whose thread running chunk 1 dies outright, holding the chunk."""

    def _run(self, worker: Worker, chunk: Chunk, commit: CommitWatch) -> Event:
        if chunk.number == CRASHING_CHUNK:
            raise SystemExit  # past the executor's own guard: the thread ends, silently
        return super()._run(worker, chunk, commit)


@pytest.mark.django_db(transaction=True)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # it dies on purpose
def test_dead_thread_hands_its_chunk_back_and_is_replaced():
    """A thread that dies holding a chunk: the chunk comes back lost, and the next chunk sent runs."""
    executor = DyingThreadExecutor()
    executor.start(make_task(), 1)
    try:
        executor.submit(chunks(2)[1])
        lost = collect(executor, 1)[CRASHING_CHUNK]
        assert isinstance(lost, ChunkLost)
        assert "died" in lost.reason
        executor.submit(chunks(1)[0])
        done = collect(executor, 1)[0]
    finally:
        executor.stop()
    assert isinstance(done, ChunkDone)
    assert done.result.values == [0, 1, 2]


def unpicklable_result(worker, original, chunk):
    """Worker.run, except that chunk 1's result holds a lambda (pickle refuses it)."""
    result = original(worker, chunk)
    if chunk.number == CRASHING_CHUNK:
        result.values = [lambda: None]
    return result


@pytest.mark.django_db(transaction=True)
def test_result_that_cannot_be_sent_back_is_lost_in_doubt(monkeypatch):
    """A result that cannot be pickled: its chunk (committed) comes back lost in doubt; the worker goes on."""
    monkeypatch.setattr(Worker, "run", functools.partialmethod(unpicklable_result, Worker.run))
    found = run_chunks(ProcessExecutor(start_method="fork"), make_task(), workers=1, count=3)
    lost = found[CRASHING_CHUNK]
    assert isinstance(lost, ChunkLost)
    assert lost.in_doubt is True
    assert "could not send back the result" in lost.reason
    assert "pickle" in lost.traceback.lower()
    assert isinstance(found[2], ChunkDone)


def explode() -> None:
    raise ValueError("this item cannot be rebuilt here")


class Unshippable:
    """Pickles in the parent; unpickling it raises (as a class only the caller can import would)."""

    def __reduce__(self):
        return (explode, ())


@pytest.mark.django_db(transaction=True)
def test_chunk_the_worker_cannot_unpickle_is_lost_and_the_worker_goes_on():
    """A chunk that cannot be unpickled in the worker comes back lost, saying why; the next one runs."""
    executor = ProcessExecutor(start_method="fork")
    executor.start(make_task(), 1)
    try:
        executor.submit(Chunk(0, 0, [Unshippable()]))
        executor.submit(Chunk(1, 1, [1]))
        found = collect(executor, 2)
    finally:
        executor.stop()
    lost = found[0]
    assert isinstance(lost, ChunkLost)
    assert "could not read the chunk it was sent (ValueError: this item cannot be" in lost.reason
    assert lost.in_doubt is False
    assert isinstance(found[1], ChunkDone)


def wait_for_pid(flag: Path, within: float = 60.0) -> int:
    """The pid a worker wrote to ``flag`` (see ``jobs.hang_in_the_first_setup``)."""
    deadline = time.monotonic() + within
    while not (flag.exists() and flag.read_text()):
        assert time.monotonic() < deadline, f"no worker wrote {flag.name} within {within}s"
        time.sleep(0.02)
    return int(flag.read_text())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("start_method", "victim", "size"),
    [
        ("fork", "worker", 1),
        ("fork", "worker", 2),
        ("spawn", "worker", 1),
        ("forkserver", "worker", 1),
        ("forkserver", "forkserver", 1),
    ],
)
def test_a_worker_killed_while_it_starts_is_started_again(start_method, victim, size, tmp_path, caplog):
    """A worker SIGKILLed in its setup, before it is ready (or its forkserver, then): another
    starts in its place (once) and runs the chunks; the log says what happened."""
    flag = tmp_path / "first-setup"
    executor = ProcessExecutor(start_method=start_method)
    task = make_task(
        func=jobs.pid_with_state, setup=functools.partial(jobs.hang_in_the_first_setup, str(flag))
    )
    with concurrent.futures.ThreadPoolExecutor(1) as starting:
        started = starting.submit(executor.start, task, size)
        hanging = psutil.Process(wait_for_pid(flag))
        target = hanging if victim == "worker" else hanging.parent()
        assert target is not None
        target.kill()
        started.result(timeout=120)
    try:
        executor.submit(chunks(1)[0])
        done = collect(executor, 1)[0]
        workers = [handle.pid for handle in executor._handles]
    finally:
        executor.stop()
    assert isinstance(done, ChunkDone)
    assert len(set(workers)) == size
    (ran_on,) = set(done.result.values or [])  # the chunk ran on one worker: a new one, or the other
    assert ran_on in workers
    assert hanging.pid not in workers
    assert "exited before it was ready" in caplog.text
    assert caplog.text.count("Starting it again (start 2 of 3)") == 1


@pytest.mark.parametrize(
    ("start_method", "how", "starts", "ended"),
    [
        ("fork", "SIGKILL", 3, "killed by signal SIGKILL"),
        ("fork", "SIGSEGV", 1, "killed by signal SIGSEGV"),
        ("fork", "exit", 1, "exit code 3"),
        ("spawn", "exit", 1, "exit code 3"),
        ("forkserver", "exit", 3, "exited"),
    ],
)
def test_a_worker_that_cannot_start_stops_after_its_attempts(start_method, how, starts, ended, tmp_path):
    """A worker killed in every setup is started three times, then the error says so. One
    that crashed or exited with a code of its own would do it again: started once. (Under
    forkserver the parent cannot see how a worker ended: it tries three times.)"""
    log = tmp_path / "starts"
    executor = ProcessExecutor(start_method=start_method)
    task = make_task(setup=functools.partial(jobs.setup_that_ends_its_process, str(log), how))
    with pytest.raises(bulkpool.WorkerStartupError, match=f"before it was ready \\({ended}\\)") as raised:
        executor.start(task, 1)
    assert len(log.read_text().split()) == starts
    assert (f"It was started {starts} times." in str(raised.value)) == (starts > 1)
    assert type(raised.value) is bulkpool.WorkerStartupError
    assert executor._handles == []
    assert executor._zygote is None


def test_process_task_checks_values_only_when_they_are_kept():
    """Values sent back over the pipe are checked with pickle on the worker, before COMMIT."""
    for keep_values in (True, False):
        bootstrap = ProcessExecutor(start_method="spawn")._bootstrap_for(make_task(keep_values=keep_values))
        _, task_bytes = pickle.loads(bootstrap)
        check = pickle.loads(task_bytes).check_value
        if keep_values:
            with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
                check(lambda: None)
            assert check({"a": 1})
        else:
            assert check is None


WIDE = 20_000  # characters per row


def fail_wide_row(row: dict) -> None:
    """Fail with a message that carries the row, as validation errors often do: results are big too."""
    raise ValueError(f"row {row['n']} is not valid: {row['payload']}")


def wide_rows(count: int):
    return ({"n": n, "payload": "x" * WIDE} for n in range(count))


@pytest.mark.slow
# A deadlocked pipe also blocks the executor's stop(): the thread method ends the session
# loudly where the signal method would leave it hanging in the teardown.
@pytest.mark.timeout(180, method="thread")
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("start_method", START_METHODS)
def test_big_chunks_and_big_results_do_not_deadlock_the_pipes(start_method, tmp_path):
    """3,000 rows of 20 KB that all fail, in chunks of 1,000: big sends both ways at once finish."""
    parent = psutil.Process()
    before = parent.memory_info().rss
    rejects = tmp_path / "rejects.jsonl"
    report = bulkpool.run(
        fail_wide_row,
        wide_rows(3000),
        backend=ProcessExecutor(start_method=start_method),
        workers=2,
        chunk_size=1000,
        progress=False,
        early_stop=False,  # every row fails alike on purpose
        rejects=str(rejects),
    )
    grown_mb = (parent.memory_info().rss - before) / 2**20
    assert (report.ok, report.failed) == (0, 3000)
    assert (len(report.failures), report.failures_left_out) == (1000, 2000)
    with rejects.open(encoding="utf-8") as file:
        assert sorted(json.loads(line)["index"] for line in file) == list(range(3000))
    # The report keeps the first 1,000 failures (about 20 MB of rows and messages here); the
    # chunks themselves are let go once they are reported.
    assert grown_mb < 400, f"the parent grew by {grown_mb:.0f} MB"


@pytest.mark.django_db(transaction=True)
def test_a_process_worker_gets_a_chunk_only_when_it_has_none():
    """Three chunks on two workers, the first slow: the third goes to the worker that ran the
    second, once it is done, not into the slow worker's pipe behind the first."""
    task = make_task(func=jobs.worker_pid_of, atomic=False)  # no lock to wait for (SQLite)
    found = run_chunks(ProcessExecutor(start_method="fork"), task, workers=2, count=3)
    pids = {n: set(found[n].result.values or ()) for n in range(3)}  # type: ignore[union-attr]
    assert pids[2] == pids[1] != pids[0]


@pytest.mark.django_db(transaction=True)
def test_chunks_ready_for_workers_that_all_died_come_back_unstarted():
    """The one worker dies on its chunk: the chunks the parent held ready for it come back
    lost and unstarted (to be sent again), not left waiting for a worker that is gone."""
    task = make_task(func=functools.partial(jobs.die_always_at, 1))
    found = run_chunks(ProcessExecutor(start_method="fork"), task, workers=1, count=3)
    assert all(isinstance(found[n], ChunkLost) for n in range(3))
    assert found[0].started is True  # type: ignore[union-attr]
    assert [found[n].started for n in (1, 2)] == [False, False]  # type: ignore[union-attr]
    assert "no worker is left to run it" in found[1].reason  # type: ignore[union-attr]
