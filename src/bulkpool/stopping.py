"""When a run stops, and why: the stop policy, apart from the engine that drives the run.

The engine tells it what happened, and asks whether that stops the run:

    after(chunk, result, first)    a chunk's result was recorded (``first``: its first new
                                   failure): ``on_error="raise"``, ``max_failures``, and the
                                   early stop when the first items all fail alike
    interrupted / input_failed /   the other ways a run ends: Ctrl-C or SIGTERM, the input
    input_holds_lock /             raising, holding SQLite's read lock or not being the
    input_refused / workers_lost / journal's, a worker that cannot be replaced, an imap
    consumer_stopped / crashed     consumer that stopped, bulkpool failing

Each answer is a ``Stop``; ``decide`` keeps the first one (the first reason to stop wins),
and at the end ``conclude()`` gives the status the journal records and ``error`` the one exception,
carrying the partial report, that the run raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bulkpool.errors import (
    InputError,
    InputFailed,
    ItemFailed,
    ResumeRefused,
    RunInterrupted,
    TooManyFailures,
    WorkersLost,
    WorkerStartupError,
)
from bulkpool.journal import RunStatus as Status
from bulkpool.options import EARLY_STOP_AFTER, Options
from bulkpool.outcomes import Failure, Report
from bulkpool.protocol import Chunk, ChunkResult


@dataclass(frozen=True)
class Stop:
    """Why no more work goes out, and the exception that says so once the work in flight is in."""

    reason: str
    status: str  # the journal's Run.Status
    error: Callable[[Report], BaseException] | None  # None: end quietly (an imap consumer that stopped)
    refused: bool = False  # the input is not the journal's: if nothing was sent, change nothing


class StopPolicy:
    """Whether what happened stops the run; the first reason to stop wins."""

    def __init__(self, options: Options, report: Report) -> None:
        self.on_error = options.on_error
        self.max_failures = options.max_failures
        self.report = report
        self.stop: Stop | None = None
        # The errors seen while every item failed (None: early_stop is off, or an item went well).
        self._alike: set[tuple[str, str]] | None = set() if options.early_stop else None
        self._alike_failed = 0

    def decide(self, stop: Stop | None) -> bool:
        """Keep ``stop`` if it is the first; True when the run stops now, for the first time."""
        if stop is None or self.stop is not None:
            return False
        self.stop = stop
        self.report.stopped_early = stop.reason
        return True

    @property
    def refused(self) -> bool:
        """The run stopped because the input is not the journal's."""
        return self.stop is not None and self.stop.refused

    def conclude(self) -> str:
        """The run is over: the report says whether it was interrupted, and the status for the
        journal is returned (``finished`` only when every item ran)."""
        status = self.stop.status if self.stop is not None else Status.FINISHED
        if status == Status.FINISHED and self.report.not_run:
            status = Status.STOPPED
        self.report.interrupted = status == Status.INTERRUPTED
        return status

    def error(self) -> BaseException | None:
        """The exception the run ends with, or None when it ends quietly."""
        if self.stop is None or self.stop.error is None:
            return None
        return self.stop.error(self.report)

    # -- what a recorded chunk says ----------------------------------------------------------

    def after(self, chunk: Chunk, result: ChunkResult, first: Failure | None) -> Stop | None:
        """A chunk's result was recorded; ``first``: its first failure that ran in this attempt."""
        stop = self._for_failures(first) if first is not None else None
        alike = self._if_every_item_fails_alike(chunk, result) if not result.skipped else None
        return stop or alike

    def _for_failures(self, first: Failure) -> Stop | None:
        report = self.report
        if self.on_error == "raise":
            return Stop("an item failed (on_error='raise')", Status.STOPPED, lambda r: ItemFailed(first, r))
        failed = report.failed - report.failed_before
        if self.max_failures is None or failed < self.max_failures:
            return None
        return Stop(
            f"{failed:,} items failed (max_failures={self.max_failures})",
            Status.STOPPED,
            lambda r: TooManyFailures(f"Stopped after {r.failed - r.failed_before:,} failures.", r),
        )

    def _if_every_item_fails_alike(self, chunk: Chunk, result: ChunkResult) -> Stop | None:
        """The first items all failing with one error is a mistake in the function or the
        columns, not in the data: stop, rather than fail every item of the input."""
        seen = self._alike
        if seen is None:
            return None
        if len(result.errors) < len(chunk):  # an item went well: it is the data that fails
            self._alike = None
            return None
        if any(error.exc_type.startswith("bulkpool.") for error in result.errors.values()):
            return None  # bulkpool's own (a lost worker, an unreadable line): no sign of a mistake
        seen.update((error.exc_type, error.message) for error in result.errors.values())
        self._alike_failed += len(result.errors)
        if len(seen) > 1:
            self._alike = None
            return None
        if self._alike_failed < EARLY_STOP_AFTER:
            return None
        ((exc_type, message),) = seen
        self._alike = None
        return Stop(
            f"the first {EARLY_STOP_AFTER:,} items all failed with {exc_type}: {message}",
            Status.STOPPED,
            lambda r: TooManyFailures(
                f"The first {EARLY_STOP_AFTER:,} items all failed with the same error "
                f"({exc_type}: {message}): this looks like a mistake in the function or the "
                "columns, not in the data. Fix it and run again, or pass early_stop=False "
                "(--no-early-stop) to run every item anyway.",
                r,
            ),
        )


# -- the other ways a run stops ------------------------------------------------------------


def interrupted(received: str) -> Stop:
    return Stop(
        f"interrupted ({received})",
        Status.INTERRUPTED,
        lambda r: RunInterrupted(f"Interrupted ({received}).", r),
    )


def input_failed(error: Exception) -> Stop:
    def raise_it(report: Report) -> BaseException:
        failed = InputFailed(f"Reading the input failed: {type(error).__name__}: {error}", report)
        failed.__cause__ = error
        return failed

    if isinstance(error, InputError):
        reason = f"bad input at line {error.line or '?'} of {error.path}"
    else:
        reason = f"the input raised {type(error).__name__}: {error}"
    return Stop(reason, Status.STOPPED, raise_it)


def input_holds_lock(explanation: str) -> Stop:
    """Reading the input left a read open that keeps the workers from committing (SQLite)."""
    message = f"The input cannot be read while the run writes: {explanation}."
    return Stop("the input holds SQLite's read lock", Status.STOPPED, lambda r: InputFailed(message, r))


def input_refused(message: str) -> Stop:
    """The journal says the input is not the one it recorded."""
    return Stop(message, Status.STOPPED, lambda r: ResumeRefused(message, r), refused=True)


def workers_lost(error: WorkerStartupError) -> Stop:
    def raise_it(report: Report) -> BaseException:
        lost = WorkersLost(f"A worker died and none could be started in its place: {error}", report)
        lost.__cause__ = error
        return lost

    return Stop("a worker died and none could be started in its place", Status.STOPPED, raise_it)


def consumer_stopped() -> Stop:
    return Stop("the caller stopped reading the outcomes", Status.STOPPED, None)


def crashed() -> Stop:
    """bulkpool itself failed: its exception goes on up as it is."""
    return Stop("bulkpool itself failed", Status.STOPPED, None)
