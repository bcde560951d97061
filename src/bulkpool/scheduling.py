"""The scheduling policy of a run, as pure code: fed events, it returns decisions.

It knows nothing of processes, databases or the input; the engine does the I/O and asks:

    may_send()         may another chunk go out (fewer than ``capacity`` in flight)?
    may_read()         and may fresh input be read for it (the window for ordered output)?
    again(chunks)      queue chunks to send again; next_again() takes them before fresh input
    sent(chunk)        a chunk went out
    finished(c, r)     a chunk came back (or was settled without running, like a chunk the
                       journal says is done); returns the chunks whose results may be
                       released now: all of them, or for ordered output those in input order
    lost(event)        a chunk did not come back; returns what to do with it

The window: at most ``capacity`` chunks in flight, and for ordered output at most
``2 * capacity`` chunks in flight or waiting for an earlier one, so memory stays flat.

Lost chunks (their worker died): the chunk's transaction rolled back with the worker, so
it is sent again, up to ``retries`` times; then it is split in halves, and a half that is
lost again is split again at once, so an item that kills every worker it touches is found
in a few steps and fails alone (``WorkerDied``) while its chunk-mates are written. A chunk
lost during COMMIT (``in_doubt``) may have committed: it is sent again only when the
journal lets the worker tell (``journaled``); otherwise its items fail ``CommitUnknown``.
A chunk of ``each_item`` transactions comes back with the items its worker settled before
it was lost (``settled_apart``): those are done, and only the rest is lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from bulkpool.errors import CommitUnknown, WorkerDied
from bulkpool.protocol import Chunk, ChunkLost, ChunkResult, ErrorInfo


@dataclass(frozen=True)
class SendAgain:
    """Send these chunks again (the lost chunk, or its halves): ``Scheduler.again()`` them."""

    chunks: tuple[Chunk, ...]
    retried: int  # items sent again


@dataclass(frozen=True)
class Fail:
    """Give up on the chunk: its items fail with ``result.errors``."""

    result: ChunkResult
    record: bool  # a journal should record these failures, so a resume does not run them again


@dataclass(frozen=True)
class Drop:
    """No more work goes out (the run is stopping): the chunk stays not run."""


Decision = SendAgain | Fail | Drop


@dataclass
class Scheduler:
    capacity: int
    retries: int
    atomic: object = "chunk"
    journaled: bool = False
    ordered: bool = False
    in_flight: int = 0
    stopping: bool = False  # set by the engine: nothing more is sent, lost chunks are dropped
    worked: bool = False  # a worker ran a chunk (it came back done)
    _again: list[Chunk] = field(default_factory=list)
    _losses: dict[tuple[int, int], int] = field(default_factory=dict)
    _pieces: set[tuple[int, int]] = field(default_factory=set)
    _waiting: dict[int, tuple[Chunk, ChunkResult]] = field(default_factory=dict)
    _next_start: int = 0

    def may_send(self) -> bool:
        return not self.stopping and self.in_flight < self.capacity

    def may_read(self) -> bool:
        """Fresh input only within the window; chunks sent again and pieces already planned
        always may go: an earlier one may be what the waiting results wait for."""
        return self.may_send() and self.in_flight + len(self._waiting) < 2 * self.capacity

    def again(self, chunks: Iterable[Chunk]) -> None:
        self._again.extend(reversed(list(chunks)))  # popped from the end: in input order

    def next_again(self) -> Chunk | None:
        return self._again.pop() if self._again else None

    def sent(self, chunk: Chunk) -> None:
        self.in_flight += 1

    def settled(self, chunk: Chunk, result: ChunkResult) -> list[tuple[Chunk, ChunkResult]]:
        """A chunk with a result that never went out (journal: done; executor: could not send)."""
        return self._release(chunk, result)

    def finished(self, chunk: Chunk, result: ChunkResult) -> list[tuple[Chunk, ChunkResult]]:
        self.in_flight -= 1
        self.worked = True
        return self._release(chunk, result)

    def lost(self, event: ChunkLost) -> Decision:
        self.in_flight -= 1
        chunk = event.chunk
        if not chunk.items:  # an each_item chunk whose worker settled every item, then died
            return Drop()
        if not event.started:  # queued behind the chunk that killed its worker: not its fault
            return Drop() if self.stopping else SendAgain((chunk,), 0)
        key = (chunk.start, len(chunk))
        losses = self._losses[key] = self._losses.get(key, 0) + 1
        if event.in_doubt and not self.journaled:
            return self._fail(chunk, _commit_unknown(event), record=False)
        if self.stopping:
            return Drop()
        if self.atomic != "chunk":
            message = (
                f"{event.reason}; with atomic={self.atomic!r} some items of this chunk may have "
                "been written, so it was not run again"
            )
            return self._fail(
                chunk, ErrorInfo.of_kind(WorkerDied, message, event.traceback, unsafe=True), False
            )
        piece = key in self._pieces  # split off a chunk that kept losing workers: suspect
        if not piece and losses <= self.retries:
            return self._again_with((chunk,))
        if len(chunk) == 1:
            message = f"{event.reason} while running this item, {losses} times"
            if piece:
                message = f"{event.reason} while running this item alone, after its chunk lost workers"
            return self._fail(chunk, ErrorInfo.of_kind(WorkerDied, message, event.traceback), record=True)
        halves = chunk.halves()
        self._pieces.update((half.start, len(half)) for half in halves)
        return self._again_with(halves)

    def flush(self) -> list[tuple[Chunk, ChunkResult]]:
        """The results still waiting for an earlier chunk that will not come (the run stopped)."""
        waiting = [self._waiting.pop(start) for start in sorted(self._waiting)]
        return waiting

    def _again_with(self, chunks: tuple[Chunk, ...]) -> SendAgain:
        return SendAgain(chunks, sum(len(c) for c in chunks))

    def _fail(self, chunk: Chunk, error: ErrorInfo, record: bool) -> Fail:
        return Fail(ChunkResult(chunk.number, None, dict.fromkeys(range(len(chunk)), error)), record)

    def _release(self, chunk: Chunk, result: ChunkResult) -> list[tuple[Chunk, ChunkResult]]:
        if not self.ordered:
            return [(chunk, result)]
        self._waiting[chunk.start] = (chunk, result)
        released = []
        while self._next_start in self._waiting:
            chunk, result = self._waiting.pop(self._next_start)
            self._next_start = chunk.end
            released.append((chunk, result))
        return released


def settled_apart(event: ChunkLost, *, journaled: bool) -> tuple[list[tuple[Chunk, ChunkResult]], ChunkLost]:
    """A lost chunk of ``each_item`` transactions, taken apart: the items its worker settled
    before it was lost are done, as it said (each committed with its journal row, or
    failed); without a journal, the one it died committing is in doubt and fails alone, and
    the items after it never ran. Returns those settled pieces, and what is left lost."""
    chunk, done = event.chunk, []
    cut = chunk.start
    if event.settled is not None and event.settled.values is not None:
        cut += len(event.settled.values)
        done.append((chunk.piece(chunk.start, cut), event.settled))
    rest = replace(event, chunk=chunk.piece(cut, chunk.end), settled=None)
    if rest.in_doubt and not journaled and rest.chunk.items:
        error = _commit_unknown(event)
        done.append((chunk.piece(cut, cut + 1), ChunkResult(chunk.number, None, {0: error})))
        rest = replace(rest, chunk=chunk.piece(cut + 1, chunk.end), in_doubt=False, started=False)
    return done, rest


def _commit_unknown(event: ChunkLost) -> ErrorInfo:
    return ErrorInfo.of_kind(
        CommitUnknown,
        f"{event.reason}, once its chunk's COMMIT had begun: whether this item was written is "
        "unknown; it was not run again, so that it cannot be written twice. Check it, or use "
        "run_id=..., with which bulkpool finds out and resumes exactly",
        event.traceback,
    )
