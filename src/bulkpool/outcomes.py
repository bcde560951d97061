"""What a run gives back: an ``Outcome`` per item, a ``Failure`` per failed item, a ``Report``.

All three are plain values. A failure crosses process boundaries as text (exception class
path, message, formatted traceback), so an exception that cannot be pickled never hides
the real error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bulkpool.protocol import ErrorInfo

MAX_ITEM_REPR = 200


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

    @classmethod
    def of(cls, index: int, item: Any, error: ErrorInfo) -> Failure:
        return cls(index, item, error.exc_type, error.message, error.traceback)

    def summary(self) -> str:
        return f"item {self.index} ({short_repr(self.item, 80)}): {self.exc_type}: {self.message}"

    def __str__(self) -> str:
        return self.summary()


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
    """What a run did. Built up as chunks finish; final once ``run`` returns."""

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

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped

    @property
    def not_run(self) -> int:
        return max(self.total - self.done, 0)

    @property
    def rate(self) -> float:
        """Items per second, counting those that ran (ok or failed)."""
        ran = self.ok + self.failed
        return ran / self.elapsed if self.elapsed > 0 else 0.0

    def raise_for_failures(self) -> None:
        """Raise ``ItemFailed`` for the first failure, if any item failed."""
        from bulkpool.errors import ItemFailed

        if self.failures:
            raise ItemFailed(self.failures[0], self)

    def __str__(self) -> str:
        parts = [f"{self.ok:,} ok", f"{self.failed:,} failed"]
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
        if self.stopped_early:
            lines.append(f"Stopped early: {self.stopped_early}")
        shown = self.failures[:10]
        for failure in shown:
            lines.append(f"  - {failure.summary()}")
        if len(self.failures) > len(shown):
            lines.append(f"  ... and {len(self.failures) - len(shown):,} more failures")
        return "\n".join(lines)
