"""Task backends for the tasks executor's tests on every leg, where no queue runs:
``Recording`` keeps what is enqueued and runs nothing; ``Threaded`` runs each task on a
thread of this process (two threads, as two workers), through bulkpool's task and its
messages."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bulkpool.executors.tasks import framework

BaseTaskBackend: Any = framework.module("backends.base").BaseTaskBackend


class Recording(BaseTaskBackend):
    enqueued: list[tuple[Any, tuple[Any, ...]]] = []

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> None:
        type(self).enqueued.append((task, tuple(args)))


class Threaded(BaseTaskBackend):
    enqueued: list[tuple[Any, tuple[Any, ...]]] = []

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> None:
        type(self).enqueued.append((task, tuple(args)))
        _threads.submit(_run, task, tuple(args))


_threads = ThreadPoolExecutor(2, thread_name_prefix="task-worker")


def _run(task: Any, args: tuple[Any, ...]) -> None:
    from django.db import connections

    try:
        task.call(*args)
    finally:
        connections.close_all()  # as db_worker does between tasks (CONN_MAX_AGE = 0)
