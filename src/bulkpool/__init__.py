"""django-bulkpool: per-object Django ORM work with full model semantics, run concurrently.

Entry points:

    bulkpool.run(func, items, **options) -> Report
    bulkpool.imap(func, items, *, ordered=True, **options) -> Iterator[Outcome]
    bulkpool.create(model, rows, *, validate=False, **options) -> Report
    bulkpool.update(queryset, func=None, *, values=None, update_fields=None, **options) -> Report
    bulkpool.delete(queryset, **options) -> Report
    bulkpool.upsert(model, rows, *, unique_fields, update_fields=None, **options) -> Report
    bulkpool.open_input(path) -> the items of a CSV, JSON Lines or JSON file, read lazily

``items`` may be a QuerySet: it is split by primary key and each worker loads its own rows.

Executors: ``backend="serial" | "thread" | "process" | "celery" | "tasks"``, or an instance such
as ``ProcessExecutor(start_method="spawn")``, ``CeleryExecutor(app=..., queue=...)`` or
``TasksExecutor(backend="default", queue_name=None)`` (imported only when used: Celery and
Django's Tasks framework are optional dependencies). Errors derive from ``BulkpoolError``.
"""

import importlib as _importlib
import importlib.metadata as _metadata
import typing as _typing

from bulkpool.api import Outcomes, imap, run
from bulkpool.errors import (
    BulkpoolError,
    CommitUnknown,
    ConfigurationError,
    InputError,
    InputFailed,
    ItemError,
    ItemFailed,
    NotRun,
    ResumeRefused,
    RunAborted,
    RunInProgress,
    RunInterrupted,
    TooManyFailures,
    WorkerDied,
    WorkersLost,
    WorkerStartupError,
)
from bulkpool.executors import ProcessExecutor, SerialExecutor, ThreadExecutor
from bulkpool.inputs import open_input
from bulkpool.operations import create, delete, update, upsert
from bulkpool.options import Options
from bulkpool.outcomes import Failure, Outcome, Report

if _typing.TYPE_CHECKING:
    from bulkpool.executors.celery import CeleryExecutor
    from bulkpool.executors.tasks import TasksExecutor

# Public names imported when first used, so that their optional dependencies stay optional.
_LAZY = {"CeleryExecutor": "bulkpool.executors.celery", "TasksExecutor": "bulkpool.executors.tasks"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bulkpool' has no attribute {name!r}")


try:
    __version__ = _metadata.version("django-bulkpool")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BulkpoolError",
    "CeleryExecutor",
    "CommitUnknown",
    "ConfigurationError",
    "Failure",
    "InputError",
    "InputFailed",
    "ItemError",
    "ItemFailed",
    "NotRun",
    "Options",
    "Outcome",
    "Outcomes",
    "ProcessExecutor",
    "Report",
    "ResumeRefused",
    "RunAborted",
    "RunInProgress",
    "RunInterrupted",
    "SerialExecutor",
    "TasksExecutor",
    "ThreadExecutor",
    "TooManyFailures",
    "WorkerDied",
    "WorkerStartupError",
    "WorkersLost",
    "create",
    "delete",
    "imap",
    "open_input",
    "run",
    "update",
    "upsert",
]
