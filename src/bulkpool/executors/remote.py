"""What a worker process of a task queue does with one chunk, whatever carries it (Celery,
Django's Tasks framework): the transport gives it ``send``, a way to say something to the
caller about the chunk.

    run_here(job, payload, send)                   the queue's task thread
      _runner().call(...)                          this task thread's _Runner thread, where
        _worker_for(job)                           a Worker per job and process (setup runs
                                                   once) is kept, WORKERS_CACHED jobs at most
        _run_chunk(worker, chunk)                  one more start, counted (poison.StartGate);
                                                   "refused" past MAX_STARTS; else "started",
                                                   heartbeats while it runs, the ChunkResult
      send("done", result=...)                     from the task thread

An exception outside any item is said ("crashed", or "setup_failed") and raised again, so
that the caller never waits for a chunk that will not come back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from bulkpool.executors.poison import StartGate
from bulkpool.executors.wire import task_of
from bulkpool.journal import count_start
from bulkpool.protocol import JSON, Chunk

if TYPE_CHECKING:
    from bulkpool.work import Worker

logger = logging.getLogger("bulkpool")

WORKERS_CACHED = 4  # jobs a worker process keeps set up at once
IDLE_CLOSE = 10.0  # seconds without a chunk after which a runner closes its database connections

Send = Callable[..., None]  # send(kind, **fields): one message about the chunk to its caller

_workers: dict[str, Worker] = {}
_lock = threading.Lock()


def run_here(job: str, payload: str, send: Send) -> None:
    """Run one chunk in this worker process and tell the caller how it went through ``send``."""
    runner = _runner()
    try:
        worker, heartbeat = runner.call(_worker_for, job)
    except Exception:
        send("setup_failed", traceback=traceback.format_exc())
        raise
    try:
        result = runner.call(_run_chunk, worker, heartbeat, JSON.decode(payload), send)
    except Exception as error:  # outside any item (the journal unreachable...): say so, never hang
        send("crashed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        raise
    if result is not None:
        send("done", result=JSON.encode(result).decode())


def _run_chunk(worker: Worker, heartbeat: float, chunk: Chunk, send: Send) -> Any:
    """Count the start, then run the chunk (None: refused, it kept killing its workers)."""
    journal = worker.task.journal
    if journal is not None:
        gate = StartGate(functools.partial(count_start, journal, worker.task.database))
        admitted, starts = gate.admit(chunk)
        if not admitted:  # it killed the workers that took it: end the redeliveries
            send("refused", starts=starts)
            return None
    send("started", host=socket.gethostname(), pid=os.getpid())
    with _beating(send, heartbeat):
        return worker.run(chunk)


def _worker_for(job: str) -> tuple[Worker, float]:
    from bulkpool.work import Worker

    with _lock:
        found = _workers.get(job)
        if found is None:
            found = Worker(task_of(JSON.decode(job)))
            found.start()
            while len(_workers) >= WORKERS_CACHED:
                _workers.pop(next(iter(_workers))).close()
            _workers[job] = found
        return found, float(JSON.decode(job)["heartbeat"])


class _Runner(threading.Thread):
    """The thread that does bulkpool's work for one task thread of a queue's worker.

    Queue workers close the task thread's database connections around every task
    (Celery's Django fixup; ``db_worker`` with ``CONN_MAX_AGE = 0``), so a chunk run there
    opens a new connection (about 20 ms on PostgreSQL here, a sixth of a chunk of 100
    saves). Run here, the work keeps its connections from chunk to chunk, as a process
    worker does; they close after ``IDLE_CLOSE`` seconds without a chunk, so an idle
    worker holds none. ``setup`` and ``func`` always run on this one thread.
    """

    def __init__(self) -> None:
        super().__init__(name="bulkpool-runner", daemon=True)
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._calls = queue.SimpleQueue()

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        future: Future[Any] = Future()
        self._calls.put((future, func, args))
        return future.result()

    def run(self) -> None:
        from django.db import connections

        while True:
            try:
                future, func, args = self._calls.get(timeout=IDLE_CLOSE)
            except queue.Empty:
                connections.close_all()
                continue
            try:
                future.set_result(func(*args))
            except BaseException as error:  # the task thread re-raises it
                future.set_exception(error)


_runners: dict[int, _Runner] = {}
_runners_lock = threading.Lock()


def _runner() -> _Runner:
    """This task thread's runner (one per thread: prefork has one, a thread pool several)."""
    with _runners_lock:
        found = _runners.get(threading.get_ident())
        if found is None or not found.is_alive():
            found = _runners[threading.get_ident()] = _Runner()
            found.start()
        return found


def close_connections() -> None:
    """Close the database connections every runner of this process keeps (a worker that
    stops; tests, before their database is dropped)."""
    from django.db import connections

    with _runners_lock:
        runners = [runner for runner in _runners.values() if runner.is_alive()]
    for runner in runners:
        runner.call(connections.close_all)


@contextlib.contextmanager
def _beating(send: Send, every: float) -> Iterator[None]:
    """A heartbeat every ``every`` seconds while the chunk runs: the caller's lease on it."""
    done = threading.Event()

    def beat() -> None:
        from django.db import connections

        try:
            while not done.wait(every):
                try:
                    send("beat")
                except Exception as error:  # the caller's lease expires and it sends the chunk again
                    logger.warning("Could not send a heartbeat: %s", error)
        finally:
            connections.close_all()  # a transport that writes to the database opened one here

    thread = threading.Thread(target=beat, name="bulkpool-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
