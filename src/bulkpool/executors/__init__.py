"""Where chunks run. Names resolve through one fixed map; an executor instance is used as is."""

from __future__ import annotations

from typing import Any

from bulkpool.executors.base import Executor
from bulkpool.executors.process import ProcessExecutor
from bulkpool.executors.serial import SerialExecutor
from bulkpool.executors.thread import ThreadExecutor
from bulkpool.protocol import ChunkDone, ChunkLost, Event

EXECUTORS: dict[str, type[Executor]] = {
    "serial": SerialExecutor,
    "thread": ThreadExecutor,
    "process": ProcessExecutor,
}


def resolve(backend: Any) -> Executor:
    """An executor for ``backend``: a name from ``EXECUTORS``, or an executor instance."""
    if isinstance(backend, Executor):
        return backend
    return EXECUTORS[backend]()


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
