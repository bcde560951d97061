"""The serial executor: a plain loop in the caller's thread, on the caller's connection."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from bulkpool.executors.base import CommitWatch, Delivery, Executor, crashed
from bulkpool.protocol import Chunk, ChunkDone, Event, Task
from bulkpool.work import Worker


class SerialExecutor(Executor):
    """Runs each chunk as it is submitted. Sees the caller's transaction, so works in a ``TestCase``.

    A failing setup raises as the caller's own error.
    """

    name = "serial"
    supports_caller_transaction = True
    supports_memory_sqlite = True
    delivery: Delivery = "exactly_once"
    detects_loss = True
    local = True
    start_seconds = 0.0

    def start(self, task: Task, workers: int) -> None:
        self._commit = CommitWatch()
        self._done: deque[Event] = deque()
        worker_task = replace(task, own_connections=False)
        self._worker = Worker(worker_task, before_commit=self._commit, in_caller_thread=True)
        self._worker.start()

    def capacity(self) -> int:
        return 1

    def submit(self, chunk: Chunk) -> None:
        self._commit.reset()
        try:
            result = self._worker.run(chunk)
        except Exception as error:
            # Ctrl-C and SystemExit stay the caller's own (this is its thread); anything
            # else that escapes the worker is that chunk's loss, not the end of the run.
            self._done.append(crashed(chunk, error, in_doubt=self._commit.in_doubt(self._worker)))
            return
        self._done.append(ChunkDone(chunk, result))

    def events(self, timeout: float | None = None) -> list[Event]:
        done = list(self._done)
        self._done.clear()
        return done

    def stop(self, *, cancel: bool = False) -> None:
        self._done.clear()
