"""The worker's side of the celery backend: ``bulkpool.tasks.run_chunk`` hands the chunk to
``bulkpool.executors.remote`` (a Worker per job and process, starts counted, heartbeats),
whose every message goes to the caller's reply queue (``publish_reply``)."""

from __future__ import annotations

import functools
from typing import Any

from bulkpool.executors import remote
from bulkpool.executors.celery.transport import publish_reply


def run_here(app: Any, job: str, payload: str, key: str, reply: str) -> None:
    """Run one chunk in this celery worker process and send its result to the caller's reply queue."""
    remote.run_here(job, payload, functools.partial(publish_reply, app, reply, key))
