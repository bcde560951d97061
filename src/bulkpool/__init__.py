"""django-bulkpool: per-object Django ORM work with full model semantics, run concurrently.

Entry points:

    bulkpool.run(func, items, **options) -> Report
    bulkpool.imap(func, items, *, ordered=True, **options) -> Iterator[Outcome]
    bulkpool.create(model, rows, *, validate=False, **options) -> Report
    bulkpool.update(queryset, func=None, *, values=None, update_fields=None, **options) -> Report
    bulkpool.delete(queryset, **options) -> Report
    bulkpool.open_input(path) -> the items of a CSV, JSON Lines or JSON file, read lazily

``items`` may be a QuerySet: it is split by primary key and each worker loads its own rows.

Executors: ``backend="serial" | "thread" | "process"``, or an instance such as
``ProcessExecutor(start_method="spawn")``. Errors derive from ``BulkpoolError``.
"""

import importlib.metadata as _metadata

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
    RunInterrupted,
    TooManyFailures,
    WorkerDied,
    WorkersLost,
    WorkerStartupError,
)
from bulkpool.executors import ProcessExecutor, SerialExecutor, ThreadExecutor
from bulkpool.inputs import open_input
from bulkpool.operations import create, delete, update
from bulkpool.options import Options
from bulkpool.outcomes import Failure, Outcome, Report

try:
    __version__ = _metadata.version("django-bulkpool")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BulkpoolError",
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
    "RunInterrupted",
    "SerialExecutor",
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
]
