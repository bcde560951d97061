"""Journaled runs: what the parent and the workers do with the ``bulkpool`` tables.

Data flow for ``run_id="nightly-import"``:

    parent   Journal.open(): create or reuse the Run row; load the (start, size, digest)
             of every chunk it committed before; refuse a different function or input
    parent   Journal.is_done(chunk): skip a committed chunk without sending it anywhere
    worker   record_chunk(): inside the chunk's own transaction, write its RunChunk row
             (and a RunFailure per failed item); the unique (run, start) constraint stops
             a chunk that runs twice (worker died after commit) from writing twice
    parent   Journal.close(): the Run's status and counts, for ``manage.py bulkpool runs``
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.utils import timezone

from bulkpool.errors import ConfigurationError

if TYPE_CHECKING:
    from bulkpool.options import Options
    from bulkpool.outcomes import ErrorInfo, Report
    from bulkpool.protocol import Chunk

FIX_INSTALL = (
    'Add "bulkpool" to INSTALLED_APPS and run `python manage.py migrate bulkpool`, or run without run_id.'
)


@dataclass(frozen=True)
class JournalRef:
    """What a worker needs to journal its chunks: shipped inside the Task."""

    run_pk: int


class AlreadyDone(Exception):
    """The chunk was committed before (a rerun of a chunk whose worker died after commit)."""


def digest(items: list[Any]) -> str:
    """A fingerprint of a chunk's items, to notice a rerun fed with different input."""
    text = json.dumps(items, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def func_name(func: Any) -> str:
    while isinstance(func, functools.partial):
        func = func.func
    module = getattr(func, "__module__", None) or "?"
    return f"{module}.{getattr(func, '__qualname__', None) or type(func).__qualname__}"


class Journal:
    """The parent's side of a journaled run."""

    def __init__(self, run: Any, done: dict[int, tuple[int, str]], database: str) -> None:
        self.run = run
        self.done = done
        self.database = database
        self.ref = JournalRef(run.pk)

    @classmethod
    def open(cls, options: Options, func: Any) -> Journal:
        from bulkpool.models import Run, RunChunk

        database = options.database
        _require_tables(database)
        name = func_name(func)
        with transaction.atomic(using=database):
            runs = Run.objects.using(database).select_for_update()
            run = runs.filter(run_id=options.run_id).first()
            if run is None:
                run = Run.objects.using(database).create(
                    run_id=options.run_id, func=name, chunk_size=options.chunk_size
                )
            elif options.restart:
                run.chunks.all().delete()
                run.func, run.chunk_size, run.attempts = name, options.chunk_size, 1
            else:
                _require_same_job(run, name, options.chunk_size)
                run.attempts += 1
            run.status, run.finished_at = Run.Status.RUNNING, None
            run.save(using=database)
        rows = RunChunk.objects.using(database).filter(run=run).values_list("start", "size", "digest")
        return cls(run, {start: (size, fingerprint) for start, size, fingerprint in rows}, database)

    def is_done(self, chunk: Chunk) -> bool:
        """Whether the chunk committed in an earlier attempt; refuses a changed input."""
        record = self.done.get(chunk.start)
        if record is None or record[0] != len(chunk):
            return False
        if record[1] != digest(chunk.items):
            raise ConfigurationError(
                f"run_id={self.run.run_id!r} was run before with different input: the items "
                f"at {chunk.start}..{chunk.start + len(chunk) - 1} are not the ones it "
                "committed. Rerun with the same input, or pass restart=True (--restart) to "
                "start this run_id over (rows already written stay written)."
            )
        return True

    def close(self, report: Report) -> None:
        from bulkpool.models import Run

        run = self.run
        if report.interrupted:
            run.status = Run.Status.INTERRUPTED
        elif report.stopped_early:
            run.status = Run.Status.STOPPED
        else:
            run.status, run.finished_at = Run.Status.FINISHED, timezone.now()
        run.total, run.ok, run.failed, run.skipped = report.total, report.ok, report.failed, report.skipped
        try:
            run.save(using=self.database)
        except DatabaseError:  # the database is gone: the chunks' own records still tell the truth
            pass


def record_chunk(ref: JournalRef, database: str, chunk: Chunk, errors: dict[int, ErrorInfo]) -> None:
    """Write the chunk's journal rows; call inside the chunk's transaction."""
    from bulkpool.models import RunChunk, RunFailure

    try:
        with transaction.atomic(using=database):  # a savepoint: the failed insert must not poison the chunk
            record = RunChunk.objects.using(database).create(
                run_id=ref.run_pk,
                start=chunk.start,
                size=len(chunk),
                digest=digest(chunk.items),
                ok=len(chunk) - len(errors),
                failed=len(errors),
            )
    except IntegrityError as error:
        raise AlreadyDone from error
    RunFailure.objects.using(database).bulk_create(
        RunFailure(
            chunk=record,
            index=chunk.start + offset,
            item=json.dumps(chunk.items[offset], default=repr, ensure_ascii=False),
            exc_type=error.exc_type,
            message=error.message,
            traceback=error.traceback,
        )
        for offset, error in sorted(errors.items())
    )


def is_recorded(ref: JournalRef, database: str, chunk: Chunk) -> bool:
    from bulkpool.models import RunChunk

    return RunChunk.objects.using(database).filter(run_id=ref.run_pk, start=chunk.start).exists()


def _require_tables(database: str) -> None:
    if not apps.is_installed("bulkpool"):
        raise ConfigurationError(f'run_id needs the "bulkpool" app, which is not installed. {FIX_INSTALL}')
    from bulkpool.models import Run

    if Run._meta.db_table not in connections[database].introspection.table_names():
        raise ConfigurationError(
            f"run_id needs the bulkpool tables, which database {database!r} does not have. {FIX_INSTALL}"
        )


def _require_same_job(run: Any, name: str, chunk_size: int) -> None:
    if run.func != name or run.chunk_size != chunk_size:
        raise ConfigurationError(
            f"run_id={run.run_id!r} belongs to a run of {run.func} with chunk_size="
            f"{run.chunk_size}, not {name} with chunk_size={chunk_size}. Use another run_id, "
            "or pass restart=True (--restart) to start it over (rows already written stay written)."
        )
