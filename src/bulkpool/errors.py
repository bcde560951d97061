"""Every error bulkpool raises. (Which database errors are worth retrying: ``retrying.py``.)

    BulkpoolError
    ├── ConfigurationError      bad options or a setup the run cannot work in (also
    │   │                       Django's ImproperlyConfigured); raised before item one
    │   └── RunInProgress       the run_id is held by a live run (another caller)
    ├── WorkerStartupError      a worker could not start; carries the worker's traceback
    ├── InputError              an input file cannot be read (missing, unparsable line N);
    │                           names the file and the place, and says how to fix it
    ├── RunAborted              the run stopped before every item ran; carries the partial
    │   │                       ``report``. Raised after the chunks in flight came back.
    │   ├── ItemFailed          on_error="raise" and an item failed
    │   ├── TooManyFailures     max_failures items failed
    │   ├── InputFailed         the input raised mid-run (its error is the ``__cause__``)
    │   ├── ResumeRefused       a journaled run was fed other input than before (also a
    │   │                       ConfigurationError)
    │   └── WorkersLost         a dead worker could not be replaced
    └── ItemError               the kinds of failure bulkpool itself gives an item, named
        │                       in ``Failure.exc_type`` as ``bulkpool.<Name>``
        ├── CommitUnknown       its worker's connection was lost during COMMIT
        ├── WorkerDied          its worker died while running it, every time
        └── NotRun              it could not be sent to a worker

    RunInterrupted              Ctrl-C or SIGTERM stopped the run; carries the ``report``.
                                A KeyboardInterrupt, not a BulkpoolError, so that an
                                ``except Exception:`` in the caller does not swallow Ctrl-C.

Errors raised by the user's function are never raised as themselves: they become a
``Failure`` in the report (or the cause of ``ItemFailed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from bulkpool.outcomes import Failure, Report


class BulkpoolError(Exception):
    """Base class of every error raised by bulkpool."""


class ConfigurationError(BulkpoolError, ImproperlyConfigured):
    """The options, the function or the environment cannot make a working run."""


class RunInProgress(ConfigurationError):
    """Another caller is running this ``run_id`` now (its lease on the run holds)."""


class WorkerStartupError(BulkpoolError):
    """A worker failed before it could run any item; ``worker_traceback`` says why."""

    def __init__(self, message: str, worker_traceback: str = "") -> None:
        super().__init__(message + (f"\n\nWorker traceback:\n{worker_traceback}" if worker_traceback else ""))
        self.worker_traceback = worker_traceback


class InputError(BulkpoolError):
    """An input file (``bulkpool.inputs``) is missing or cannot be parsed.

    ``path`` is the file (``"-"`` for stdin) and ``line`` the 1-based line of the problem,
    when there is one. The message names both and says how to fix it.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class RunAborted(BulkpoolError):
    """The run stopped before every item ran; ``report`` says what was done."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(f"{message}\n\n{report}")
        self.report = report


class ItemFailed(RunAborted):
    """An item failed and ``on_error="raise"`` was asked for."""

    def __init__(self, failure: Failure, report: Report) -> None:
        super().__init__(f"Stopped at the first failure (on_error='raise'): {failure.summary()}", report)
        self.failure = failure


class TooManyFailures(RunAborted):
    """``max_failures`` items failed, so no more work was sent."""


class InputFailed(RunAborted):
    """Reading the input raised; the chunks read before it ran. The error is ``__cause__``."""


class ResumeRefused(RunAborted, ConfigurationError):
    """A journaled run's input is not the input its ``run_id`` committed before."""


class WorkersLost(RunAborted):
    """A worker died and no new one could be started in its place."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after the chunks in flight came back (or were
    abandoned, at a second one); ``report`` says what was done."""

    def __init__(self, message: str, report: Report) -> None:
        super().__init__(f"{message}\n\n{report}")
        self.report = report


class ItemError(BulkpoolError):
    """A failure that bulkpool gives an item itself (``Failure.exc_type`` is ``bulkpool.<Name>``).

    ``unsafe``: the item may have been written all the same, so it is not fed again blindly.
    """

    unsafe = False


class CommitUnknown(ItemError):
    """The item's worker lost its connection during COMMIT: it may or may not be written."""

    unsafe = True


class WorkerDied(ItemError):
    """The item's worker died while running it, every time it was tried."""


class NotRun(ItemError):
    """The item could not be sent to a worker (it cannot be pickled or encoded), so it never ran."""


ITEM_ERRORS: dict[str, type[ItemError]] = {
    f"bulkpool.{kind.__name__}": kind for kind in (CommitUnknown, WorkerDied, NotRun)
}
