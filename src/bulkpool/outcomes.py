"""What a run gives back: an ``Outcome`` per item, a ``Failure`` per failed item, a ``Report``.

All three are plain values. A failure crosses process boundaries as text (exception class
path, message, formatted traceback), so an exception that cannot be pickled never hides
the real error.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bulkpool.errors import ITEM_ERRORS, ItemError, ItemFailed
from bulkpool.protocol import ErrorInfo

MAX_ITEM_REPR = 200
KEPT_FAILURES = 1000  # a Report keeps the first failures; the rest are counted (and in the rejects file)


def short_repr(value: Any, limit: int = MAX_ITEM_REPR) -> str:
    """``repr(value)`` cut to ``limit`` characters, and never raising."""
    try:
        text = repr(value)
    except Exception as error:  # a broken __repr__ must not hide the real failure
        text = f"<unrepresentable {type(value).__name__}: {error!r}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Failure:
    """One item that failed: where it was in the input, what it was, and what went wrong."""

    index: int
    item: Any
    exc_type: str
    message: str
    traceback: str
    unsafe: bool = False  # it may have been written all the same: do not feed it again blindly
    line: int | None = None  # the line of the input file the item started on, when known

    @classmethod
    def of(cls, index: int, item: Any, error: ErrorInfo, line: int | None = None) -> Failure:
        return cls(index, item, error.exc_type, error.message, error.traceback, error.unsafe, line)

    @property
    def kind(self) -> type[ItemError] | None:
        """bulkpool's own kind of failure (``CommitUnknown``, ``WorkerDied``, ``NotRun``), else None."""
        return ITEM_ERRORS.get(self.exc_type)

    @property
    def exception(self) -> ItemError | None:
        """This failure as an instance of bulkpool's own kind, for ``isinstance``; None for
        errors raised by the function (their class lives in the worker: see ``exc_type``)."""
        kind = self.kind
        return kind(self.message) if kind is not None else None

    def summary(self) -> str:
        where = f"item {self.index}" if self.line is None else f"line {self.line} (item {self.index})"
        return f"{where} ({short_repr(self.item, 80)}): {self.exc_type}: {self.message}"

    def __str__(self) -> str:
        return self.summary()


def _keep_in_input_order(kept: list[Failure], failure: Failure) -> bool:
    """Insert ``failure`` by its index (chunks finish in any order), keeping the first
    ``KEPT_FAILURES``; True if one was left out."""
    if len(kept) >= KEPT_FAILURES and failure.index >= kept[-1].index:
        return True
    bisect.insort(kept, failure, key=lambda kept_failure: kept_failure.index)
    if len(kept) > KEPT_FAILURES:
        kept.pop()
        return True
    return False


@dataclass(frozen=True)
class Outcome:
    """The result of one item, as yielded by ``imap``: ``value`` on success, else ``error``."""

    index: int
    item: Any
    value: Any = None
    error: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Report:
    """What a run did. Built up as chunks finish; final once ``run`` returns.

    ``failures`` keeps the first ``KEPT_FAILURES`` failures in input order, whatever order
    their chunks finished in (``failures_left_out`` counts the rest; every one is in the
    rejects file and the journal); ``failure_counts`` counts
    them all by exception type. ``failed_before``: of ``failed``, the items that failed in
    an earlier attempt of a journaled run (reported again, not run again). ``callback_errors``
    are ``on_commit`` callbacks that raised after their item was written.
    """

    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    retried: int = 0
    elapsed: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    results: list[Any] | None = None
    interrupted: bool = False
    stopped_early: str = ""
    failed_before: int = 0
    failures_left_out: int = 0
    failure_counts: Counter[str] = field(default_factory=Counter)
    callback_errors: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the run chose, and why
    created: int | None = None  # upsert: of ok, the rows that created their object
    updated: int | None = None  # upsert: of ok, the rows that updated an existing one

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def not_run(self) -> int:
        return max(self.total - self.done, 0)

    @property
    def rate(self) -> float:
        """Items per second, counting those that ran (ok or failed)."""
        ran = self.ok + self.failed - self.failed_before
        return ran / self.elapsed if self.elapsed > 0 else 0.0

    def add_failure(self, failure: Failure, *, earlier: bool = False) -> None:
        self.failed += 1
        self.failed_before += earlier
        self.failure_counts[failure.exc_type] += 1
        if _keep_in_input_order(self.failures, failure):
            self.failures_left_out += 1

    def add_callback_error(self, failure: Failure) -> None:
        _keep_in_input_order(self.callback_errors, failure)

    def raise_for_failures(self) -> None:
        """Raise ``ItemFailed`` for the first failure, if any item failed."""
        if self.failures:
            raise ItemFailed(self.failures[0], self)

    def __str__(self) -> str:
        failed = f"{self.failed:,} failed"
        if self.failed_before:
            failed += f" ({self.failed_before:,} in earlier attempts)"
        ok = f"{self.ok:,} ok"
        if self.created is not None and self.updated is not None:
            ok += f" ({self.created:,} created, {self.updated:,} updated)"
        parts = [ok, failed]
        if self.skipped:
            parts.append(f"{self.skipped:,} skipped (already done)")
        if self.not_run:
            parts.append(f"{self.not_run:,} not run")
        if self.retried:
            parts.append(f"{self.retried:,} retried")
        lines = [
            f"bulkpool: {self.total:,} items: {', '.join(parts)} "
            f"in {self.elapsed:.1f}s ({self.rate:,.0f} items/s)"
        ]
        lines += self.notes
        if self.stopped_early:
            lines.append(f"Stopped early: {self.stopped_early}")
        if len(self.failure_counts) > 1 or self.failures_left_out:
            counts = ", ".join(f"{n:,} {kind}" for kind, n in self.failure_counts.most_common())
            lines.append(f"Failures by type: {counts}")
        shown = self.failures[:10]
        for failure in shown:
            lines.append(f"  - {failure.summary()}")
        if self.failed > len(shown):
            lines.append(f"  ... and {self.failed - len(shown):,} more failures")
        if self.failures_left_out:
            lines.append(
                f"  (this report keeps the first {KEPT_FAILURES:,}; the rejects file and journal have all)"
            )
        if self.callback_errors:
            lines.append(
                f"{len(self.callback_errors):,} on_commit callbacks raised after their items were "
                "written (the items count as ok):"
            )
            lines += [f"  - {failure.summary()}" for failure in self.callback_errors[:5]]
        return "\n".join(lines)
