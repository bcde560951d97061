"""bulkpool's Celery task, found by ``app.autodiscover_tasks()`` when ``"bulkpool"`` is installed.

It runs one chunk sent by ``CeleryExecutor`` (see ``bulkpool.executors.celery`` for the data
flow). ``acks_late`` with ``reject_on_worker_lost``: a pool child killed mid-chunk leaves its
message to the broker, which delivers it again at once; the journal makes the second
delivery harmless. The result goes to the caller's reply queue, never to a result backend.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from bulkpool.executors.celery.remote import run_here
from bulkpool.executors.celery.transport import TASK_NAME


@shared_task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chunk(self: Any, job: str, payload: str, key: str, reply: str) -> None:
    run_here(self.app, job, payload, key, reply)
