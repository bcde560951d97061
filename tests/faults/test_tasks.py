"""The tasks backend with real workers: django-tasks-db's ``db_worker`` on the test
database, and django-tasks-rq's ``rqworker`` on Redis.

Each test gets two workers (``python -m django db_worker --backend database --queue-name
<queue of its own>``, or ``rqworker --job-class django_tasks_rq.Job <the checkout's
queue>``: subprocesses, SIGTERMed or SIGKILLed at the end) writing to this session's test
database, on whichever database the session runs (SQLite, PostgreSQL, MariaDB). Every test
counts the Marker rows: each item written exactly once.

- ``BULKPOOL_TASKS_TESTS=0``: skipped (CI runs them on one leg only);
- django-tasks-db or django-tasks-rq not installed, or Redis not answering: skipped with
  the reason, except under ``CI=true``, where that is an error, since a CI run that skipped
  them would test nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

import bulkpool
from bulkpool import TasksExecutor
from bulkpool.models import ChunkDelivery, ChunkReply, Run
from tests.celery_jobs import marker_failing_every
from tests.faults import jobs
from tests.faults.support import (
    finish,
    kill_with_children,
    marker_counts,
    record,
    start_driver,
    tally,
    wait_for_rows,
)

REPO = Path(__file__).resolve().parent.parent.parent
OFF = os.environ.get("BULKPOOL_TASKS_TESTS", "").strip() == "0"
WAIT = 60.0  # seconds any wait here may take before the test fails, saying what it waited for

pytestmark = [
    pytest.mark.skipif(OFF, reason="BULKPOOL_TASKS_TESTS=0"),
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
    pytest.mark.timeout(120),  # a run waits for workers that never come: fail, do not hang
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _missing(message: str) -> None:
    if _in_ci():
        pytest.fail(f"{message} (CI=true: the leg that runs these tests installs and starts it)")
    pytest.skip(message)


@pytest.fixture
def _django_tasks_db() -> None:
    if importlib.util.find_spec("django_tasks_db") is None:
        _missing("django-tasks-db is not installed (pip install 'django-tasks-db[compat]' on Django 5.2)")


@pytest.fixture
def _django_tasks_rq() -> None:
    from django.conf import settings

    if "rq" not in settings.TASKS:
        _missing("django-tasks-rq is not installed (pip install django-tasks-rq, on Django 5.2 or before)")
    import django_rq

    queue = django_rq.get_queue(settings.RQ_QUEUE)
    try:
        queue.empty()  # what an earlier session left
    except Exception as error:
        _missing(f"Redis does not answer for the rq queue ({error})")


class DbWorker:
    """One worker process: django-tasks-db's ``db_worker`` on ``queue`` (or, with ``rq``,
    ``rqworker`` on the checkout's rq queue), writing to ``database``."""

    def __init__(self, queue: str, database: str, log: Path, *, rq: bool = False) -> None:
        env = {
            **os.environ,
            "BULKPOOL_FAULTS_DB_NAME": database,
            "DJANGO_SETTINGS_MODULE": "tests.settings_subprocess",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.id = uuid.uuid4().hex[:16]
        command = [sys.executable, "-m", "django"]
        if rq:
            command += ["rqworker", "--job-class", "django_tasks_rq.Job", "--name", self.id, queue]
        else:
            command += ["db_worker", "--backend", "database", "--queue-name", queue, "--interval", "0.05"]
            command += ["--no-startup-delay", "--no-reload", "--worker-id", self.id]
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # db_worker finishes the task in hand
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL it, and the work-horse it forked for a task (rq), as a machine that dies."""
        kill_with_children(self.process)

    def horse(self) -> bool:
        """Whether an rq worker has a work-horse running a task (for 0.1 s at least)."""
        import psutil

        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return False
        return any(time.time() - child.create_time() > 0.1 for child in children)


class Workers:
    def __init__(self, queue: str, database: str, logs: Path, *, rq: bool = False) -> None:
        self.queue, self.database, self.logs, self.rq = queue, database, logs, rq
        self.backend = "rq" if rq else "database"
        self.started: list[DbWorker] = []

    def start(self) -> DbWorker:
        log = self.logs / f"worker-{len(self.started)}.log"
        worker = DbWorker(self.queue, self.database, log, rq=self.rq)
        self.started.append(worker)
        return worker

    def logs_text(self) -> str:
        return "\n".join(w.log.read_text()[-2000:] for w in self.started if w.log.exists())


@pytest.fixture
def workers(_django_tasks_db: None, tmp_path: Path) -> Iterator[Workers]:
    """Two db_workers on a queue of this test's own; every worker started is stopped after."""
    yield from _two_workers(f"bulkpool-{uuid.uuid4().hex[:8]}", tmp_path, rq=False)


@pytest.fixture
def rq_workers(_django_tasks_rq: None, tmp_path: Path) -> Iterator[Workers]:
    """Two rqworkers on the checkout's rq queue (emptied first); stopped after."""
    from django.conf import settings

    yield from _two_workers(settings.RQ_QUEUE, tmp_path, rq=True)


def _two_workers(queue: str, logs: Path, *, rq: bool) -> Iterator[Workers]:
    found = Workers(queue, str(connection.settings_dict["NAME"]), logs, rq=rq)
    found.start()
    found.start()
    try:
        yield found
    finally:
        for worker in found.started:
            worker.stop()


def _executor(workers: Workers, **extra: Any) -> TasksExecutor:
    return TasksExecutor(
        2, backend=workers.backend, queue_name=workers.queue, lease=3.0, heartbeat=0.5, **extra
    )


def _queued(workers: Workers) -> int:
    """This test's tasks not finished yet (ready, or claimed by a live worker)."""
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult.objects.filter(queue_name=workers.queue, status__in=["READY", "RUNNING"]).count()


def _in_a_chunk(worker: DbWorker) -> bool:
    """Whether ``worker`` runs a chunk now: a task it claimed whose chunk has started (its
    start is counted in the journal) and not committed. Its chunks take 0.5 s."""
    from django_tasks_db.models import DBTaskResult

    from bulkpool.models import RunChunk
    from bulkpool.protocol import JSON

    running = DBTaskResult.objects.filter(status="RUNNING").values_list("worker_ids", "args_kwargs")
    for ids, arguments in running:
        if worker.id not in ids:
            continue
        chunk = JSON.decode(arguments["args"][1])
        started = ChunkDelivery.objects.filter(start=chunk.start, size=len(chunk)).exists()
        if started and not RunChunk.objects.filter(start=chunk.start).exists():
            return True
    return False


def _wait(what: str, done: Any, workers: Workers) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WAIT}s for {what}; workers said:\n{workers.logs_text()}")
        time.sleep(0.05)


