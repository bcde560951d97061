"""bulkpool's task for Django's Tasks framework: one chunk sent by ``TasksExecutor``
(``bulkpool.executors.tasks`` draws the data flow).

Its dotted path, ``bulkpool.django_tasks.run_chunk``, is what a task backend stores with
each queued chunk, so it stays put. Not ``bulkpool.tasks``: that module is Celery's, which
``app.autodiscover_tasks()`` imports in every celery worker, where the Tasks framework
need not be installed. Importing this module makes the task, which the framework checks
against the project's default task backend; only the tasks backend and its workers import it.
"""

from __future__ import annotations

import functools

from bulkpool.executors import remote
from bulkpool.executors.tasks import framework
from bulkpool.executors.tasks.mailbox import post


@framework.module().task
def run_chunk(job: str, payload: str, key: str, channel: str, database: str) -> None:
    """Run one chunk here; what happens to it goes to the caller's ``channel`` in ``database``."""
    remote.run_here(job, payload, functools.partial(post, database, channel, key))
