"""A range's record: what a worker writes, and asks, inside the transaction of its work.

    is_recorded(ref, database, piece)   first in the piece's transaction, one look: a range
                                        recorded before is done (skip it); one whose attempt
                                        is over is refused (RunEnded: the fence)
    record_chunk(ref, database, piece,  last in it: under the Run row's lock, refuse a range
                 errors, values)        that overlaps a record (AlreadyDone) or whose attempt
                                        is over (RunEnded); write the record, its failures and
                                        (kept where they are plain JSON) its values
    recorded_result(ref, database, ...) what the records of a range said: its outcome, for a
                                        chunk delivered again after it committed
    count_start(ref, database, piece)   at-least-once executors: one more start, committed at
                                        once, before the piece runs (poison counting)

A piece of ``retry_failed`` (``Chunk.retry``) replaces the failures recorded for its items
instead of adding a record.

Why the Run row is locked: the unique (run, start) constraint stops one range from being
written twice, but two *overlapping* ranges with different starts (a chunk sent again
while a split piece of it runs) would both pass it. Taking the row lock just before
COMMIT serialises only that last step, across workers and machines -- and orders it with
the caller's ``close()``, whose UPDATE of the row waits for it, or it for the UPDATE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, connections, transaction
from django.db.models import Exists, F, Q

from bulkpool.errors import ITEM_ERRORS
from bulkpool.outcomes import Failure
from bulkpool.protocol import UNREADABLE, Chunk, ChunkResult, ErrorInfo, Unreadable
from bulkpool.status import RunStatus
from bulkpool.transactions import writing_from_begin

logger = logging.getLogger("bulkpool")


@dataclass(frozen=True)
class JournalRef:
    """What a worker needs to journal its chunks: shipped inside the Task."""

    run_pk: int
    max_size: int  # no record spans more items: bounds the overlap query to an index range
    attempt: int = 0  # the Run's attempt that sent the chunk: the fence (0: none); retry_failed


class RunEnded(Exception):
    """The chunk's attempt of its run is over (stopped, interrupted, finished, or a later
    attempt began): a delivery that comes late writes nothing. The report said "not run"."""


class AlreadyDone(Exception):
    """The range was committed before (a rerun of a chunk whose worker died after commit)."""


def digest(items: list[Any]) -> str:
    """A fingerprint of a range's items, to notice a rerun fed with different input."""
    text = json.dumps(items, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def write_transaction(database: str) -> Iterator[None]:
    """The parent's journal writes wait for the workers' write lock, as theirs do (SQLite)."""
    with writing_from_begin(connections[database]), transaction.atomic(using=database):
        yield


def record_chunk(
    ref: JournalRef,
    database: str,
    chunk: Chunk,
    errors: dict[int, ErrorInfo],
    values: list[Any] | None = None,
) -> None:
    """Write the range's record and failures (and its items' values, when kept and plain
    JSON); call inside the transaction that did its work."""
    from bulkpool.models import Run, RunChunk

    # The Run row's lock serialises the last step of every chunk of the run, and orders this
    # COMMIT with the caller's close(): a chunk the report calls "not run" cannot commit after
    # it. Under it, chunk_size is the bound every attempt so far put on its records -- a later
    # attempt's bigger chunks included, which this attempt's own bound would miss.
    row = Run.objects.using(database).select_for_update().filter(pk=ref.run_pk)
    found = row.values_list("status", "attempts", "chunk_size").first()
    attempt, bound = (None, 0) if found is None else (found[:2], found[2])
    if chunk.retry:
        _fence(ref, chunk, attempt)
        _replace_failures(ref, database, chunk, errors)
        return
    if _overlapping(ref, database, chunk, lock=True, max_size=max(bound, ref.max_size)):
        raise AlreadyDone
    _fence(ref, chunk, attempt)
    try:
        with transaction.atomic(using=database):  # a savepoint: the failed insert must not poison the chunk
            record = RunChunk.objects.using(database).create(
                run_id=ref.run_pk,
                start=chunk.start,
                size=len(chunk),
                digest=digest(chunk.items),
                ok=len(chunk) - len(errors),
                failed=len(errors),
                values=_as_json(values),
            )
    except IntegrityError as error:
        raise AlreadyDone from error
    _write_failures(ref, database, chunk, errors, lambda index: record.pk)


def _replace_failures(ref: JournalRef, database: str, chunk: Chunk, errors: dict[int, ErrorInfo]) -> None:
    """A retried piece (``retry_failed``): its items' recorded failures give way to their new
    outcome, in the records that hold them. AlreadyDone if this attempt replaced any of them
    already (a piece split after a refused COMMIT, its worker dead): the journal's outcome
    stands, and no item of it runs twice."""
    from bulkpool.models import RunChunk

    earlier = _earlier_failures(ref, database, chunk).select_for_update()
    chunk_of = dict(earlier.values_list("index", "chunk_id"))
    if set(chunk_of) != set(range(chunk.start, chunk.end)):
        raise AlreadyDone
    earlier.delete()
    _write_failures(ref, database, chunk, errors, chunk_of.__getitem__)
    fixed = Counter(chunk_of[chunk.start + offset] for offset in range(len(chunk)) if offset not in errors)
    for record, count in fixed.items():
        RunChunk.objects.using(database).filter(pk=record).update(
            ok=F("ok") + count, failed=F("failed") - count
        )


def _write_failures(
    ref: JournalRef,
    database: str,
    chunk: Chunk,
    errors: dict[int, ErrorInfo],
    record_of: Callable[[int], int],
) -> None:
    """A RunFailure per failed item, in the record ``record_of(index)`` names."""
    from bulkpool.models import RunFailure

    RunFailure.objects.using(database).bulk_create(
        RunFailure(
            chunk_id=record_of(chunk.start + offset),
            index=chunk.start + offset,
            **_item_fields(chunk.items[offset]),
            exc_type=error.exc_type,
            message=error.message,
            traceback=error.traceback,
            attempt=ref.attempt or None,
        )
        for offset, error in sorted(errors.items())
    )


def _earlier_failures(ref: JournalRef, database: str, chunk: Chunk) -> Any:
    """The failures of the piece's items recorded before this attempt."""
    from bulkpool.models import RunFailure

    before = Q(attempt__lt=ref.attempt) | Q(attempt__isnull=True)
    return RunFailure.objects.using(database).filter(
        before, chunk__run_id=ref.run_pk, index__gte=chunk.start, index__lt=chunk.end
    )


def _as_json(values: list[Any] | None) -> str:
    """The values as JSON if they come back from it the same (ints, strings, lists of them,
    and pairs such as upsert's ``(pk, created)``); else "" and they are not kept (a UUID, a
    model instance)."""
    if values is None:
        return ""
    pairs = any(isinstance(value, tuple) for value in values)
    if pairs and not all(value is None or isinstance(value, tuple) for value in values):
        return ""
    try:
        text = json.dumps({"tuples": pairs, "values": values}, ensure_ascii=False)
    except (TypeError, ValueError):
        return ""
    return text if from_json(text) == values else ""


def from_json(text: str) -> list[Any] | None:
    if not text:
        return None
    kept = json.loads(text)
    if kept["tuples"]:
        return [None if value is None else tuple(value) for value in kept["values"]]
    return list(kept["values"])


def recorded_result(ref: JournalRef, database: str, chunk: Chunk) -> ChunkResult:
    """What the journal says of a range that committed before (a chunk delivered again):
    its failures, and its values where they were kept; None for a value that was not."""
    from bulkpool.models import RunFailure

    values: list[Any] = [None] * len(chunk)
    for start, size, text in _overlaps(ref, database, chunk).values_list("start", "size", "values"):
        kept = from_json(text)
        if kept is None:
            continue
        first, last = max(start, chunk.start), min(start + size, chunk.end)  # where they meet
        values[first - chunk.start : last - chunk.start] = kept[first - start : last - start]
    failures = RunFailure.objects.using(database).filter(
        chunk__run_id=ref.run_pk, index__gte=chunk.start, index__lt=chunk.end
    )
    errors = {
        row.index - chunk.start: ErrorInfo(row.exc_type, row.message, row.traceback) for row in failures
    }
    return ChunkResult(chunk.number, values, errors)


def _item_fields(item: Any) -> dict[str, Any]:
    """How a failed item is kept: as JSON; a line the input could not read as its text and line."""
    if isinstance(item, Unreadable):
        return {"item": item.text, "line": item.line}
    return {"item": json.dumps(item, default=repr, ensure_ascii=False)}


def count_start(ref: JournalRef, database: str, chunk: Chunk) -> int:
    """One more start of this piece (same run, start and size), committed at once, before it
    runs -- so a start that kills its worker still counts. Returns the starts so far."""
    from bulkpool.models import ChunkDelivery

    deliveries = ChunkDelivery.objects.using(database)
    try:  # a first start, nearly always: one INSERT, in autocommit
        deliveries.create(run_id=ref.run_pk, start=chunk.start, size=len(chunk), starts=1)
        return 1
    except IntegrityError:  # started before
        pass
    rows = deliveries.filter(run_id=ref.run_pk, start=chunk.start, size=len(chunk))
    with write_transaction(database):
        rows.update(starts=F("starts") + 1)
        return int(rows.values_list("starts", flat=True).get())


def is_recorded(ref: JournalRef, database: str, chunk: Chunk) -> bool:
    """Whether any item of the range was recorded (a retried piece: whether its failures were
    replaced in this attempt): a cheap look before doing the work. Raises ``RunEnded`` for a
    range not recorded whose attempt is over (one query either way)."""
    from bulkpool.models import Run

    if chunk.retry:  # done unless every item of it still has its earlier failure
        return _earlier_failures(ref, database, chunk).count() < len(chunk)
    if not ref.attempt:
        return _overlapping(ref, database, chunk, lock=False)
    run = Run.objects.using(database).filter(pk=ref.run_pk)
    found = run.annotate(recorded=Exists(_overlaps(ref, database, chunk)))
    row = found.values_list("status", "attempts", "recorded").first()
    if row is not None and row[2]:
        return True
    _fence(ref, chunk, None if row is None else row[:2])
    return False


def _fence(ref: JournalRef, chunk: Chunk, attempt: tuple[str, int] | None) -> None:
    """Refuse ``chunk`` unless its attempt is the run's current one, still running."""
    if not ref.attempt or attempt == (RunStatus.RUNNING, ref.attempt):
        return
    now = "gone" if attempt is None else f"{attempt[0]}, attempt {attempt[1]}"
    logger.info(
        "Refusing items %s..%s: attempt %s of their run is over (the run is %s).",
        chunk.start,
        chunk.end - 1,
        ref.attempt,
        now,
    )
    raise RunEnded(
        f"items {chunk.start}..{chunk.end - 1} were sent by attempt {ref.attempt} of the run, which "
        f"is over (the run is {now}): nothing of them was written"
    )


def _overlapping(
    ref: JournalRef, database: str, chunk: Chunk, *, lock: bool, max_size: int | None = None
) -> bool:
    candidates = _overlaps(ref, database, chunk, max_size)
    if lock:  # a locking read sees what committed since this transaction's snapshot (MySQL)
        candidates = candidates.select_for_update()
    return candidates.exists()


def _overlaps(ref: JournalRef, database: str, chunk: Chunk, max_size: int | None = None) -> Any:
    """The records of the run that overlap the chunk's range."""
    from bulkpool.models import RunChunk

    # Records are at most max_size long, so only those starting in this window can overlap.
    window = max_size or ref.max_size
    candidates = RunChunk.objects.using(database).filter(
        run_id=ref.run_pk, start__gt=chunk.start - window, start__lt=chunk.end
    )
    return candidates.annotate(stop=F("start") + F("size")).filter(stop__gt=chunk.start)


def recorded_failures(
    database: str, runs: Iterable[int], *, from_index: int = 0
) -> Iterator[tuple[str, Failure]]:
    """The failures the journal recorded for these runs (by pk), each with its run_id, in
    run_id and input order, from ``from_index`` on: what a rejects file says of them."""
    from bulkpool.models import RunFailure

    rows = (
        RunFailure.objects.using(database)
        .filter(chunk__run__in=list(runs), index__gte=from_index)
        .order_by("chunk__run__run_id", "index")
        .values_list("chunk__run__run_id", "index", "item", "exc_type", "message", "traceback", "line")
    )
    for run_id, index, item, exc_type, message, traceback, line in rows.iterator(chunk_size=2000):
        kind = ITEM_ERRORS.get(exc_type)
        unsafe = bool(kind is not None and kind.unsafe)
        yield run_id, Failure(index, _item_of(item, exc_type), exc_type, message, traceback, unsafe, line)


def _item_of(text: str, exc_type: str) -> Any:
    """A recorded item back as the value it was (a line the input could not read: its text)."""
    if exc_type == UNREADABLE:
        return text
    try:
        return json.loads(text)
    except ValueError:  # recorded as its repr: it was not JSON to begin with
        return text
