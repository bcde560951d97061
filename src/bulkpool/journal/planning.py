"""Planning a journaled run's chunks around what its earlier attempts recorded.

The engine reads the input a chunk at a time and asks, for each:

    aligned(start, size)     the chunk's size, stretched so that it cuts no recorded range
                             (a resume keeps the first attempt's boundaries, any chunk_size)
    plan(chunk)              its pieces in input order: (piece, None) to run, or (piece,
                             result) for a range recorded before -- skipped, with its recorded
                             failures and values; with ``retry_failed``, a recorded failure
                             is a piece to run again (``Chunk.retry``) instead
    replan(chunk, ref)       the same from what is recorded now, for a chunk about to be sent
                             again (its worker died): pieces may have committed meanwhile

Records are read in pages as the input goes, so memory stays flat however long the run;
input that differs from what was recorded (a digest per record) is refused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any, NamedTuple

from bulkpool.errors import ConfigurationError
from bulkpool.journal.records import JournalRef, digest, from_json, is_recorded
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo

PAGE = 1000  # records read at a time while planning


class InputChanged(ConfigurationError):
    """The input differs from what the run_id recorded; the message says where."""


class _Record(NamedTuple):
    pk: int
    start: int
    size: int
    digest: str
    failed: int
    values: str  # JSON, or "" when the values were not kept

    @property
    def end(self) -> int:
        return self.start + self.size


class Planner:
    """A run's recorded ranges, read as the input goes, and the chunks planned around them."""

    def __init__(self, database: str, run_id: str, *, resumed: bool, retry_failed: bool) -> None:
        self.database = database
        self.run_id = run_id
        self.resumed = resumed  # an earlier attempt's records count
        self.retry_failed = retry_failed
        self.run: Any = None  # the Run row, once there is one
        self._records: deque[_Record] = deque()
        self._read_up_to = -1  # records starting at or before this have been read

    def aligned(self, start: int, size: int) -> int:
        """``size``, or more so that the chunk at ``start`` does not cut a range recorded
        before: a resume keeps the first attempt's boundaries, whatever the chunk size."""
        if not self.resumed:
            return size
        end = start + size
        while self._read_up_to < end - 1 and self._read_page():
            pass
        for record in self._records:
            if record.start >= end:
                break
            if record.start < end < record.end:
                return record.end - start
        return size

    def plan(self, chunk: Chunk) -> list[tuple[Chunk, ChunkResult | None]]:
        """The chunk as pieces in input order: (piece, None) to run, or (piece, result) for a
        range recorded before (``skipped``, with its recorded failures as errors)."""
        if not self.resumed:
            return [(chunk, None)]
        return self._pieces(chunk, self._records_within(chunk))

    def replan(self, chunk: Chunk, ref: JournalRef) -> list[tuple[Chunk, ChunkResult | None]]:
        """As ``plan``, from what is recorded now: a chunk about to be sent again may have had
        pieces committed in this attempt (split on a refused COMMIT before its worker died)."""
        from bulkpool.models import RunChunk

        if chunk.retry:
            return [self._retried(chunk, ref)]

        rows = (
            RunChunk.objects.using(self.database)
            .filter(run=self.run, start__gt=chunk.start - ref.max_size, start__lt=chunk.end)
            .order_by("start")
            .values_list(*_Record._fields)
        )
        records = [record for record in map(_Record._make, rows) if record.end > chunk.start]
        return self._pieces(chunk, records, earlier=False)

    def _pieces(
        self, chunk: Chunk, records: list[_Record], *, earlier: bool = True
    ) -> list[tuple[Chunk, ChunkResult | None]]:
        pieces: list[tuple[Chunk, ChunkResult | None]] = []
        position = chunk.start
        for record in records:
            if record.start < chunk.start or record.end > chunk.end:
                raise InputChanged(
                    f"run_id={self.run_id!r} recorded items {record.start}..{record.end - 1} "
                    f"as one piece, which this run's chunk {chunk.start}..{chunk.end - 1} cuts: the "
                    "input changed before that point. Rerun with the same input, or restart."
                )
            if record.start > position:
                pieces.append((chunk.piece(position, record.start), None))
            piece = chunk.piece(record.start, record.end)
            if digest(piece.items) != record.digest:
                raise InputChanged(
                    f"run_id={self.run_id!r} was run before with different input: the items "
                    f"at {record.start}..{record.end - 1} are not the ones it committed. Rerun with "
                    "the same input, or pass restart=True (--restart) to start this run_id over "
                    "(rows already written stay written)."
                )
            failures = self._failures(record, piece, earlier)
            if earlier and failures and self.retry_failed:
                pieces += _failed_again(piece, failures)
            else:
                kept = from_json(record.values)
                pieces.append((piece, ChunkResult(chunk.number, kept, failures, skipped=earlier)))
            position = record.end
        if position < chunk.end:
            pieces.append((chunk.piece(position, chunk.end), None))
        return pieces

    def _records_within(self, chunk: Chunk) -> list[_Record]:
        while self._read_up_to < chunk.end - 1 and self._read_page():
            pass
        while self._records and self._records[0].end <= chunk.start:
            self._records.popleft()  # before this chunk: the input went past it
        found = []
        while self._records and self._records[0].start < chunk.end:
            found.append(self._records.popleft())
        return found

    def _read_page(self) -> bool:
        from bulkpool.models import RunChunk

        rows = (
            RunChunk.objects.using(self.database)
            .filter(run=self.run, start__gt=self._read_up_to)
            .order_by("start")
            .values_list(*_Record._fields)[:PAGE]
        )
        records = [_Record._make(row) for row in rows]
        self._records.extend(records)
        if len(records) < PAGE:
            self._read_up_to = 1 << 62  # all read
            return False
        self._read_up_to = records[-1].start
        return True

    def _retried(self, chunk: Chunk, ref: JournalRef) -> tuple[Chunk, ChunkResult | None]:
        """A retried piece sent again: to run, unless its retry committed in this attempt
        (then its outcome is the failures this attempt recorded for it)."""
        from bulkpool.models import RunFailure

        if not is_recorded(ref, self.database, chunk):
            return chunk, None
        rows = RunFailure.objects.using(self.database).filter(
            chunk__run=self.run, index__gte=chunk.start, index__lt=chunk.end
        )
        errors = {
            row.index - chunk.start: ErrorInfo(row.exc_type, row.message, row.traceback) for row in rows
        }
        return chunk, ChunkResult(chunk.number, None, errors)

    def _failures(self, record: _Record, piece: Chunk, earlier: bool) -> dict[int, ErrorInfo]:
        from bulkpool.models import RunFailure

        if not record.failed:
            return {}
        rows = RunFailure.objects.using(self.database).filter(chunk_id=record.pk)
        return {
            row.index - piece.start: ErrorInfo(
                row.exc_type,
                f"{row.message} (in an earlier attempt of this run)" if earlier else row.message,
                row.traceback,
            )
            for row in rows
        }


def _failed_again(piece: Chunk, failures: dict[int, ErrorInfo]) -> list[tuple[Chunk, ChunkResult | None]]:
    """A recorded piece under retry_failed: its failed items, in runs of neighbours, to run
    again (``retry``); the items between them done before (skipped)."""
    parts: list[tuple[Chunk, ChunkResult | None]] = []
    position = piece.start
    for offset in sorted(failures):
        index = piece.start + offset
        if parts and parts[-1][1] is None and parts[-1][0].end == index:
            parts[-1] = (replace(parts[-1][0], items=[*parts[-1][0].items, piece.items[offset]]), None)
        else:
            if position < index:
                parts.append((piece.piece(position, index), ChunkResult(piece.number, None, skipped=True)))
            parts.append((replace(piece.piece(index, index + 1), retry=True), None))
        position = index + 1
    if position < piece.end:
        parts.append((piece.piece(position, piece.end), ChunkResult(piece.number, None, skipped=True)))
    return parts
