"""Where chunks run. Names resolve through one fixed map; an executor instance is used as is.

``celery`` and ``tasks`` are in the map as dotted paths, imported only when asked for: Celery
and Django's Tasks framework need not be installed for the other backends. An executor may
hand the run to another (``Executor.resolved``: tasks on Django's ImmediateBackend is serial).
"""

from __future__ import annotations

from typing import Any

from django.utils.module_loading import import_string

from bulkpool.executors.base import Executor
from bulkpool.executors.process import ProcessExecutor
from bulkpool.executors.serial import SerialExecutor
from bulkpool.executors.thread import ThreadExecutor
from bulkpool.protocol import ChunkDone, ChunkLost, Event

EXECUTORS: dict[str, type[Executor] | str] = {
    "serial": SerialExecutor,
    "thread": ThreadExecutor,
    "process": ProcessExecutor,
    "celery": "bulkpool.executors.celery.CeleryExecutor",
    "tasks": "bulkpool.executors.tasks.TasksExecutor",
}


def resolve(backend: Any) -> Executor:
    """An executor for ``backend``: a name from ``EXECUTORS``, or an executor instance."""
    if isinstance(backend, Executor):
        return backend.resolved()
    kind = EXECUTORS[backend]
    executor: type[Executor] = import_string(kind) if isinstance(kind, str) else kind
    return executor().resolved()


__all__ = [
    "EXECUTORS",
    "ChunkDone",
    "ChunkLost",
    "Event",
    "Executor",
    "ProcessExecutor",
    "SerialExecutor",
    "ThreadExecutor",
    "resolve",
]
