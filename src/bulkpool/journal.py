"""Journaled runs: the one record of what is done, kept in the ``bulkpool`` tables.

A record (``RunChunk``) is a range of input items -- ``start`` and ``size`` -- written in
the same transaction as those items' work, with a ``RunFailure`` per item that failed in
it. A chunk is one record, or several when it was split (a poison item, a COMMIT refused by
a constraint), so a resumed run skips exactly the ranges that committed and runs the rest.

Data flow for ``run_id="nightly-import"``:

    parent   Journal.open(): read the Run row; refuse another job under the same name.
             Writes nothing: a refused or empty rerun leaves the journal as it was.
    parent   Journal.plan(chunk): the chunk's pieces, each either recorded (skipped, with
             its recorded failures) or to run; refuses input that differs from what was
             recorded (digests per record)
    parent   Journal.begin(): before the first piece runs: status "running", one more
             attempt, and the run's lease taken (``status.py``): refused while another live
             caller holds it; renewed by Journal.beat() while the run goes on
    worker   is_recorded(): first in the piece's own transaction, one look: a range already
             recorded is skipped; one whose attempt is over is refused (RunEnded, the fence)
    worker   record_chunk(): inside the piece's own transaction, lock the Run row, refuse a
             range that overlaps a record (the piece ran before: AlreadyDone) or whose
             attempt is over (RunEnded), write the record
    worker   count_start() (at-least-once executors: celery): in a transaction of its own,
             before the piece runs, one more start of it; past a limit the worker refuses
             it, so a piece that kills every worker stops being redelivered, caller or not
    parent   Journal.record_lost(): the failures no worker could record (an item that kills
             every worker it touches), so a resume reports them instead of running them again
    parent   Journal.close(): the attempt's status and counts, for ``bulkpool runs``; the
             lease let go

The fence. A chunk carries its attempt (``JournalRef.attempt``); once ``close()`` ended that
attempt (stopped, interrupted, finished) or a resume began the next, a delivery of it that
comes late -- a broker's message that waited for a consumer -- writes nothing, so the
report's "not run" holds; the resume sends those items again under its own attempt.

Why the Run row is locked: the unique (run, start) constraint stops one range from being
written twice, but two *overlapping* ranges with different starts (a chunk sent again
while a split piece of it runs) would both pass it. Taking the row lock just before
COMMIT serialises only that last step, across workers and machines -- and orders it with
``close()``, whose UPDATE of the row waits for it, or it for the UPDATE.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from django.apps import apps
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.models import Exists, F, Q
from django.utils import timezone

from bulkpool.errors import ConfigurationError, RunInProgress
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo, Unreadable
from bulkpool.status import HEARTBEAT_SECONDS, STALE_AFTER_SECONDS
from bulkpool.status import RunStatus as RunStatus  # re-exported for the engine
from bulkpool.transactions import writing_from_begin

if TYPE_CHECKING:
    from bulkpool.options import Options
    from bulkpool.outcomes import Report

FIX_INSTALL = (
    'Add "bulkpool" to INSTALLED_APPS and run `python manage.py migrate bulkpool`, or run without run_id.'
)
PAGE = 1000  # records read at a time while planning
# What an attempt changes on its Run row (begin() and close()); a refused rerun puts them back.
_ATTEMPT_FIELDS = (
    "func", "chunk_size", "attempts", "status", "finished_at", "total", "ok", "failed", "skipped",
    "command", "owner", "heartbeat_at", "updated_at",
)  # fmt: skip

logger = logging.getLogger("bulkpool")


@dataclass(frozen=True)
class JournalRef:
    """What a worker needs to journal its chunks: shipped inside the Task."""

    run_pk: int
    max_size: int  # no record spans more items: bounds the overlap query to an index range
    attempt: int = 0  # the Run's attempt that sent the chunk: the fence (0: none); retry_failed
    # replaces the failures recorded before it


class RunEnded(Exception):
    """The chunk's attempt of its run is over (stopped, interrupted, finished, or a later
    attempt began): a delivery that comes late writes nothing. The report said "not run"."""


class AlreadyDone(Exception):
    """The range was committed before (a rerun of a chunk whose worker died after commit)."""


class InputChanged(ConfigurationError):
    """The input differs from what the run_id recorded; the message says where."""


def digest(items: list[Any]) -> str:
    """A fingerprint of a range's items, to notice a rerun fed with different input."""
    text = json.dumps(items, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def func_name(func: Any) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    module = getattr(func, "__module__", None) or "?"
    return f"{module}.{getattr(func, '__qualname__', None) or type(func).__qualname__}"


def new_run_id() -> str:
    """A run_id for a run that must be journaled and was given none."""
    return f"run-{timezone.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def job_identity(func: Any) -> str:
    """What a run does, so a run_id cannot be resumed by another job: the function's name,
    or for ``create`` / ``update`` / ``delete`` the operation with its arguments."""
    describe = getattr(func, "journal_identity", None)
    return describe() if callable(describe) else func_name(func)


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


class Journal:
    """The parent's side of a journaled run."""

    def __init__(self, options: Options, identity: str, run: Any, max_chunk: int) -> None:
        self.options = options
        self.identity = identity
        self.max_chunk = max_chunk  # the most items this attempt puts in a chunk
        self.run = run  # None until begin() for a new run_id
        self.database = options.database
        self.begun = False
        self.resumed = run is not None and not options.restart  # an earlier attempt's records count
        self._records: deque[_Record] = deque()
        self._read_up_to = -1  # records starting at or before this have been read
        self._before: dict[str, Any] | None = None  # the Run row's attempt fields before begin()
        self.owner = f"{socket.gethostname()} pid {os.getpid()} ({secrets.token_hex(3)})"
        self._beaten = 0.0  # time.monotonic() of the latest renewal of the lease

    @classmethod
    def open(cls, options: Options, identity: str, max_chunk: int) -> Journal:
        from bulkpool.models import Run

        _require_tables(options.database)
        run = Run.objects.using(options.database).filter(run_id=options.run_id).first()
        if run is not None:
            _require_free(run)  # before anything runs; begin() checks again, under the lock
            if not options.restart:
                _require_same_job(run, identity)
        return cls(options, identity, run, max_chunk)

    @property
    def ref(self) -> JournalRef:
        assert self.run is not None, "begin() first"
        return JournalRef(self.run.pk, max(self.max_chunk, self.run.chunk_size), self.run.attempts)

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

    # -- planning --------------------------------------------------------------------------

    def plan(self, chunk: Chunk) -> list[tuple[Chunk, ChunkResult | None]]:
        """The chunk as pieces in input order: (piece, None) to run, or (piece, result) for a
        range recorded before (``skipped``, with its recorded failures as errors)."""
        if not self.resumed:
            return [(chunk, None)]
        return self._pieces(chunk, self._records_within(chunk))

    def replan(self, chunk: Chunk) -> list[tuple[Chunk, ChunkResult | None]]:
        """As ``plan``, from what is recorded now: a chunk about to be sent again may have had
        pieces committed in this attempt (split on a refused COMMIT before its worker died)."""
        from bulkpool.models import RunChunk

        if chunk.retry:
            return [self._retried(chunk)]

        rows = (
            RunChunk.objects.using(self.database)
            .filter(run=self.run, start__gt=chunk.start - self.ref.max_size, start__lt=chunk.end)
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
                    f"run_id={self.options.run_id!r} recorded items {record.start}..{record.end - 1} "
                    f"as one piece, which this run's chunk {chunk.start}..{chunk.end - 1} cuts: the "
                    "input changed before that point. Rerun with the same input, or restart."
                )
            if record.start > position:
                pieces.append((chunk.piece(position, record.start), None))
            piece = chunk.piece(record.start, record.end)
            if digest(piece.items) != record.digest:
                raise InputChanged(
                    f"run_id={self.options.run_id!r} was run before with different input: the items "
                    f"at {record.start}..{record.end - 1} are not the ones it committed. Rerun with "
                    "the same input, or pass restart=True (--restart) to start this run_id over "
                    "(rows already written stay written)."
                )
            failures = self._failures(record, piece, earlier)
            if earlier and failures and self.options.retry_failed:
                pieces += _failed_again(piece, failures)
            else:
                kept = _from_json(record.values)
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

    def _retried(self, chunk: Chunk) -> tuple[Chunk, ChunkResult | None]:
        """A retried piece sent again: to run, unless its retry committed in this attempt
        (then its outcome is the failures this attempt recorded for it)."""
        from bulkpool.models import RunFailure

        if not is_recorded(self.ref, self.database, chunk):
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

    # -- writing ---------------------------------------------------------------------------

    def begin(self, command: str = "") -> None:
        """Mark the run as running and take its lease: once, before the first piece is sent."""
        if self.begun:
            return
        try:
            self._take(command)
        except IntegrityError:  # another caller created this run_id a moment ago
            self._take(command)  # it exists now: refused while that caller's lease holds
        self.begun = True
        self._beaten = time.monotonic()

    def _take(self, command: str) -> None:
        from bulkpool.models import Run

        options = self.options
        with _write_transaction(self.database):
            runs = Run.objects.using(self.database).select_for_update()
            run = runs.filter(run_id=options.run_id).first()
            self._before = None if run is None else {f: getattr(run, f) for f in _ATTEMPT_FIELDS}
            if run is None:
                run = Run(run_id=str(options.run_id), attempts=0)
            else:
                _require_free(run)
                if options.restart:
                    run.chunks.all().delete()
                    run.deliveries.all().delete()  # starts counted by an earlier attempt
                    run.attempts = 0
            earlier = run.chunk_size if run.pk and not options.restart else 0
            run.func, run.chunk_size = self.identity, max(self.max_chunk, earlier)  # bounds its records
            run.attempts += 1
            run.status, run.finished_at = Run.Status.RUNNING, None
            run.owner, run.heartbeat_at = self.owner, timezone.now()
            if command and hasattr(run, "command"):
                run.command = command
            run.save(using=self.database)
        self.run = run

    def beat(self) -> None:
        """Renew the lease, at most every HEARTBEAT_SECONDS: call it often while the run goes on."""
        if not self.begun or time.monotonic() - self._beaten < HEARTBEAT_SECONDS:
            return
        from bulkpool.models import Run

        self._beaten = time.monotonic()
        try:
            held = (
                Run.objects.using(self.database)
                .filter(pk=self.run.pk, owner=self.owner)
                .update(heartbeat_at=timezone.now())
            )
        except DatabaseError as error:  # the next beat tries again; the lease is generous
            logger.debug("Could not renew the lease of run %r: %s", self.options.run_id, error)
            return
        if not held:
            logger.warning(
                "Run %r was taken over by another caller after this one's lease lapsed: both "
                "now run it. The journal still writes each item once.",
                self.options.run_id,
            )

    def undo_begin(self) -> None:
        """A rerun refused before it sent anything: the Run row as it was (or no row)."""
        if not self.begun or self.options.restart:
            return
        from bulkpool.models import Run

        if self._before is None:
            Run.objects.using(self.database).filter(pk=self.run.pk).delete()
        else:
            Run.objects.using(self.database).filter(pk=self.run.pk).update(**self._before)
        self.begun = False

    def record_lost(self, chunk: Chunk, errors: dict[int, ErrorInfo]) -> None:
        """Record failures that no worker could, so that a resume does not run them again."""
        try:
            with _write_transaction(self.database):
                record_chunk(self.ref, self.database, chunk, errors)
        except AlreadyDone:
            pass
        except DatabaseError as error:  # a resume will run these items again: say so, go on
            logger.warning(
                "Could not journal the failure of items %s..%s: %s", chunk.start, chunk.end - 1, error
            )

    def close(self, report: Report, status: str) -> None:
        """The attempt's outcome; nothing when it never began (a refused or empty rerun)."""
        if not self.begun:
            return
        from bulkpool.models import Run

        run = self.run
        run.status = status
        run.finished_at = timezone.now() if status == Run.Status.FINISHED else None
        run.owner = ""  # the lease let go: another caller may resume it at once
        run.total, run.ok, run.failed, run.skipped = report.total, report.ok, report.failed, report.skipped
        try:
            run.save(using=self.database)
        except DatabaseError:  # the database is gone: the records still tell the truth
            pass


@contextlib.contextmanager
def _write_transaction(database: str) -> Iterator[None]:
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
    from bulkpool.models import Run, RunChunk, RunFailure

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
    RunFailure.objects.using(database).bulk_create(
        RunFailure(
            chunk=record,
            index=chunk.start + offset,
            **_item_fields(chunk.items[offset]),
            exc_type=error.exc_type,
            message=error.message,
            traceback=error.traceback,
            attempt=ref.attempt or None,
        )
        for offset, error in sorted(errors.items())
    )


def _replace_failures(ref: JournalRef, database: str, chunk: Chunk, errors: dict[int, ErrorInfo]) -> None:
    """A retried piece (``retry_failed``): its items' recorded failures give way to their new
    outcome, in the records that hold them; AlreadyDone if this attempt replaced them already."""
    from bulkpool.models import RunChunk, RunFailure

    earlier = _earlier_failures(ref, database, chunk).select_for_update()
    chunk_of = dict(earlier.values_list("index", "chunk_id"))
    if not chunk_of:
        raise AlreadyDone
    earlier.delete()
    RunFailure.objects.using(database).bulk_create(
        RunFailure(
            chunk_id=chunk_of[chunk.start + offset],
            index=chunk.start + offset,
            **_item_fields(chunk.items[offset]),
            exc_type=error.exc_type,
            message=error.message,
            traceback=error.traceback,
            attempt=ref.attempt,
        )
        for offset, error in sorted(errors.items())
        if chunk.start + offset in chunk_of
    )
    fixed = Counter(chunk_of[chunk.start + offset] for offset in range(len(chunk)) if offset not in errors)
    for record, count in fixed.items():
        RunChunk.objects.using(database).filter(pk=record).update(
            ok=F("ok") + count, failed=F("failed") - count
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
    return text if _from_json(text) == values else ""


def _from_json(text: str) -> list[Any] | None:
    if not text:
        return None
    kept = json.loads(text)
    if kept["tuples"]:
        return [None if value is None else tuple(value) for value in kept["values"]]
    return list(kept["values"])


def recorded_result(ref: JournalRef, database: str, chunk: Chunk) -> ChunkResult:
    """What the journal says of a range that committed before (a chunk delivered again):
    its failures, and its values where they were kept; None for a value that was not."""
    from bulkpool.models import RunChunk, RunFailure

    records = RunChunk.objects.using(database).filter(
        run_id=ref.run_pk, start__gte=chunk.start, start__lt=chunk.end
    )
    values: list[Any] = [None] * len(chunk)
    for start, size, text in records.values_list("start", "size", "values"):
        kept = _from_json(text)
        if kept is not None:
            values[start - chunk.start : start - chunk.start + size] = kept
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
    with _write_transaction(database):
        rows.update(starts=F("starts") + 1)
        return int(rows.values_list("starts", flat=True).get())


def is_recorded(ref: JournalRef, database: str, chunk: Chunk) -> bool:
    """Whether any item of the range was recorded (a retried piece: whether its failures were
    replaced in this attempt): a cheap look before doing the work. Raises ``RunEnded`` for a
    range not recorded whose attempt is over (one query either way)."""
    from bulkpool.models import Run

    if chunk.retry:
        return not _earlier_failures(ref, database, chunk).exists()
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


def _require_tables(database: str) -> None:
    if not apps.is_installed("bulkpool"):
        raise ConfigurationError(f'run_id needs the "bulkpool" app, which is not installed. {FIX_INSTALL}')
    from bulkpool.models import Run

    if Run._meta.db_table not in connections[database].introspection.table_names():
        raise ConfigurationError(
            f"run_id needs the bulkpool tables, which database {database!r} does not have. {FIX_INSTALL}"
        )


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


def _require_free(run: Any) -> None:
    """Refuse a run_id whose run is live: marked running, by a caller whose lease holds."""
    if run.status != run.Status.RUNNING or not run.owner or run.lease_lapsed() or _gone(run.owner):
        return
    renewed = (timezone.now() - run.heartbeat_at).total_seconds()
    raise RunInProgress(
        f"run_id={run.run_id!r} is being run now by {run.owner} (its lease was renewed "
        f"{renewed:.0f} s ago): wait for it to end, or stop it. If that caller is gone, the run "
        f"can be resumed {STALE_AFTER_SECONDS:.0f} s after its last renewal."
    )


def _gone(owner: str) -> bool:
    """Whether the caller named by ``owner`` ("host pid N (token)") is a process of this
    machine that no longer exists: then its lease means nothing, whatever its age."""
    host, _, rest = owner.partition(" pid ")
    pid = rest.split(" ", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _require_same_job(run: Any, identity: str) -> None:
    if run.func != identity:
        raise ConfigurationError(
            f"run_id={run.run_id!r} belongs to a run of {run.func}, not {identity}. Use another "
            "run_id, or pass restart=True (--restart) to start it over (rows already written stay "
            "written)."
        )
