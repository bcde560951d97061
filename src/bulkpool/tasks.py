"""bulkpool's Celery task, found by ``app.autodiscover_tasks()`` when ``"bulkpool"`` is installed.

It runs one chunk sent by ``CeleryExecutor`` (see ``bulkpool.executors.celery`` for the data
flow). ``acks_late`` with ``reject_on_worker_lost``: a pool child killed mid-chunk leaves its
message to the broker, which delivers it again at once; the journal makes the second
delivery harmless. The result goes to the caller's reply queue, never to a result backend.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_init

from bulkpool.executors.celery.remote import run_here
from bulkpool.executors.celery.transport import TASK_NAME


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self: Any, job: str, payload: str, key: str, reply: str) -> None:
    run_here(self.app, job, payload, key, reply)


class _NoBackendToMark(logging.Filter):
    """Celery's revoke handler marks each revoked task in the result backend, and warns for
    every one when there is none ("Failed to mark task ... as revoked in backend: No result
    backend is configured"). bulkpool needs none: the warning says nothing wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        no_backend = len(args) == 2 and isinstance(args[1], NotImplementedError)
        return not (str(record.msg).startswith("Failed to mark task") and no_backend)


@worker_init.connect(weak=False)
def _quiet_revokes_without_a_backend(**kwargs: Any) -> None:
    logging.getLogger("celery.worker.control").addFilter(_NoBackendToMark())
