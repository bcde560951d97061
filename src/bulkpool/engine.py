"""Drive one job over an executor. Orchestration only: the policy lives in ``scheduling``.

Data flow:

    items --chunked()--> Chunk --Journal.plan()--> pieces to run --submit()--> executor
                                           \\--> pieces done before (skipped)      |
                                                                               events()
    Report, progress bar, rejects file, journal, imap outcomes <--_settle()-- ChunkDone / ChunkLost
                                                                          (Scheduler decides)

Items are read from the input only to fill the window the Scheduler allows, so memory stays
flat however long the input.

One way to finish. Every end of a run goes through ``_stop()`` and the ``finally`` of
``chunks()``: done; Ctrl-C or SIGTERM; ``on_error="raise"``; ``max_failures``; the input
raising; a journal that refuses the input; a worker that cannot be replaced; an ``imap``
consumer that stops reading. After a stop nothing more is sent, the chunks in flight are
drained (they commit or roll back, and are counted), the journal gets the status of what
happened (``finished`` only when every item ran), and one exception carrying the partial
report is raised: a ``RunAborted`` subclass, or ``RunInterrupted`` for Ctrl-C / SIGTERM.
A second Ctrl-C abandons the chunks in flight (their transactions roll back).

Signal handlers only set a flag (``Interrupts``); the engine reads it between events.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from django.db import DatabaseError, connections, transaction
from tqdm import tqdm

from bulkpool.chunking import chunked, known_length
from bulkpool.errors import (
    ConfigurationError,
    InputError,
    InputFailed,
    ItemFailed,
    ResumeRefused,
    RunInterrupted,
    TooManyFailures,
    WorkersLost,
    WorkerStartupError,
)
from bulkpool.executors import Executor, SerialExecutor, resolve
from bulkpool.interrupts import Interrupts
from bulkpool.journal import InputChanged, Journal, job_identity, new_run_id
from bulkpool.journal import RunStatus as Status
from bulkpool.options import EARLY_STOP_AFTER, Options
from bulkpool.outcomes import Failure, Report
from bulkpool.protocol import Chunk, ChunkLost, ChunkResult, ErrorInfo, Task, Unreadable
from bulkpool.reporting import open_rejects, progress_bar, write_reject
from bulkpool.scheduling import Drop, Fail, Scheduler, SendAgain
from bulkpool.sizing import (
    AUTO,
    REMOTE_TARGET_SECONDS,
    Choice,
    ChunkSizer,
    Limits,
    Pace,
    choose_workers,
    cpu_quota,
    free_connections,
)

logger = logging.getLogger("bulkpool")

POLL_SECONDS = 0.5


class _JournalUnreadable(Exception):
    """Reading the journal failed while the next chunk was being cut from the input."""

    def __init__(self, error: DatabaseError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class _Stop:
    """Why no more work goes out, and the exception that says so once the work in flight is in."""

    reason: str
    status: str  # the journal's Run.Status
    error: Callable[[Report], BaseException] | None  # None: end quietly (an imap consumer that stopped)
    refused: bool = False  # the input is not the journal's: if nothing was sent, change nothing


class Engine:
    def __init__(
        self,
        func: Callable[..., Any],
        items: Iterable[Any],
        options: Options,
        *,
        keep_values: bool = False,
        load: Callable[[list[Any]], list[Any]] | None = None,
        resume_hint: str | None = None,
    ) -> None:
        if not callable(func):
            raise ConfigurationError(f"func must be callable, not {type(func).__name__}.")
        self.items = items
        self.executor = resolve(options.backend)
        self.executor.check_options(options)
        at_least_once = getattr(self.executor, "delivery", "exactly_once") != "exactly_once"
        # A dry run commits nothing, so a chunk delivered twice applies nothing twice.
        if at_least_once and not options.run_id and not options.dry_run:
            options = replace(options, run_id=new_run_id())
            logger.warning(
                "Journaled as run_id=%r: the %s backend may deliver a chunk twice, and the journal "
                "applies it once. Run again with that run_id to resume.",
                options.run_id,
                self.executor.name,
            )
        self.options = options
        # workers="auto": the caller runs the first chunks while they are measured (sizing).
        self._measuring = (
            options.workers == AUTO and not self.executor.workers and self.executor.local
            and not self.executor.supports_caller_transaction
        )  # fmt: skip
        self.workers: int = self.executor.workers or (
            cpu_quota() if options.workers == AUTO else int(options.workers)
        )
        if self._measuring or self.executor.supports_caller_transaction:
            self.workers = 1  # what runs the chunks until a pool is chosen, or for good
        self.sizer = ChunkSizer(None if options.chunk_size == AUTO else int(options.chunk_size))
        if not self.executor.local:
            self.sizer.target = REMOTE_TARGET_SECONDS  # a broker's round trip is dearer
        self._pace = Pace()
        self._length = known_length(items)
        self._whole_run_dry = options.dry_run and self.executor.supports_caller_transaction
        self.task = Task(
            func=func,
            setup=options.setup,
            prepare=options.prepare,
            atomic=options.atomic,
            database=options.database,
            retries=options.retries,
            keep_values=keep_values,
            own_connections=not self.executor.supports_caller_transaction,
            load=load,
            # On the caller's connection a dry run is one transaction, rolled back at the end,
            # so later chunks see earlier ones (a duplicate across chunks fails, as for real).
            dry_run=options.dry_run and not self._whole_run_dry,
        )
        self.report = Report()
        self.resume_hint = resume_hint or _default_resume_hint(options)
        self._check_preconditions()
        self.executor.check(self.task)
        self.journal = (
            Journal.open(options, job_identity(func), self.sizer.ceiling) if options.run_id else None
        )
        self._started = False

    # -- the public drivers --------------------------------------------------------------

    def run(self) -> Report:
        for _ in self.chunks(ordered=False):
            pass
        return self.report

    def chunks(self, *, ordered: bool) -> Iterator[tuple[Chunk, ChunkResult]]:
        """Run the job, yielding each chunk with its result as it finishes (or in input order)."""
        if self._started:
            raise ConfigurationError("An engine runs once; build another for another run.")
        self._started = True
        self._clock = time.monotonic()
        self._end: _Stop | None = None
        self._scheduler = Scheduler(
            capacity=1, retries=self.options.retries, atomic=self.options.atomic,
            journaled=self.journal is not None, ordered=ordered,
        )  # fmt: skip
        self._workers_started = False
        self._said_waiting = False
        # The errors seen while every item failed (None: early_stop is off, or an item went well).
        self._alike: set[tuple[str, str]] | None = set() if self.options.early_stop else None
        self._alike_failed = 0
        self._line_of = getattr(self.items, "line_of", None)
        abandon = False
        self._bar = progress_bar(self.options.progress, self.items)
        self._rejects = open_rejects(self.options.rejects, append=bool(self.journal and self.journal.resumed))
        with Interrupts() as self._interrupts, self._dry_run_transaction():
            try:
                yield from self._pump()
            except GeneratorExit:  # the imap consumer stopped reading: finish without yielding
                self._stop(_Stop("the caller stopped reading the outcomes", Status.STOPPED, None))
                self._drain()
                raise
            except KeyboardInterrupt:  # a second Ctrl-C: abandon the chunks in flight
                abandon = True
                self._stop(_interrupted(self._interrupts.received or "Ctrl-C"))
            except WorkerStartupError as error:
                abandon = True
                if not self._scheduler.worked:
                    raise  # no worker ever ran a chunk: they could not start
                self._stop(_workers_lost(error))
            except BaseException:
                abandon = True
                self._stop(_Stop("bulkpool itself failed", Status.STOPPED, None))
                raise
            finally:
                self._finish(abandon)
        if self._end is not None and self._end.error is not None:
            raise self._end.error(self.report)

    @contextlib.contextmanager
    def _dry_run_transaction(self) -> Iterator[None]:
        """A dry run's one transaction on the caller's connection, or a note of what a dry
        run on concurrent workers cannot see."""
        if not self.options.dry_run:
            yield
            return
        if not self._whole_run_dry:
            self.report.notes.append(
                "Dry run on concurrent workers: each chunk was rolled back alone, so what one "
                "chunk does to another (a duplicate in another chunk) was not seen; "
                "backend='serial' dry-runs the whole input in one transaction."
            )
            yield
            return
        database = self.options.database
        with transaction.atomic(using=database):
            try:
                yield
            finally:
                transaction.set_rollback(True, using=database)

    # -- the loop --------------------------------------------------------------------------

    def _pump(self) -> Iterator[tuple[Chunk, ChunkResult]]:
        fresh = chunked(self.items, self._next_size)
        pending: deque[Chunk] = deque()  # planned pieces not yet sent
        exhausted = False
        scheduler = self._scheduler
        while True:
            self._notice_interrupt()
            released: list[tuple[Chunk, ChunkResult]] = []
            settled_now = 0
            while scheduler.may_send():
                chunk = scheduler.next_again() or (pending.popleft() if pending else None)
                if chunk is None:
                    if exhausted or settled_now >= scheduler.capacity or not scheduler.may_read():
                        break  # settled chunks go out to the caller before more input is read
                    exhausted, settled = self._read(fresh, pending)
                    settled_now += len(settled)
                    released += settled
                    continue
                released += self._send(chunk)
            if scheduler.in_flight == 0 and not released and (exhausted or scheduler.stopping):
                break
            if scheduler.in_flight:
                released += self._collect()
            yield from released
        yield from scheduler.flush()

    def _read(self, fresh: Iterator[Chunk], pending: deque[Chunk]) -> tuple[bool, list[Any]]:
        """Read one chunk of input and plan it; returns (input exhausted, settled pieces)."""
        try:
            chunk = next(fresh, None)
        except _JournalUnreadable as unreadable:
            raise unreadable.error from None  # as when planning fails: bulkpool's own failure
        except Exception as error:
            self._stop(_input_failed(error))
            return True, []
        if chunk is None:
            return True, []
        self.report.total += len(chunk)
        self.sizer.read(len(chunk))
        try:
            pieces = self.journal.plan(chunk) if self.journal else [(chunk, None)]
        except InputChanged as error:
            self.report.total -= len(chunk)
            message = str(error)
            self._stop(_Stop(message, Status.STOPPED, lambda r: ResumeRefused(message, r), refused=True))
            return True, []
        if self.journal is not None:
            self.journal.begin(self.resume_hint)  # the input checks out: this is an attempt
        settled = []
        for piece, done_before in pieces:
            for part, result in [(piece, done_before)] if done_before else _unreadable_apart(piece):
                if result is None:
                    pending.append(part)
                else:
                    self._record(part, result)
                    settled += self._scheduler.settled(part, result)
        return False, settled

    def _next_size(self, start: int) -> int:
        size = self.sizer.next(self._pace, left=self._left(start), workers=self.workers)
        if self.journal is None:
            return size
        try:
            return self.journal.aligned(start, size)
        except DatabaseError as error:  # the journal's failure, not the input's
            raise _JournalUnreadable(error) from error

    def _left(self, read: int) -> int | None:
        """Items not read yet, when the input's length is known (and still holds: a
        QuerySet counted when the run began may have grown since)."""
        if self._length is None or read > self._length:
            return None
        return self._length - read

    def _send(self, chunk: Chunk) -> list[tuple[Chunk, ChunkResult]]:
        if not self._workers_started:
            self._start_workers()
        elif self._measuring:
            self._choose_pool()
        try:
            self.executor.submit(chunk)
        except WorkerStartupError as error:  # a dead worker could not be replaced
            self._stop(_workers_lost(error))
            return []
        # Counted once handed over: the serial executor runs the chunk inside submit().
        self._scheduler.sent(chunk)
        return []

    def _start_workers(self) -> None:
        """Workers start when there is work for them: a rerun of a finished run starts none."""
        if self.journal is not None:
            self.task = replace(self.task, journal=self.journal.ref)
        self._workers_started = True
        if self._measuring:
            self._pool, self.executor, self.workers = self.executor, SerialExecutor(stand_in=True), 1
        with self._interrupts.raising():  # no work is in flight yet: Ctrl-C need not wait for setup
            self.executor.start(self.task, self.workers)
        self._scheduler.capacity = self.executor.capacity()

    def _choose_pool(self) -> None:
        """workers="auto": once the caller's first chunks are measured, stay serial or start the pool."""
        choice = choose_workers(self._pace, self._left(self.report.total), self._limits)
        if choice is None:
            return
        self._measuring = False
        if choice.workers > 1:
            choice = self._start_pool(choice)
        self._note_sizing(f"workers={choice.workers}: {choice.why}")

    @functools.cached_property
    def _limits(self) -> Limits:
        """What bounds the pool, looked up once, when the pool is first considered."""
        return Limits(
            cpus=cpu_quota(),
            free_connections=free_connections(self.options.database),
            single_writer=connections[self.options.database].vendor == "sqlite",
            start_seconds=self._pool.start_seconds,
        )

    def _start_pool(self, choice: Choice) -> Choice:
        pool: Executor = self._pool
        try:
            with self._interrupts.raising():  # nothing is in flight between two serial chunks
                pool.start(self.task, choice.workers)
        except WorkerStartupError as error:
            logger.warning("Could not start %s workers: going on serially.\n%s", pool.name, error)
            return Choice(1, f"the {pool.name} workers could not start ({str(error).splitlines()[0]})")
        self.executor.stop()
        self.executor, self.workers = pool, choice.workers
        self._scheduler.capacity = pool.capacity()
        return choice

    def _note_sizing(self, note: str) -> None:
        logger.info("Sizing: %s", note)
        self.report.notes.append(f"Sizing: {note}")

    def _collect(self) -> list[tuple[Chunk, ChunkResult]]:
        """Wait for events; settle finished chunks, and let the scheduler decide on lost ones."""
        released = []
        events = self.executor.events(POLL_SECONDS)
        for event in events:
            if not isinstance(event, ChunkLost):
                self._pace.add(len(event.chunk), event.result.timings)
                self._record(event.chunk, event.result)
                released += self._scheduler.finished(event.chunk, event.result)
                continue
            decision = self._scheduler.lost(event)
            if isinstance(decision, SendAgain):
                self.report.retried += decision.retried
                if event.started:
                    logger.warning("%s; sending items %s again", event.reason, _span(event.chunk))
                released += self._send_again(decision.chunks)
            elif isinstance(decision, Fail):
                if decision.record and self.journal is not None:
                    self.journal.record_lost(event.chunk, decision.result.errors)
                self._record(event.chunk, decision.result)
                released += self._scheduler.settled(event.chunk, decision.result)
            else:
                assert isinstance(decision, Drop)
        return released

    def _send_again(self, chunks: tuple[Chunk, ...]) -> list[tuple[Chunk, ChunkResult]]:
        """Queue chunks to send again -- in a journaled run, only their pieces not recorded
        yet: a chunk split on a refused COMMIT may have committed some before its worker died."""
        if self.journal is None:
            self._scheduler.again(chunks)
            return []
        released = []
        for chunk in chunks:
            to_run = []
            for piece, done in self.journal.replan(chunk):
                if done is None:
                    to_run.append(piece)
                else:  # committed in this attempt: its items count as ok (or failed)
                    self._record(piece, done)
                    released += self._scheduler.settled(piece, done)
            self._scheduler.again(to_run)
        return released

    def _drain(self) -> None:
        """Wait for the chunks in flight, counting them, without yielding them."""
        while self._scheduler.in_flight:
            self._collect()

    def _record(self, chunk: Chunk, result: ChunkResult) -> None:
        report = self.report
        self._progress(len(chunk))
        report.retried += result.retried
        if result.skipped:
            report.skipped += len(chunk) - len(result.errors)
        else:
            report.ok += len(chunk) - len(result.errors)
        first: Failure | None = None
        for offset, error in sorted(result.errors.items()):
            failure = self._failure(chunk, offset, error)
            report.add_failure(failure, earlier=result.skipped)
            if not result.skipped:
                first = first or failure
                write_reject(self._rejects, failure)
        for offset, error in sorted(result.callback_errors.items()):
            callback = self._failure(chunk, offset, error)
            report.add_callback_error(callback)
            logger.warning("An on_commit callback raised after its item was written: %s", callback.summary())
        if first is not None:
            self._stop_for_failures(first)
        if not result.skipped:
            self._stop_if_every_item_fails_alike(chunk, result)

    def _failure(self, chunk: Chunk, offset: int, error: ErrorInfo) -> Failure:
        item = chunk.items[offset]
        line = self._line_of(chunk.start + offset) if self._line_of else None
        if isinstance(item, Unreadable):
            return Failure.of(chunk.start + offset, item.text, error, item.line)
        return Failure.of(chunk.start + offset, item, error, line)

    def _stop_if_every_item_fails_alike(self, chunk: Chunk, result: ChunkResult) -> None:
        """The first items all failing with one error is a mistake in the function or the
        columns, not in the data: stop, rather than fail every item of the input."""
        seen = self._alike
        if seen is None:
            return
        if len(result.errors) < len(chunk):  # an item went well: it is the data that fails
            self._alike = None
            return
        if any(error.exc_type.startswith("bulkpool.") for error in result.errors.values()):
            return  # bulkpool's own (a lost worker, an unreadable line): no sign of a mistake
        seen.update((error.exc_type, error.message) for error in result.errors.values())
        self._alike_failed += len(result.errors)
        if len(seen) > 1:
            self._alike = None
            return
        if self._alike_failed < EARLY_STOP_AFTER:
            return
        ((exc_type, message),) = seen
        self._alike = None
        self._stop(
            _Stop(
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
        )

    def _stop_for_failures(self, first: Failure) -> None:
        report, options = self.report, self.options
        if options.on_error == "raise":
            self._stop(
                _Stop("an item failed (on_error='raise')", Status.STOPPED, lambda r: ItemFailed(first, r))
            )
        elif (
            options.max_failures is not None and report.failed - report.failed_before >= options.max_failures
        ):
            self._stop(
                _Stop(
                    f"{report.failed - report.failed_before:,} items failed "
                    f"(max_failures={options.max_failures})",
                    Status.STOPPED,
                    lambda r: TooManyFailures(f"Stopped after {r.failed - r.failed_before:,} failures.", r),
                )
            )

    # -- stopping and finishing ------------------------------------------------------------

    def _stop(self, stop: _Stop) -> None:
        """The first reason to stop wins; nothing more is sent after it."""
        if self._end is None:
            self._end = stop
            self.report.stopped_early = stop.reason
            if self._workers_started:
                self.executor.withdraw()  # chunks queued in a broker need not run
        self._scheduler.stopping = True

    def _notice_interrupt(self) -> None:
        received = self._interrupts.received
        if received and not self._scheduler.stopping:
            self._stop(_interrupted(received))
        if received and self._scheduler.in_flight and not self._said_waiting:
            self._said_waiting = True
            self._bar_write(
                f"Interrupted ({received}): waiting for {self._scheduler.in_flight} chunks in flight "
                f"to commit or roll back ({received} again to abandon them)..."
            )

    def _finish(self, abandon: bool) -> None:
        """The one end of every run: stop the workers, close the bar, the journal, the log."""
        report = self.report
        report.elapsed = time.monotonic() - self._clock
        if self._measuring and self._workers_started and self._end is None:
            self._note_sizing("workers=1: the whole input ran in the caller while it was measured")
        if chunks := self.sizer.summary():
            self._note_sizing(chunks)
        try:
            if self._workers_started:
                self.executor.stop(cancel=abandon)
        finally:
            self._bar.close()
            if self._rejects is not None:
                self._rejects.close()
            status = self._end.status if self._end is not None else Status.FINISHED
            if status == Status.FINISHED and report.not_run:
                status = Status.STOPPED
            report.interrupted = status == Status.INTERRUPTED
            if (
                self.journal is not None
                and self._end is not None
                and self._end.refused
                and not self._workers_started
            ):
                self.journal.undo_begin()
            elif self.journal is not None:
                self.journal.close(report, status)
            if report.interrupted:
                how = "Abandoned the chunks in flight: their transactions rolled back.\n" if abandon else ""
                logger.warning("%s%s\n%s", how, report, self.resume_hint)

    def _progress(self, items_done: int) -> None:
        if getattr(self._bar, "unit", "") == "B":
            self._bar.update(self.items.position - self._bar.n)  # type: ignore[attr-defined]
        else:
            self._bar.update(items_done)

    def _bar_write(self, message: str) -> None:
        if isinstance(self._bar, tqdm):
            self._bar.clear()
        logger.warning(message)

    # -- checks before item one ------------------------------------------------------------

    def _check_preconditions(self) -> None:
        options = self.options
        if options.run_id and options.atomic != "chunk":
            raise ConfigurationError(
                f"run_id needs atomic='chunk' (not {options.atomic!r}): the journal row of a chunk "
                "is written in the chunk's own transaction."
            )
        if options.run_id and options.dry_run:
            raise ConfigurationError(
                "A dry run commits nothing, so there is nothing to journal: drop run_id."
            )
        if options.dry_run and options.atomic is False:
            raise ConfigurationError("dry_run needs transactions to roll back: use atomic='chunk' or 'item'.")
        name = self.executor.name or type(self.executor).__name__
        database = self.options.database
        connection = connections[database]
        if not self.executor.supports_caller_transaction and connection.in_atomic_block:
            raise ConfigurationError(
                f"bulkpool was called inside a transaction on database {database!r} "
                "(transaction.atomic(), ATOMIC_REQUESTS or a TestCase), but the "
                f"{name} backend's workers use their own connections and cannot see its "
                "uncommitted rows. Call it outside the transaction, or use backend='serial' "
                "(in tests: TransactionTestCase or @pytest.mark.django_db(transaction=True))."
            )
        if (
            connection.vendor == "sqlite"
            and connection.is_in_memory_db()  # type: ignore[attr-defined]
            and not self.executor.supports_memory_sqlite
        ):
            raise ConfigurationError(
                f"Database {database!r} is an in-memory SQLite database, which only this "
                f"connection can see, so the {name} backend's workers cannot use it. Use a "
                "file database (in tests, set DATABASES[...]['TEST']['NAME'] to a file path) "
                "or backend='serial'."
            )


# -- the ways a run stops ------------------------------------------------------------------


def _interrupted(received: str) -> _Stop:
    return _Stop(
        f"interrupted ({received})",
        Status.INTERRUPTED,
        lambda r: RunInterrupted(f"Interrupted ({received}).", r),
    )


def _input_failed(error: Exception) -> _Stop:
    def raise_it(report: Report) -> BaseException:
        failed = InputFailed(f"Reading the input failed: {type(error).__name__}: {error}", report)
        failed.__cause__ = error
        return failed

    if isinstance(error, InputError):
        reason = f"bad input at line {error.line or '?'} of {error.path}"
    else:
        reason = f"the input raised {type(error).__name__}: {error}"
    return _Stop(reason, Status.STOPPED, raise_it)


def _workers_lost(error: WorkerStartupError) -> _Stop:
    def raise_it(report: Report) -> BaseException:
        lost = WorkersLost(f"A worker died and none could be started in its place: {error}", report)
        lost.__cause__ = error
        return lost

    return _Stop("a worker died and none could be started in its place", Status.STOPPED, raise_it)


def _unreadable_apart(piece: Chunk) -> list[tuple[Chunk, ChunkResult | None]]:
    """The piece in runs of items to send, and items the input could not read, which fail
    at once without running (``on_bad_line="skip"``)."""
    if not any(isinstance(item, Unreadable) for item in piece.items):
        return [(piece, None)]
    parts: list[tuple[Chunk, ChunkResult | None]] = []
    start = piece.start
    for index, item in piece.indexed():
        if isinstance(item, Unreadable):
            if start < index:
                parts.append((piece.piece(start, index), None))
            parts.append((piece.piece(index, index + 1), ChunkResult(piece.number, None, {0: item.error})))
            start = index + 1
    if start < piece.end:
        parts.append((piece.piece(start, piece.end), None))
    return parts


def _default_resume_hint(options: Options) -> str:
    if options.run_id:
        return (
            f"To resume, run it again with run_id={options.run_id!r}: the chunks already "
            "committed are skipped."
        )
    return "Nothing records what was done; pass run_id=... to make a run resumable."


def _span(chunk: Chunk) -> str:
    return f"{chunk.start}..{chunk.end - 1}"
