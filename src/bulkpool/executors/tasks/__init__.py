"""The tasks executor: chunks as tasks of Django's Tasks framework, on whatever task backend
the project runs (a database queue, RQ...), applied once by the journal.

Data flow (task arguments are JSON strings; nothing is pickled):

    caller (TasksExecutor)                                   a worker of the task backend
    start()   a channel of its own in ChunkReply
    submit()  on_commit: run_chunk.using(backend, queue)    -->  bulkpool.django_tasks.run_chunk
                .enqueue(job, chunk, key, channel, db)            -> executors.remote.run_here():
                                                                  a Worker per job and process,
                                                                  starts counted in the journal
    events()  <--ChunkReply rows of the channel: started, beat, done (ChunkResult), crashed,
              refused, setup_failed (executors.tasks.mailbox), read and deleted by the caller

No reply channel of the framework is used (``get_result()``: not every backend keeps
results): the journal's database carries the messages. Enqueueing has no back-pressure, so
the chunks in flight are capped by the engine (``ahead`` per expected worker); the
framework cannot take a task back, so a stopping run leaves its queued chunks to the fence:
a chunk whose attempt ended writes nothing. Leases, poison counting and the events are
``executors.brokered``'s, shared with Celery: a worker that dies mid-chunk goes silent, its
lease expires, and the chunk is sent again under a new key (a database queue never
redelivers it; one that does meets the journal).

With the framework's ImmediateBackend the run is serial (``resolved``); the DummyBackend,
which never runs a task, is refused.
"""

from __future__ import annotations

import functools
import logging
import uuid
from typing import TYPE_CHECKING, Any

from django.db import transaction

from bulkpool.errors import ConfigurationError, WorkerStartupError
from bulkpool.executors.base import Executor
from bulkpool.executors.brokered import NOBODY_TAKES, BrokeredExecutor
from bulkpool.executors.serial import SerialExecutor
from bulkpool.executors.tasks import framework
from bulkpool.executors.tasks.mailbox import Mailbox

if TYPE_CHECKING:
    from bulkpool.options import Options
    from bulkpool.protocol import Task

logger = logging.getLogger("bulkpool")

WORKERS = "task workers"  # how the messages name them
TASK_PATH = "bulkpool.django_tasks.run_chunk"
POLL_SECONDS = 0.05  # how often the caller looks for its messages while it waits

__all__ = ["TASK_PATH", "TasksExecutor"]


class TasksExecutor(BrokeredExecutor):
    """Chunks as tasks of the task backend ``backend`` (an alias of settings.TASKS), on
    ``queue_name`` (the backend's default when None).

    ``workers``: how many workers take the queue's tasks (they are not ours to count): the
    chunks in flight are ``ahead`` per worker. ``lease``: seconds a started chunk may go
    without a heartbeat before it is sent again (``heartbeat``: how often a worker sends one).
    """

    name = "tasks"
    workers_named = WORKERS

    def __init__(
        self,
        workers: int | None = None,
        *,
        backend: str = "default",
        queue_name: str | None = None,
        lease: float = 30.0,
        heartbeat: float | None = None,
        ahead: int = 2,
        poll: float = POLL_SECONDS,
    ) -> None:
        super().__init__(workers, lease=lease, heartbeat=heartbeat, ahead=ahead)
        self.backend = backend
        self.queue_name = queue_name
        self.poll = poll

    def __repr__(self) -> str:
        where = f"backend={self.backend!r}, queue_name={self.queue_name!r}"
        return f"TasksExecutor(workers={self.workers!r}, {where})"

    def resolved(self) -> Executor:
        """Serial on the ImmediateBackend (it runs a task inside ``enqueue``, in the caller);
        refused on a backend that would never run the chunks."""
        found = framework.backend(self.backend)
        if framework.is_immediate(found):
            return SerialExecutor(self.workers)
        framework.check_backend(found, self.backend)
        return self

    # -- before the run --------------------------------------------------------------------

    def check_options(self, options: Options) -> None:
        from django.apps import apps

        if not apps.is_installed("bulkpool"):
            raise ConfigurationError(
                "The tasks backend journals every run, so that a chunk delivered twice is applied "
                'once, and its workers report through the journal\'s tables: add "bulkpool" to '
                "INSTALLED_APPS (the workers need it too) and run `python manage.py migrate bulkpool`."
            )

    def check(self, task: Task) -> None:
        super().check(task)
        try:
            self._task()  # the backend validates the task for its queue
        except Exception as error:
            raise ConfigurationError(
                f"The task backend {self.backend!r} refuses bulkpool's task: {type(error).__name__}: {error}"
            ) from error

    # -- the transport: the Tasks framework, and ChunkReply rows -------------------------------

    def start(self, task: Task, workers: int) -> None:
        self._database = task.database  # the journal's: where the workers post their messages
        super().start(task, workers)

    def _open(self) -> None:
        self._mailbox = Mailbox(self._database, uuid.uuid4().hex, self._on_reply, poll=self.poll)
        self._mailbox.open()

    def _send(self, payload: str, key: str) -> None:
        enqueue = functools.partial(
            self._task().enqueue, self._job, payload, key, self._mailbox.channel, self._database
        )
        # After the journal rows the chunk needs (its attempt) are committed: at once outside
        # a transaction, which bulkpool's callers are (a run inside one is refused).
        transaction.on_commit(functools.partial(_enqueue, enqueue, self.backend), using=self._database)

    def _drain(self, wait: float) -> None:
        self._mailbox.drain(wait)

    def _cancel(self, keys: list[str]) -> None:
        """The framework cannot take a task back: a chunk that runs after its run stopped
        meets the fence (its attempt is over) and writes nothing."""

    def _close(self) -> None:
        self._mailbox.close()

    def _untaken_hint(self) -> None:
        logger.warning(
            "No task worker has taken a chunk for %gs from task backend %r (queue %r): none runs, or "
            "all are busy. Start one (django-tasks-db: `python manage.py db_worker --backend %s "
            "--queue-name %s`). Waiting; Ctrl-C stops the run.",
            NOBODY_TAKES,
            self.backend,
            self._queue(),
            self.backend,
            self._queue(),
        )

    def _queue(self) -> str:
        return self.queue_name or framework.module("base").DEFAULT_TASK_QUEUE_NAME

    def _task(self) -> Any:
        # By its path, as Celery's send_task names its task: the module that defines it is an
        # entry point, above the executors (and importing it makes the task).
        from django.utils.module_loading import import_string

        return import_string(TASK_PATH).using(backend=self.backend, queue_name=self._queue())


def _enqueue(enqueue: Any, backend: str) -> None:
    try:
        enqueue()
    except Exception as error:  # the engine stops sending, drains what is in flight, reports
        raise WorkerStartupError(
            f"Could not enqueue a chunk on task backend {backend!r}: {type(error).__name__}: {error}"
        ) from error