def test_every_item_is_written_once_by_two_workers(workers):
    """500 items through two db_workers: each written once, results back in order, no message left."""
    func = functools.partial(jobs.slow_marker, 0.0)
    results = bulkpool.imap(func, range(500), backend=_executor(workers), chunk_size=10)
    outcomes = list(results)
    found = tally(range(500))
    record("tasks db_worker: clean run", found, results.report)
    assert found.exactly_once, found
    assert [o.value for o in outcomes] == list(range(500))
    assert results.report.ok == 500
    assert not ChunkReply.objects.exists()


def test_item_failures_come_back_with_index_type_message_and_traceback(workers):
    """Per-item failures come back through the journal's database, with the worker's traceback."""
    report = bulkpool.run(
        functools.partial(marker_failing_every, 25), range(200), backend=_executor(workers), chunk_size=10
    )
    assert (report.ok, report.failed) == (192, 8)
    assert sorted(f.index for f in report.failures) == list(range(0, 200, 25))
    failure = min(report.failures, key=lambda f: f.index)
    assert (failure.exc_type, failure.message) == ("ValueError", "item 0 is refused")
    assert "marker_failing_every" in failure.traceback
    found = tally(i for i in range(200) if i % 25)
    assert found.exactly_once, found


def test_a_worker_killed_mid_chunk_and_replaced_loses_and_doubles_nothing(workers):
    """SIGKILL a worker while it runs a chunk: django-tasks-db never hands that task out again,
    so its lease expires and the caller sends the chunk again; a new worker takes over."""
    import threading

    killed: list[int] = []

    def kill_one_then_replace() -> None:
        victim = workers.started[0]
        _wait("100 items written", lambda: len(marker_counts()) >= 100, workers)
        _wait("the first worker to be in a chunk", lambda: _in_a_chunk(victim), workers)
        connection.close()
        victim.kill()
        killed.append(victim.process.pid)
        workers.start()

    killer = threading.Thread(target=kill_one_then_replace)
    killer.start()
    try:
        report = bulkpool.run(
            functools.partial(jobs.slow_marker, 0.05), range(400), backend=_executor(workers), chunk_size=10
        )
    finally:
        killer.join()
    found = tally(range(400))
    record("tasks db_worker: worker SIGKILL, replaced", found, report)
    assert killed and workers.started[0].process.returncode == -signal.SIGKILL
    assert found.exactly_once, (found, str(report))
    assert (report.ok, report.failed) == (400, 0)
    # 40 chunks, and the one the killed worker held sent again (retried, or, when it died
    # before the chunk started, sent again without blame).
    from django_tasks_db.models import DBTaskResult

    assert DBTaskResult.objects.filter(queue_name=workers.queue).count() > 40, "no chunk was sent again"


