"""The thread executor: a pool of threads, each with its own Worker and its own connections.

Data flow: the engine puts chunks on ``_inbox``; each thread takes one, runs it and puts a
``ChunkDone`` on ``_outbox``, which ``events`` reads. A ``None`` in the inbox tells a thread
to close its connections and end. Threads help work that releases the GIL (I/O, C code).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

from bulkpool.errors import WorkerStartupError
from bulkpool.executors.base import Executor
from bulkpool.protocol import Chunk, ChunkDone, ErrorInfo, Event, Task
from bulkpool.work import Worker


class ThreadExecutor(Executor):
    name = "thread"

    def start(self, task: Task, workers: int) -> None:
        self._inbox: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[Event | ErrorInfo] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        task = replace(task, own_connections=True)
        self._threads = [
            threading.Thread(target=self._serve, args=(task,), name=f"bulkpool-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def capacity(self) -> int:
        return 2 * len(self._threads)

    def submit(self, chunk: Chunk) -> None:
        self._inbox.put(chunk)

    def events(self, timeout: float | None = None) -> list[Event]:
        try:
            first = self._outbox.get(timeout=timeout)
        except queue.Empty:
            return []
        received = [first]
        while not self._outbox.empty():
            received.append(self._outbox.get_nowait())
        for message in received:
            if isinstance(message, ErrorInfo):
                raise WorkerStartupError(
                    f"A worker thread failed in setup: {message.exc_type}: {message.message}",
                    message.traceback,
                )
        return received  # type: ignore[return-value]

    def stop(self, *, cancel: bool = False) -> None:
        if cancel:
            self._cancelled.set()
        for _ in self._threads:
            self._inbox.put(None)
        for thread in self._threads:
            thread.join()

    def _serve(self, task: Task) -> None:
        worker = Worker(task)
        try:
            try:
                worker.start()
            except Exception as error:
                self._outbox.put(ErrorInfo.from_exception(error))
                return
            while (chunk := self._inbox.get()) is not None:
                if not self._cancelled.is_set():
                    self._outbox.put(ChunkDone(chunk, worker.run(chunk)))
        finally:
            worker.close()
