"""What every executor over a task queue shares: chunks handed to workers the caller cannot
watch, and their messages read back. A subclass gives the transport; this class keeps the
leases, the poison counting and the events.

    caller (a BrokeredExecutor)                              a worker (``executors.remote``)
    submit()  --_send(payload, key)------------------------>  run_here(job, payload, send)
    events()  <--_drain(wait): each message to _on_reply ---  send("started" | "beat" |
              started / beat: the chunk's lease renewed          "done" | "crashed" |
              done: ChunkDone; crashed / refused: ChunkLost      "refused" | "setup_failed")
              leases expired: ChunkLost, and _cancel([key])
    withdraw() / stop(cancel=True)  --_cancel(keys)-->  (a best effort: the journal fences the rest)

Exactly once is the journal's: a message under a key declared lost is ignored, a chunk
delivered twice meets its record. ``bulkpool.executors.celery`` says how the leases and the
poison counting decide.
"""

from __future__ import annotations

import time
import uuid
from abc import abstractmethod
from typing import Any

from bulkpool.errors import ConfigurationError, WorkerStartupError
from bulkpool.executors import poison
from bulkpool.executors.base import Delivery, Executor
from bulkpool.executors.leases import Leases
from bulkpool.executors.wire import encode_chunk, job_of
from bulkpool.protocol import JSON, Chunk, ChunkDone, ChunkLost, Event, Task

NOBODY_TAKES = 10.0  # seconds without a chunk taken before the caller says that no worker takes them


class BrokeredExecutor(Executor):
    """Chunks as tasks of a queue, read back as messages about each chunk's key.

    ``lease``: seconds a started chunk may go without a heartbeat before it counts as lost
    (``heartbeat``, by default a sixth of it, is how often a worker sends one).
    ``ahead``: chunks in flight (sent, not finished) per worker expected (``workers``).
    """

    delivery: Delivery = "at_least_once"
    detects_loss = True
    workers_named = "remote workers"  # how the messages name the workers

    def __init__(
        self,
        workers: int | None = None,
        *,
        lease: float = 30.0,
        heartbeat: float | None = None,
        ahead: int = 2,
    ) -> None:
        super().__init__(workers)
        heartbeat = lease / 6 if heartbeat is None else heartbeat
        if not 0 < heartbeat < lease:
            raise ConfigurationError(
                f"heartbeat ({heartbeat}) must be more than 0 and less than lease ({lease})."
            )
        if ahead < 1:
            raise ConfigurationError(f"ahead must be 1 or more, not {ahead!r}.")
        self.lease = lease
        self.heartbeat = heartbeat
        self.ahead = ahead

    # -- the transport, a subclass's ---------------------------------------------------------

    @abstractmethod
    def _open(self) -> None:
        """Get ready to send (``self._job`` is the job's JSON); WorkerStartupError if it cannot."""

    @abstractmethod
    def _send(self, payload: str, key: str) -> None:
        """Hand the chunk (JSON text) to the queue under ``key``."""

    @abstractmethod
    def _drain(self, wait: float) -> None:
        """Pass each message that arrives within ``wait`` seconds to ``_on_reply``."""

    @abstractmethod
    def _cancel(self, keys: list[str]) -> None:
        """Take these chunks back from the queue where it can (a best effort)."""

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _untaken_hint(self) -> None:
        """Say, once a run, that no worker took a chunk for ``NOBODY_TAKES`` seconds."""

    # -- the Executor interface ------------------------------------------------------------

    def check(self, task: Task) -> None:
        # Refuses what cannot travel, before anything is sent.
        job_of(task, heartbeat=self.heartbeat, to=self.workers_named)

    def start(self, task: Task, workers: int) -> None:
        self._job = JSON.encode(job_of(task, heartbeat=self.heartbeat, to=self.workers_named)).decode()
        self._capacity = self.ahead * workers
        self._leases = Leases(self.lease)
        self._starts = poison.StartTally()
        self._received: list[Event] = []
        self._setup_failed: str | None = None
        self._told_untaken = False
        self._open()

    def capacity(self) -> int:
        return self._capacity

    def submit(self, chunk: Chunk) -> None:
        payload = encode_chunk(chunk, to=self.workers_named)
        key = uuid.uuid4().hex
        self._send(payload, key)
        self._leases.sent(key, chunk, time.monotonic())

    def events(self, timeout: float | None = None) -> list[Event]:
        deadline = time.monotonic() + (self.heartbeat if timeout is None else timeout)
        while True:
            wait = max(0.0, min(deadline - time.monotonic(), self.heartbeat))
            self._drain(wait)
            self._expire()
            self._say_if_untaken()
            if self._setup_failed is not None:
                raise WorkerStartupError(
                    f"A worker ({self.workers_named}) failed in setup.", self._setup_failed
                )
            if self._received or time.monotonic() >= deadline:
                break
        received, self._received = self._received, []
        return received

    def withdraw(self) -> None:
        """Take back the chunks still queued, so a stopping run does not wait for them. One
        a worker starts all the same meets the fence (or commits with its journal record):
        a resume runs or skips it."""
        waiting = self._leases.waiting()
        if waiting:
            self._cancel(waiting)
        for key in waiting:
            chunk = self._leases.pop(key).chunk
            self._received.append(ChunkLost(chunk, "withdrawn: the run is stopping", started=False))

    def stop(self, *, cancel: bool = False) -> None:
        if cancel and len(self._leases):
            self._cancel(list(self._leases))
        self._leases.clear()
        self._close()

    # -- messages and leases ---------------------------------------------------------------

    def _on_reply(self, body: dict[str, Any]) -> None:
        kind, key = body.get("kind"), body.get("key", "")
        if kind == "setup_failed":
            self._setup_failed = body.get("traceback", "")
            return
        now = time.monotonic()
        if kind == "started":
            lease = self._leases.started(key, f"{body.get('host')} pid {body.get('pid')}", now)
        else:
            lease = self._leases.heard(key, now)
        if lease is None:  # a key declared lost, or another run's: never reported twice
            return
        if kind == "started":
            starts = self._starts.started(key)
            if poison.kills_its_workers(starts):
                self._lose(key, poison.reason(starts, self.workers_named))
        elif kind == "crashed":
            reason = f"its worker crashed outside any item: {body.get('error')}"
            self._lose(key, reason, traceback=body.get("traceback", ""))
        elif kind == "refused":
            self._lose(key, poison.reason(int(body.get("starts", 0)), self.workers_named))
        elif kind == "done":
            self._forget(key)
            self._received.append(ChunkDone(lease.chunk, JSON.decode(body["result"])))

    def _expire(self) -> None:
        for expiry in self._leases.expired(time.monotonic()):
            if expiry.started:
                reason = f"the worker running it ({expiry.lease.host}) went silent for {self.lease:g}s"
            else:
                reason = (
                    f"chunks sent after it started {self.lease:g}s ago and it did not: a worker "
                    "that died had taken it"
                )
            self._lose(expiry.key, reason, started=expiry.started)

    def _say_if_untaken(self) -> None:
        since = self._leases.untaken_since()
        if self._told_untaken or since is None or time.monotonic() - since < NOBODY_TAKES:
            return
        self._told_untaken = True
        self._untaken_hint()

    def _lose(self, key: str, reason: str, *, started: bool = True, traceback: str = "") -> None:
        chunk = self._forget(key)
        self._cancel([key])
        lost = ChunkLost(chunk, reason, in_doubt=started, traceback=traceback, started=started)
        self._received.append(lost)

    def _forget(self, key: str) -> Chunk:
        self._starts.forget(key)
        return self._leases.pop(key).chunk