def test_a_task_delivered_again_is_applied_once(workers):
    """Tasks that ran are put back in the queue mid-run, as a queue that redelivers would: they
    run again (each start is counted), and write nothing twice."""
    from django_tasks_db.models import DBTaskResult

    done = DBTaskResult.objects.filter(queue_name=workers.queue, status="SUCCESSFUL")
    again: list[int] = []

    def redeliver() -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(marker_counts()) < 100:
            time.sleep(0.02)
        again.append(done.update(status="READY", started_at=None, finished_at=None))
        connection.close()

    import threading

    thread = threading.Thread(target=redeliver)
    thread.start()
    try:
        report = bulkpool.run(
            functools.partial(jobs.slow_marker, 0.01), range(300), backend=_executor(workers), chunk_size=10
        )
    finally:
        thread.join()
    _wait("the tasks delivered again to run", lambda: _queued(workers) == 0, workers)
    found = tally(range(300))
    record("tasks db_worker: tasks delivered again", found, report, redelivered=again[0])
    assert again[0] >= 5, again
    run = Run.objects.get()
    assert ChunkDelivery.objects.filter(run=run, starts__gte=2).count() >= again[0]
    assert found.exactly_once, found
    assert (report.ok, report.failed) == (300, 0)


def test_ctrl_c_then_resume_writes_every_item_once_and_late_chunks_nothing(workers):
    """Ctrl-C mid-run: the chunks left in the queue run later and meet the fence (their attempt
    is over); the run_id run again writes the rest: every item once."""
    run_id = f"tasks-ctrl-c-{uuid.uuid4().hex[:6]}"
    driver = start_driver(
        "--items", "400", "--pause", "0.02", "--chunk-size", "10", "--run-id", run_id,
        "--tasks-backend", "database", "--tasks-queue", workers.queue,
    )  # fmt: skip
    wait_for_rows(driver, 100)
    driver.send_signal(signal.SIGINT)
    status, _, err = finish(driver, within=60)
    assert status == 130, err
    assert f"run_id={run_id!r}" in err  # the resume hint
    _wait("the chunks left in the queue to run", lambda: _queued(workers) == 0, workers)
    before = marker_counts()
    report = bulkpool.run(
        functools.partial(jobs.slow_marker, 0.0), range(400), backend=_executor(workers),
        chunk_size=10, run_id=run_id,
    )  # fmt: skip
    found = tally(range(400))
    record("tasks db_worker: caller Ctrl-C, then resumed", found, report, written_before=len(before))
    assert found.exactly_once, (found, str(report))
    assert 0 < report.skipped < 400
    assert report.skipped == len(before), "a chunk of the interrupted attempt committed after it ended"
    assert report.failed == 0


# -- django-tasks-rq on Redis ----------------------------------------------------------------


def test_every_item_is_written_once_by_two_rq_workers(rq_workers):
    """200 items through two rqworkers (a work-horse forked per task): each written once."""
    report = bulkpool.run(
        functools.partial(jobs.slow_marker, 0.0), range(200), backend=_executor(rq_workers), chunk_size=10
    )
    found = tally(range(200))
    record("tasks rqworker: clean run", found, report)
    assert found.exactly_once, found
    assert (report.ok, report.failed) == (200, 0)


def test_an_rq_worker_killed_mid_chunk_and_replaced_loses_and_doubles_nothing(rq_workers):
    """SIGKILL an rqworker and its work-horse mid-chunk: the lease expires, the chunk is sent
    again, a new worker takes over; every item once."""
    import threading

    killed: list[int] = []

    def kill_one_then_replace() -> None:
        victim = rq_workers.started[0]
        _wait("100 items written", lambda: len(marker_counts()) >= 100, rq_workers)
        _wait("the first worker to be in a chunk", victim.horse, rq_workers)
        connection.close()
        victim.kill()
        killed.append(victim.process.pid)
        rq_workers.start()

    killer = threading.Thread(target=kill_one_then_replace)
    killer.start()
    try:
        report = bulkpool.run(
            functools.partial(jobs.slow_marker, 0.05),
            range(300),
            backend=_executor(rq_workers),
            chunk_size=10,
        )
    finally:
        killer.join()
    found = tally(range(300))
    record("tasks rqworker: worker SIGKILL, replaced", found, report)
    assert killed and rq_workers.started[0].process.returncode == -signal.SIGKILL
    assert found.exactly_once, (found, str(report))
    assert (report.ok, report.failed) == (300, 0)
