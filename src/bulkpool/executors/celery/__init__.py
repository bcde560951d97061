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

- ``bulkpool.executors.brokered``: what every executor over a task queue shares (leases,
  poison counting, the messages read back); this class gives it the Celery transport.
- ``bulkpool.executors.wire``: the job and its chunks as JSON (``func``, ``setup`` and
  ``prepare`` by dotted path; QuerySet input as its model label); what cannot travel is
  refused before anything is sent.
- ``transport``: kombu -- ``send_task``, the reply queue, ``revoke``, reconnecting.
- ``bulkpool.executors.leases``: which chunks in flight will not come back.
- ``bulkpool.executors.poison``: chunks that kill the workers that take them.
- ``bulkpool.executors.remote``: what a worker process does with a chunk; ``remote`` here
  sends its messages to the reply queue (``bulkpool.tasks`` calls it).

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
from typing import TYPE_CHECKING, Any

from bulkpool.errors import ConfigurationError
from bulkpool.executors.brokered import NOBODY_TAKES, BrokeredExecutor
from bulkpool.executors.celery.remote import run_here
from bulkpool.executors.celery.transport import TASK_NAME, CeleryTransport
from bulkpool.executors.poison import MAX_STARTS

if TYPE_CHECKING:
    from bulkpool.options import Options

logger = logging.getLogger("bulkpool")

WORKERS = "celery workers"  # how the messages name them

__all__ = ["MAX_STARTS", "NOBODY_TAKES", "TASK_NAME", "CeleryExecutor", "run_here"]


class CeleryExecutor(BrokeredExecutor):
    """Chunks as Celery tasks of ``app`` (the project's current app by default) on ``queue``.

    ``lease``: seconds a started chunk may go without a heartbeat before it counts as lost
    (``heartbeat``, by default a sixth of it, is how often a worker sends one).
    ``ahead``: chunks in flight (sent, not finished) per worker expected (``workers``).
    """

    name = "celery"
    workers_named = WORKERS

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
        super().__init__(workers, lease=lease, heartbeat=heartbeat, ahead=ahead)
        self.app = app
        self.queue = queue

    def __repr__(self) -> str:
        return f"CeleryExecutor(workers={self.workers!r}, queue={self.queue!r}, lease={self.lease!r})"

    def check_options(self, options: Options) -> None:
        from django.apps import apps

        if not options.dry_run and not apps.is_installed("bulkpool"):
            raise ConfigurationError(
                "The celery backend journals every run, so that a chunk delivered twice is applied "
                'once: add "bulkpool" to INSTALLED_APPS (the workers need it too, for their task) '
                "and run `python manage.py migrate bulkpool`."
            )

    # -- the transport: kombu ------------------------------------------------------------------

    def _open(self) -> None:
        self._transport = CeleryTransport(self.app or _current_app(), self.queue, self._on_reply)
        self._transport.open()

    def _send(self, payload: str, key: str) -> None:
        self._transport.send(self._job, payload, key)

    def _drain(self, wait: float) -> None:
        self._transport.drain(wait)

    def _cancel(self, keys: list[str]) -> None:
        self._transport.revoke(keys)

    def _close(self) -> None:
        self._transport.close()

    def _untaken_hint(self) -> None:
        """No worker took any chunk for ``NOBODY_TAKES`` seconds. Say where they wait and how
        to start a worker there; the run goes on waiting (Ctrl-C ends it)."""
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


def _current_app() -> Any:
    from celery import current_app

    return current_app._get_current_object()
