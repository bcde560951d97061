"""The caller's side of a journaled run: open it, begin an attempt, close it.

``Journal`` ties the caller's three concerns together, each in its own unit: the plan of
the chunks around what was recorded (``planning.Planner``), the lease on the run_id
(``lease.Lease``), and the Run row's attempt fields, which it writes itself.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.apps import apps
from django.db import DatabaseError, IntegrityError, connections
from django.utils import timezone

from bulkpool.errors import ConfigurationError
from bulkpool.journal.lease import Lease, require_free
from bulkpool.journal.planning import Planner
from bulkpool.journal.records import (
    AlreadyDone,
    JournalRef,
    RunEnded,
    record_chunk,
    recorded_failures,
    write_transaction,
)
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo

if TYPE_CHECKING:
    from bulkpool.options import Options
    from bulkpool.outcomes import Failure, Report

FIX_INSTALL = (
    'Add "bulkpool" to INSTALLED_APPS and run `python manage.py migrate bulkpool`, or run without run_id.'
)
# What an attempt changes on its Run row (begin() and close()); a refused rerun puts them back.
_ATTEMPT_FIELDS = (
    "func", "chunk_size", "attempts", "status", "finished_at", "total", "ok", "failed", "skipped",
    "command", "owner", "heartbeat_at", "updated_at",
)  # fmt: skip

logger = logging.getLogger("bulkpool")


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
        self.planner = Planner(
            self.database, str(options.run_id), resumed=self.resumed, retry_failed=options.retry_failed
        )
        self.planner.run = run
        self.lease = Lease(self.database, str(options.run_id))
        self._before: dict[str, Any] | None = None  # the Run row's attempt fields before begin()

    @classmethod
    def open(cls, options: Options, identity: str, max_chunk: int) -> Journal:
        from bulkpool.models import Run

        _require_tables(options.database)
        run = Run.objects.using(options.database).filter(run_id=options.run_id).first()
        if run is not None:
            require_free(run)  # before anything runs; begin() checks again, under the lock
            if not options.restart:
                _require_same_job(run, identity)
        return cls(options, identity, run, max_chunk)

    @property
    def ref(self) -> JournalRef:
        assert self.run is not None, "begin() first"
        return JournalRef(self.run.pk, max(self.max_chunk, self.run.chunk_size), self.run.attempts)

    # -- planning (planning.Planner) -------------------------------------------------------

    def aligned(self, start: int, size: int) -> int:
        return self.planner.aligned(start, size)

    def plan(self, chunk: Chunk) -> list[tuple[Chunk, ChunkResult | None]]:
        return self.planner.plan(chunk)

    def replan(self, chunk: Chunk) -> list[tuple[Chunk, ChunkResult | None]]:
        return self.planner.replan(chunk, self.ref)

    # -- the attempt -----------------------------------------------------------------------

    def begin(self, command: str = "") -> None:
        """Mark the run as running and take its lease: once, before the first piece is sent."""
        if self.begun:
            return
        try:
            self._take(command)
        except IntegrityError:  # another caller created this run_id a moment ago
            self._take(command)  # it exists now: refused while that caller's lease holds
        self.begun = True

    def _take(self, command: str) -> None:
        from bulkpool.models import Run

        options = self.options
        with write_transaction(self.database):
            runs = Run.objects.using(self.database).select_for_update()
            run = runs.filter(run_id=options.run_id).first()
            self._before = None if run is None else {f: getattr(run, f) for f in _ATTEMPT_FIELDS}
            if run is None:
                run = Run(run_id=str(options.run_id), attempts=0)
            else:
                require_free(run)
                if options.restart:  # attempts go on counting: the fence tells them apart
                    run.chunks.all().delete()
                    run.deliveries.all().delete()  # starts counted by an earlier attempt
                elif self.run is None:  # created by another caller since open(): check it
                    _require_same_job(run, self.identity)
                    self.resumed = self.planner.resumed = True
            earlier = run.chunk_size if run.pk and not options.restart else 0
            run.func, run.chunk_size = self.identity, max(self.max_chunk, earlier)  # bounds its records
            run.attempts += 1
            run.status, run.finished_at = Run.Status.RUNNING, None
            self.lease.stamp(run)
            if command and hasattr(run, "command"):
                run.command = command
            run.save(using=self.database)
        self.run = self.planner.run = run

    def beat(self) -> None:
        """Renew the run's lease now and then: call it often while the run goes on."""
        if self.begun:
            self.lease.renew(self.run.pk)

    def undo_begin(self) -> None:
        """A rerun refused before it sent anything: the Run row as it was (or no row)."""
        if not self.begun or self.options.restart:
            return

        if self._before is None:
            self._ours().delete()
        else:
            self._ours().update(**self._before)
        self.begun = False

    def record_lost(self, chunk: Chunk, errors: dict[int, ErrorInfo]) -> None:
        """Record failures that no worker could (an item that kills every worker it touches, a
        line the input could not read), so that a resume does not run them again."""
        try:
            with write_transaction(self.database):
                record_chunk(self.ref, self.database, chunk, errors)
        except AlreadyDone:
            pass
        except RunEnded as ended:  # another caller took the run over: its attempt records them
            logger.warning("Did not journal the failure of items: %s", ended)
        except DatabaseError as error:  # a resume will run these items again: say so, go on
            logger.warning(
                "Could not journal the failure of items %s..%s: %s", chunk.start, chunk.end - 1, error
            )

    def failures_from(self, index: int) -> Iterator[Failure]:
        """The failures recorded for this run at ``index`` or after, in input order."""
        if self.run is None:
            return
        for _, failure in recorded_failures(self.database, [self.run.pk], from_index=index):
            yield failure

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
        fields = ["status", "finished_at", "owner", "total", "ok", "failed", "skipped", "updated_at"]
        try:
            still_ours = self._ours().update(**{f: getattr(run, f) for f in fields if f != "updated_at"},
                                              updated_at=timezone.now())  # fmt: skip
        except DatabaseError as error:  # the records still tell the truth; a resume sees "running"
            logger.warning("Could not record the end of run %r: %s", self.options.run_id, error)
            return
        if not still_ours:
            logger.warning(
                "Run %r was taken over by another caller while this one ran: its end is not "
                "recorded over that caller's attempt.",
                self.options.run_id,
            )

    def _ours(self) -> Any:
        """The Run row, while this attempt holds it (no other caller took it over)."""
        from bulkpool.models import Run

        return Run.objects.using(self.database).filter(
            pk=self.run.pk, attempts=self.run.attempts, owner=self.lease.owner
        )


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
    or for ``create`` / ``update`` / ``delete`` / ``upsert`` the operation with its arguments."""
    describe = getattr(func, "journal_identity", None)
    return describe() if callable(describe) else func_name(func)


def _require_tables(database: str) -> None:
    if not apps.is_installed("bulkpool"):
        raise ConfigurationError(f'run_id needs the "bulkpool" app, which is not installed. {FIX_INSTALL}')
    from bulkpool.models import Run

    if Run._meta.db_table not in connections[database].introspection.table_names():
        raise ConfigurationError(
            f"run_id needs the bulkpool tables, which database {database!r} does not have. {FIX_INSTALL}"
        )


def _require_same_job(run: Any, identity: str) -> None:
    if run.func != identity:
        raise ConfigurationError(
            f"run_id={run.run_id!r} belongs to a run of {run.func}, not {identity}. Use another "
            "run_id, or pass restart=True (--restart) to start it over (rows already written stay "
            "written)."
        )
