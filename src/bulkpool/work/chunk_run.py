"""One chunk's run: the state that lives only while ``Worker.run(chunk)`` runs.

``Worker.run`` makes a ``ChunkRun`` for the chunk, hands it to the policy for the task's
``atomic`` (``OneTransaction`` or ``ItemByItem``), and drops it when it returns, so two
threads running chunks on one Worker share nothing that changes.

    policy --begin(offsets)--> the offsets of the transaction about to run
    transaction --about_to_commit()--> committing (a crash from now on leaves them in doubt)
    policy --settle(piece, local)--> the piece's outcome, keyed by offset in the chunk
    each_item policy --item_settled(offset)--> ``progress``: that item's outcome, at once
    Worker.run --crashed(error)--> the offsets not settled fail (in doubt if committing)
    Worker.run <--finish()-- the ChunkResult, with its timings
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from bulkpool.errors import CommitUnknown
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo
from bulkpool.work.calling import Calls, ItemCaller
from bulkpool.work.inputs import Inputs
from bulkpool.work.timing import Stopwatch

# Told of each item of an each_item chunk as it settles: (offset, its error or None, its value).
Progress = Callable[[int, ErrorInfo | None, Any], None]


class ChunkRun:
    """The chunk's result as its pieces settle, and what a crash of ours would leave in doubt.

    ``failed_before``: the items that failed once, by input index, so that no redo, retry
    or split runs them twice. ``committing``: True from just before the chunk's (first)
    COMMIT, so an executor that sees ``run()`` die knows the chunk may have committed.
    """

    def __init__(
        self,
        calls: Calls,
        chunk: Chunk,
        *,
        before_commit: Callable[[], None] | None,
        progress: Progress | None = None,
        warming: bool = False,
    ) -> None:
        self.calls = calls
        self.task = calls.task
        self.chunk = chunk
        self.clock = Stopwatch(warming=warming)
        self.inputs = Inputs(calls, chunk, self.clock)
        self.caller = ItemCaller(calls, self.clock)
        self.result = ChunkResult(chunk.number, [None] * len(chunk) if self.task.keep_values else None)
        self.failed_before: dict[int, ErrorInfo] = {}
        self.committing = False
        self._before_commit = before_commit
        self._progress = progress
        self._settled: set[int] = set()
        # The offsets of the latest transaction, and whether it has begun to COMMIT.
        self._current = range(0)
        self._in_commit = False

    def where(self) -> dict[str, Any]:
        """Where a ``Retry`` reconnects."""
        return {"database": self.task.database, "own_connection": self.task.own_connections}

    def offsets(self, piece: Chunk) -> range:
        """The offsets in the chunk of ``piece`` (the chunk, or a part of it)."""
        base = piece.start - self.chunk.start
        return range(base, base + len(piece))

    def begin(self, offsets: range) -> None:
        """A transaction over these offsets (a piece of the chunk, or one item) opens."""
        self._current, self._in_commit = offsets, False

    def about_to_commit(self) -> None:
        """The transaction's ``before_commit`` hook."""
        self.committing = True
        if self._before_commit is not None:
            self._before_commit()  # if this raises, COMMIT never runs: nothing in doubt
        self._in_commit = True

    def settle(self, piece: Chunk, local: ChunkResult) -> None:
        """Put a finished piece's outcome into the chunk's result, keyed by offset in the chunk."""
        offsets = self.offsets(piece)
        base, result = offsets.start, self.result
        for offset, error in local.errors.items():
            result.errors[base + offset] = error
        for offset, error in local.callback_errors.items():
            result.callback_errors[base + offset] = error
        if result.values is not None and local.values is not None:
            result.values[offsets.start : offsets.stop] = local.values
        self._settled.update(offsets)

    def settle_offsets(self, offsets: Iterable[int]) -> None:
        """Offsets whose outcome is already in ``result`` (atomic="item" and False)."""
        self._settled.update(offsets)

    def item_settled(self, offset: int) -> None:
        """An item of an ``each_item`` chunk is settled: committed with its journal row, or failed."""
        if self._progress is not None:
            value = self.result.values[offset] if self.result.values is not None else None
            self._progress(offset, self.result.errors.get(offset), value)

    def crashed(self, error: BaseException) -> None:
        """Something outside any item broke: the items not settled yet fail with it -- or,
        if it broke during their COMMIT, with CommitUnknown: they may have been written."""
        info = ErrorInfo.from_exception(error)
        unsettled = [offset for offset in range(len(self.chunk)) if offset not in self._settled]
        in_doubt = [offset for offset in unsettled if self._in_commit and offset in self._current]
        commit_unknown(self.result, in_doubt, error)
        for offset in unsettled:
            self.result.errors.setdefault(offset, info)
            if self.result.values is not None:
                self.result.values[offset] = None

    def finish(self) -> ChunkResult:
        self.committing = False
        self.result.timings = self.clock.timings()
        return self.result


def commit_unknown(result: ChunkResult, offsets: Iterable[int], error: BaseException) -> ChunkResult:
    """Fail the items whose COMMIT was in doubt (those that failed on their own keep their error)."""
    unknown = ErrorInfo.of_kind(
        CommitUnknown,
        f"the connection was lost during COMMIT ({type(error).__name__}: {error}), so whether "
        "this item was written is unknown; it was not run again, so that it cannot be written "
        "twice. Check it, or use run_id=..., with which bulkpool finds out and resumes exactly",
        ErrorInfo.from_exception(error).traceback,
    )
    for offset in offsets:
        result.errors.setdefault(offset, unknown)
    return result
