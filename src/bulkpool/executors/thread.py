"""The thread executor: a pool of threads, each with its own Worker and its own connections.

Data flow:

    engine --submit()--> _inbox --> a thread: notes the chunk in _held, runs it
    engine <--events()-- _outbox <-- ChunkDone, or ChunkLost with the traceback when the
                                     Worker raised anything at all (SystemExit included)
    engine <--events()-- ChunkLost for the chunk held by a thread found dead anyway

A ``None`` in the inbox tells a thread to close its connections and end. ``events`` looks
for dead threads while it waits, as the process executor watches its pipes, so a thread
that dies never leaves the engine waiting; ``submit`` starts one in its place. A thread
whose setup fails puts an ``ErrorInfo`` on the outbox: ``events`` raises
``WorkerStartupError``. Threads help work that releases the GIL (I/O, C code).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import replace

from bulkpool.errors import WorkerStartupError
from bulkpool.executors.base import CommitWatch, Delivery, Executor, crashed
from bulkpool.protocol import Chunk, ChunkDone, ChunkLost, ErrorInfo, Event, Task
from bulkpool.work import Worker

LIVENESS_CHECK = 0.2  # seconds between looks for dead threads while waiting for events


class ThreadExecutor(Executor):
    name = "thread"
    delivery: Delivery = "exactly_once"
    detects_loss = True
    local = True
    grows = True
    start_seconds = 0.01
    shares_interpreter = True

    def start(self, task: Task, workers: int) -> None:
        self._task = replace(task, own_connections=True)
        self._size = workers
        self._inbox: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[Event | ErrorInfo] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        # Which chunk each thread is running, and its Worker (to ask if it was committing).
        # The lock makes "no longer held" and "reported" one step, so a chunk is never
        # reported both done and lost.
        self._lock = threading.Lock()
        self._held: dict[threading.Thread, tuple[Chunk, Worker, CommitWatch]] = {}
        self._lost: list[Event] = []
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count()
        self._top_up()

    def grow(self, workers: int) -> None:
        self._size = max(self._size, workers)
        self._top_up()  # a thread whose setup fails says so through events(), as at start

    def capacity(self) -> int:
        return 2 * self._size

    def submit(self, chunk: Chunk) -> None:
        self._notice_deaths()
        self._top_up()  # only when work is sent, so none starts while the run drains
        self._inbox.put(chunk)

    def events(self, timeout: float | None = None) -> list[Event]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._notice_deaths()
            with self._lock:
                received: list[Event | ErrorInfo] = [*self._lost]
                self._lost.clear()
            wait = 0.0 if received else LIVENESS_CHECK
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            try:
                received.append(self._outbox.get(timeout=wait))
            except queue.Empty:
                pass
            while not self._outbox.empty():
                received.append(self._outbox.get_nowait())
            if received or (deadline is not None and time.monotonic() >= deadline):
                return _raise_startup_errors(received)

    def stop(self, *, cancel: bool = False) -> None:
        if cancel:
            self._cancelled.set()
        for _ in self._threads:
            self._inbox.put(None)
        for thread in self._threads:
            thread.join()

    # -- the threads ------------------------------------------------------------------------

    def _top_up(self) -> None:
        while len(self._threads) < self._size:
            thread = threading.Thread(target=self._serve, name=f"bulkpool-{next(self._numbers)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        commit = CommitWatch()
        worker = Worker(self._task, before_commit=commit)
        try:
            try:
                worker.start()
            except BaseException as error:
                self._outbox.put(ErrorInfo.from_exception(error))
                return
            while (chunk := self._inbox.get()) is not None:
                if self._cancelled.is_set():
                    continue
                commit.reset()
                with self._lock:
                    self._held[me] = (chunk, worker, commit)
                event = self._run(worker, chunk, commit)
                with self._lock:
                    del self._held[me]
                    self._outbox.put(event)
        finally:
            worker.close()

    def _run(self, worker: Worker, chunk: Chunk, commit: CommitWatch) -> Event:
        try:
            return ChunkDone(chunk, worker.run(chunk))
        except BaseException as error:
            lost = crashed(
                chunk,
                error,
                in_doubt=commit.in_doubt(worker),
                where=f"the worker thread {threading.current_thread().name}",
            )
            worker.close()  # the next chunk starts on a fresh connection, whatever state this one was left in
            return lost

    def _notice_deaths(self) -> None:
        """Hand back, as lost, the chunks of threads that died; forget those threads."""
        with self._lock:
            for thread in [t for t in self._threads if not t.is_alive()]:
                self._threads.remove(thread)
                if thread in self._held:
                    chunk, worker, commit = self._held.pop(thread)
                    reason = f"the worker thread {thread.name} died"
                    self._lost.append(ChunkLost(chunk, reason, in_doubt=commit.in_doubt(worker)))
            if not self._threads:  # nobody left to take what waits in the inbox
                while not self._inbox.empty():
                    if (waiting := self._inbox.get_nowait()) is not None:
                        self._lost.append(
                            ChunkLost(waiting, "no worker thread was left to run it", started=False)
                        )


def _raise_startup_errors(received: list[Event | ErrorInfo]) -> list[Event]:
    for message in received:
        if isinstance(message, ErrorInfo):
            raise WorkerStartupError(
                f"A worker thread failed in setup: {message.exc_type}: {message.message}",
                message.traceback,
            )
    return received  # type: ignore[return-value]
