"""The celery executor: chunks run as Celery tasks on any number of machines, applied once by the journal.

Data flow (every message is JSON; nothing is pickled):

    caller (CeleryExecutor)                                  a celery worker, on any machine
    start()   declares its own reply queue on the app's broker
    submit()  --send_task("bulkpool.run_chunk",                -->  tasks.run_chunk -> run_here():
                 [job, chunk, key, reply queue])                    a Worker per job and process
                                                                    (setup runs once there), on
                                                                    a thread of its own (_Runner)
                                                                    that keeps its connections
                                                                    one more start of the chunk,
                                                                    counted in the journal
    events()  <--{"kind": "started", key, host, pid}-----------     before the chunk runs, or
              <--{"kind": "refused", key, starts}----------------   it started MAX_STARTS times
              <--{"kind": "crashed", key, error, traceback}------   failed outside any item
              <--{"kind": "beat", key}  every heartbeat s -------     while it runs (a thread)
              <--{"kind": "done", key, ChunkResult as JSON}------     committed, failed or skipped
              <--{"kind": "setup_failed", traceback}--------------    setup raised on that worker

The parts, each in its own module, composed here:

- ``bulkpool.executors.wire``: the job and its chunks as JSON (``func``, ``setup`` and
  ``prepare`` by dotted path; QuerySet input as its model label); what cannot travel is
  refused before anything is sent.
- ``transport``: kombu -- ``send_task``, the reply queue, ``revoke``, reconnecting.
- ``bulkpool.executors.leases``: which chunks in flight will not come back.
- ``bulkpool.executors.poison``: chunks that kill the workers that take them.
- ``remote``: what a celery worker process does with a chunk (``bulkpool.tasks`` calls it).

Exactly once. Every celery run is journaled (``delivery = "at_least_once"``; the engine
makes a ``run_id`` up when none is given). The task is ``acks_late`` with
``reject_on_worker_lost``, so the chunk of a killed pool child goes back to the broker at
once and runs again elsewhere; a chunk that runs twice meets its journal record
(``AlreadyDone``) and is skipped, not applied again.

Loss. A started chunk holds a lease that each heartbeat renews; when it expires (the node
died, or lost the network) the chunk comes back ``ChunkLost`` and its task is revoked, so
the engine sends it again (or splits it) under a new key. Messages under a key declared
lost are ignored. A chunk never started that chunks sent after it overtook was taken by a
node that died before starting it: on RabbitMQ the broker requeues such a message when the
node's connection drops; on Redis it would wait for the visibility timeout (an hour by
default), so the caller sends it again (without blame: it never ran; the old message, if
it ever runs, meets the journal). Run workers with ``worker_prefetch_multiplier = 1``, so
that a node takes only what it runs at once.

Poison. A worker counts each start of a chunk in the journal, so the count is the same on
every machine and outlives the caller; the one that would start it more than
``MAX_STARTS`` times refuses it ("refused") and acks the message, so the broker stops
redelivering it even when no caller is left to revoke it; the caller loses it and the
engine splits it until the item that does it fails alone, as locally. A resumed run meets
the same count. (A dry run is not journaled: there the caller counts the "started"
messages of each key.)
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from bulkpool.errors import ConfigurationError, WorkerStartupError
from bulkpool.executors import poison
from bulkpool.executors.base import Executor
from bulkpool.executors.celery.remote import run_here
from bulkpool.executors.celery.transport import TASK_NAME, CeleryTransport
from bulkpool.executors.leases import Leases
from bulkpool.executors.poison import MAX_STARTS
from bulkpool.executors.wire import encode_chunk, job_of
from bulkpool.protocol import JSON, Chunk, ChunkDone, ChunkLost, Event, Task

if TYPE_CHECKING:
    from bulkpool.options import Options

logger = logging.getLogger("bulkpool")

WORKERS = "celery workers"  # how the messages name them
NOBODY_TAKES = 10.0  # seconds without a chunk taken before the caller says that no worker takes them

__all__ = ["MAX_STARTS", "TASK_NAME", "CeleryExecutor", "run_here"]


class CeleryExecutor(Executor):
    """Chunks as Celery tasks of ``app`` (the project's current app by default) on ``queue``.

    ``lease``: seconds a started chunk may go without a heartbeat before it counts as lost
    (``heartbeat``, by default a sixth of it, is how often a worker sends one).
    ``ahead``: chunks in flight (sent, not finished) per worker expected (``workers``).
    """

    name = "celery"
    delivery = "at_least_once"
    detects_loss = True

    def __init__(
        self,
        workers: int | None = None,
        *,
        app: Any = None,
        queue: str | None = None,
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
        self.app = app
        self.queue = queue
        self.lease = lease
        self.heartbeat = heartbeat
        self.ahead = ahead

    def __repr__(self) -> str:
        return f"CeleryExecutor(workers={self.workers!r}, queue={self.queue!r}, lease={self.lease!r})"

    # -- before the run --------------------------------------------------------------------

    def check_options(self, options: Options) -> None:
        from django.apps import apps

        if not options.dry_run and not apps.is_installed("bulkpool"):
            raise ConfigurationError(
                "The celery backend journals every run, so that a chunk delivered twice is applied "
                'once: add "bulkpool" to INSTALLED_APPS (the workers need it too, for their task) '
                "and run `python manage.py migrate bulkpool`."
            )

    def check(self, task: Task) -> None:
        # Refuses what cannot travel, before anything is sent.
        job_of(task, heartbeat=self.heartbeat, to=WORKERS)

    # -- the Executor interface ------------------------------------------------------------

    def start(self, task: Task, workers: int) -> None:
        self._job = JSON.encode(job_of(task, heartbeat=self.heartbeat, to=WORKERS)).decode()
        self._capacity = self.ahead * workers
        self._leases = Leases(self.lease)
        self._starts = poison.StartTally()
        self._received: list[Event] = []
        self._setup_failed: str | None = None
        self._told_untaken = False
        self._transport = CeleryTransport(self.app or _current_app(), self.queue, self._on_reply)
        self._transport.open()

    def capacity(self) -> int:
        return self._capacity

    def submit(self, chunk: Chunk) -> None:
        payload = encode_chunk(chunk, to=WORKERS)
        key = uuid.uuid4().hex
        self._transport.send(self._job, payload, key)
        self._leases.sent(key, chunk, time.monotonic())

    def events(self, timeout: float | None = None) -> list[Event]:
        deadline = time.monotonic() + (self.heartbeat if timeout is None else timeout)
        while True:
            wait = max(0.0, min(deadline - time.monotonic(), self.heartbeat))
            self._transport.drain(wait)
            self._expire()
            self._say_if_untaken()
            if self._setup_failed is not None:
                raise WorkerStartupError("A celery worker failed in setup.", self._setup_failed)
            if self._received or time.monotonic() >= deadline:
                break
        received, self._received = self._received, []
        return received

    def withdraw(self) -> None:
        """Revoke the chunks still queued in the broker, so a stopping run does not wait for
        them. One a worker starts all the same commits with its journal record: a resume
        skips it."""
        waiting = self._leases.waiting()
        if waiting:
            self._transport.revoke(waiting)
        for key in waiting:
            chunk = self._leases.pop(key).chunk
            self._received.append(ChunkLost(chunk, "withdrawn: the run is stopping", started=False))

    def stop(self, *, cancel: bool = False) -> None:
        if cancel and len(self._leases):
            self._transport.revoke(list(self._leases))
        self._leases.clear()
        self._transport.close()

    # -- replies and leases ----------------------------------------------------------------

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
                self._lose(key, poison.reason(starts, WORKERS))
        elif kind == "crashed":
            reason = f"the celery worker running it crashed outside any item: {body.get('error')}"
            self._lose(key, reason, traceback=body.get("traceback", ""))
        elif kind == "refused":
            self._lose(key, poison.reason(int(body.get("starts", 0)), WORKERS))
        elif kind == "done":
            self._forget(key)
            self._received.append(ChunkDone(lease.chunk, JSON.decode(body["result"])))

    def _expire(self) -> None:
        for expiry in self._leases.expired(time.monotonic()):
            if expiry.started:
                reason = f"the celery worker running it ({expiry.lease.host}) went silent for {self.lease:g}s"
            else:
                reason = (
                    f"chunks sent after it started {self.lease:g}s ago and it did not: a celery node "
                    "that died had taken it"
                )
            self._lose(expiry.key, reason, started=expiry.started)

    def _say_if_untaken(self) -> None:
        """Once a run: no worker took any chunk for ``NOBODY_TAKES`` seconds. Say where they
        wait and how to start a worker there; the run goes on waiting (Ctrl-C ends it)."""
        since = self._leases.untaken_since()
        if self._told_untaken or since is None or time.monotonic() - since < NOBODY_TAKES:
            return
        self._told_untaken = True
        queue, app = self._transport.queue_name, self._transport.app
        logger.warning(
            "No celery worker has taken a chunk for %gs from queue %r on %s: none consumes that "
            "queue, or all are busy. Start one with `celery -A %s worker -Q %s --prefetch-multiplier 1`. "
            "Waiting; Ctrl-C stops the run, and the chunks no worker took count as not run (and never run).",
            NOBODY_TAKES,
            queue,
            self._transport.broker,
            app.main or "proj",
            queue,
        )

    def _lose(self, key: str, reason: str, *, started: bool = True, traceback: str = "") -> None:
        chunk = self._forget(key)
        self._transport.revoke([key])
        lost = ChunkLost(chunk, reason, in_doubt=started, traceback=traceback, started=started)
        self._received.append(lost)

    def _forget(self, key: str) -> Chunk:
        self._starts.forget(key)
        return self._leases.pop(key).chunk


def _current_app() -> Any:
    from celery import current_app

    return current_app._get_current_object()
