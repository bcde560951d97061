"""The serial executor: a plain loop in the caller's thread, on the caller's connection."""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from bulkpool.executors.base import Executor
from bulkpool.protocol import Chunk, ChunkDone, Event, Task
from bulkpool.work import Worker


class SerialExecutor(Executor):
    """Runs each chunk as it is submitted. Sees the caller's transaction, so works in a ``TestCase``."""

    name = "serial"
    supports_caller_transaction = True
    supports_memory_sqlite = True

    def start(self, task: Task, workers: int) -> None:
        self._worker = Worker(replace(task, own_connections=False), in_caller_thread=True)
        self._worker.start()
        self._done: deque[Event] = deque()

    def capacity(self) -> int:
        return 1

    def submit(self, chunk: Chunk) -> None:
        self._done.append(ChunkDone(chunk, self._worker.run(chunk)))

    def events(self, timeout: float | None = None) -> list[Event]:
        done = list(self._done)
        self._done.clear()
        return done

    def stop(self, *, cancel: bool = False) -> None:
        self._done.clear()
