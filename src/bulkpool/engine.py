"""Drive one job over an executor. Orchestration only: each policy lives in its own unit.

Data flow:

    items --chunked()--> Chunk --Journal.plan()--> pieces to run --submit()--> executor
                                           \\--> pieces done before (skipped)      |
                                                                               events()
    imap outcomes <--yield-- ChunkDone / ChunkLost (Scheduler decides)
                                 |
                              _record() --> Output: report, progress bar, rejects file
                                        --> StopPolicy: does this stop the run?

Who decides what: ``Scheduler`` (scheduling) what to send and what to do with a lost chunk;
``Pool`` (pooling) which executor to send to and how big the next chunk is; ``StopPolicy``
(stopping) whether the run stops and with which exception; ``Output`` (reporting) the
report, the progress bar and the rejects file. The engine reads the input, plans it with
the journal, and passes events from one to the next.

Items are read from the input only to fill the window the Scheduler allows, so memory stays
flat however long the input.

One way to finish. Every end of a run goes through ``_stop()`` and the ``finally`` of
``chunks()``: done; Ctrl-C or SIGTERM; ``on_error="raise"``; ``max_failures``; the input
raising, or holding SQLite's read lock (``sqlite_locks``); a journal that refuses the
input; a worker that cannot be replaced; an ``imap`` consumer that stops reading. After a
stop nothing more is sent, the chunks in flight are drained (they commit or roll back, and
are counted), the journal gets the status of what happened (``finished`` only when every
item ran), and one exception carrying the partial report is raised: a ``RunAborted``
subclass, or ``RunInterrupted`` for Ctrl-C / SIGTERM. A second Ctrl-C abandons the chunks
in flight (their transactions roll back).

Signal handlers only set a flag (``Interrupts``); the engine reads it between events.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

from django.db import DatabaseError, connections, transaction

from bulkpool import sqlite_locks, stopping
from bulkpool.chunking import chunked, known_length
from bulkpool.errors import ConfigurationError, WorkerStartupError
from bulkpool.executors import Executor, resolve
from bulkpool.interrupts import Interrupts
from bulkpool.journal import InputChanged, Journal, job_identity, new_run_id
from bulkpool.options import Options
from bulkpool.outcomes import Failure, Report
from bulkpool.pooling import Pool
from bulkpool.protocol import Chunk, ChunkLost, ChunkResult, Task, Unreadable
from bulkpool.reporting import Output
from bulkpool.scheduling import Drop, Fail, Scheduler, SendAgain, settled_apart
from bulkpool.stopping import Stop, StopPolicy

logger = logging.getLogger("bulkpool")

POLL_SECONDS = 0.5


class _JournalUnreadable(Exception):
    """Reading the journal failed while the next chunk was being cut from the input."""

    def __init__(self, error: DatabaseError) -> None:
        super().__init__(str(error))
        self.error = error


class Engine:
    """One run of ``func`` over ``items``: reads, plans, sends, collects, finishes."""

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
        executor = resolve(options.backend)
        executor.check_options(options)
        self.options = options = _journaled_if_redelivered(options, executor)
        self.report = Report()
        self.output = Output(self.report, items, progress=options.progress, rejects=options.rejects)
        self.pool = Pool(executor, options, length=known_length(items), note=self.output.note)
        self.stops = StopPolicy(options, self.report)
        # On the caller's connection a dry run is one transaction, rolled back at the end,
        # so later chunks see earlier ones (a duplicate across chunks fails, as for real).
        self._whole_run_dry = options.dry_run and executor.supports_caller_transaction
        self.task = _task(func, options, executor, keep_values=keep_values, load=load)
        self.resume_hint = resume_hint or _default_resume_hint(options)
        _check_preconditions(options, executor)
        executor.check(self.task)
        # Workers in other processes can be kept from committing by a read the input holds
        # open (SQLite): looked for after each chunk is read. With threads, only before the
        # pool starts: once it has, the process's locks may be its workers'.
        in_caller = executor.supports_caller_transaction
        self._lock_watch = None if in_caller else sqlite_locks.watch(options.database)
        self._watch_running_pool = not executor.shares_interpreter
        self.journal = (
            Journal.open(options, job_identity(func), self.pool.ceiling) if options.run_id else None
        )
        self._started = False
        self._asked = 0  # the size of the chunk read last: one read short, the input has ended
        # A chunk read ahead of its turn, with the size asked for it (or what reading it raised)
        self._ahead: tuple[Chunk, int] | Exception | None = None

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
        self._scheduler = Scheduler(
            capacity=1, retries=self.options.retries, atomic=self.options.atomic,
            journaled=self.journal is not None, ordered=ordered,
        )  # fmt: skip
        abandon = False
        self.output.open()
        with Interrupts() as self._interrupts, _dry_run(self.options, self._whole_run_dry, self.report):
            try:
                yield from self._pump()
            except GeneratorExit:  # the imap consumer stopped reading: finish without yielding
                self._stop(stopping.consumer_stopped())
                self._drain()
                raise
            except KeyboardInterrupt:  # a second Ctrl-C: abandon the chunks in flight
                abandon = True
                self._stop(stopping.interrupted(self._interrupts.received or "Ctrl-C"))
            except WorkerStartupError as error:
                abandon = True
                if not self._scheduler.worked:
                    raise  # no worker ever ran a chunk: they could not start
                self._stop(stopping.workers_lost(error))
            except BaseException:
                abandon = True
                self._stop(stopping.crashed())
                raise
            finally:
                self._finish(abandon)
        ending = self.stops.error()
        if ending is not None:
            raise ending

    # -- the loop --------------------------------------------------------------------------

    def _pump(self) -> Iterator[tuple[Chunk, ChunkResult]]:
        self._input = iter(self.items)
        fresh = chunked(self._input, self._next_size)
        pending: deque[Chunk] = deque()  # planned pieces not yet sent
        exhausted = False
        scheduler = self._scheduler
        while True:
            self._notice_interrupt()
            if self.journal is not None:
                self.journal.beat()  # the run's lease on its run_id, renewed now and then
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
                self._send(chunk)
            if scheduler.in_flight == 0 and not released and (exhausted or scheduler.stopping):
                break
            if scheduler.in_flight:
                released += self._collect()
            yield from released
        if isinstance(self._ahead, tuple):  # a stop came between: read, so counted, but not run
            yield from self._read(fresh, pending)[1]
        yield from scheduler.flush()

    def _read(self, fresh: Iterator[Chunk], pending: deque[Chunk]) -> tuple[bool, list[Any]]:
        """Read one chunk of input and plan it; returns (input exhausted, settled pieces)."""
        locked_before = self._caller_holds_a_lock(at_once=True)
        try:
            chunk, ended = self._next_chunk(fresh)
        except _JournalUnreadable as unreadable:
            raise unreadable.error from None  # as when planning fails: bulkpool's own failure
        except Exception as error:
            self._stop(stopping.input_failed(error))
            return True, []
        if chunk is None:
            return True, []
        self.report.total += len(chunk)
        self.pool.read(len(chunk))
        pieces: list[tuple[Chunk, ChunkResult | None]] = [(chunk, None)]
        try:
            if self.journal is not None:
                pieces = self.journal.plan(chunk)
        except InputChanged as error:
            self.report.total -= len(chunk)
            self._ahead = None  # refused with it: read, not counted, as the chunk before
            self._stop(stopping.input_refused(str(error)))
            return True, []
        if self.journal is not None:
            self.journal.begin(self.resume_hint)  # the input checks out: this is an attempt
        to_send, settled = self._apart(pieces, ended=ended)
        if to_send and not locked_before and self._caller_holds_a_lock():
            self._stop_reading_locked_input(fresh)  # what it would send counts as not run
            return True, settled
        pending.extend(to_send)
        return False, settled

    def _next_chunk(self, fresh: Iterator[Chunk]) -> tuple[Chunk | None, bool]:
        """The next chunk of input, and whether the input ends within it (it came back
        shorter than asked for). Where the pool shares out the end of an input of unknown
        length, a full chunk waits for the next to be read: if that one is short, or there
        is none, the input ends within the two, and both are shared out -- else the last
        full chunk could keep one worker busy while the others had nothing left. What
        reading the next one raises is raised at the next read, after this chunk is sent.
        (Not while a read lock the input holds would be blamed on it: the chunk read ahead
        would be the one that took it, and the clean chunk before it would be stopped with it.)"""
        ahead, self._ahead = self._ahead, None
        if isinstance(ahead, Exception):
            raise ahead
        chunk, asked = ahead if ahead is not None else (next(fresh, None), self._asked)
        if chunk is None or len(chunk) < asked:
            return chunk, True
        watching = self._lock_watch is not None and (not self.pool.started or self._watch_running_pool)
        if self._scheduler.stopping or watching or not self.pool.shares_out_an_unknown_end:
            return chunk, False
        try:
            follower = next(fresh, None)
        except _JournalUnreadable:  # bulkpool's own failure: raised at once; this chunk was read
            self._ahead = (chunk, asked)
            raise
        except Exception as error:  # the input's: this chunk goes out first
            self._ahead = error
            return chunk, False
        except BaseException:  # a second Ctrl-C while reading: this chunk was read
            self._ahead = (chunk, asked)
            raise
        if follower is None:
            return chunk, True
        self._ahead = (follower, self._asked)
        return chunk, len(follower) < self._asked

    def _apart(
        self, pieces: list[tuple[Chunk, ChunkResult | None]], *, ended: bool
    ) -> tuple[list[Chunk], list[Any]]:
        """A planned chunk's pieces to send, and those settled already (done before, or
        lines the input could not read). ``ended``: the input ended within the chunk, so
        the rest of the run is known, and it is shared out among the workers."""
        to_send: list[Chunk] = []
        settled = []
        for piece, done_before in pieces:
            for part, result in [(piece, done_before)] if done_before else _unreadable_apart(piece):
                if result is None:
                    to_send.extend(self.pool.share_out(part) if ended else [part])
                    continue
                if done_before is None and self.journal is not None:  # a line it could not read
                    self.journal.record_lost(part, result.errors)  # a failure like any other
                settled += self._settle(part, result)
        return to_send, settled

    def _caller_holds_a_lock(self, *, at_once: bool = False) -> bool:
        """This process holds SQLite's read lock (``sqlite_locks``): now, or (by default)
        still after ``HELD_SECONDS``. Looked at before and after each chunk is read: a lock
        that reading the chunk took, and kept, is the input's; one held before it began is
        another thread's. With threads, only until the pool starts: its workers' locks are
        the process's too."""
        watch = self._lock_watch
        if watch is None or (self.pool.started and not self._watch_running_pool):
            return False
        return watch.holds_now() if at_once else watch.held()

    def _stop_reading_locked_input(self, fresh: Iterator[Chunk]) -> None:
        """The input keeps a read open that no worker can commit past: the run stops, and
        the input is closed (a generator's ``close()``), which ends its read, so that the
        chunks in flight can commit. (An input with no ``close()``, a ``map()`` say, keeps
        it: those chunks wait out their busy timeout, and fail as "database is locked".
        Closing the caller's connection would not end it: SQLite keeps a connection whose
        statements are still open until they are finalized.)"""
        assert self._lock_watch is not None
        self._stop(stopping.input_holds_lock(self._lock_watch.explain()))
        for reader in (fresh, self._input):
            close = getattr(reader, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()

    def _next_size(self, start: int) -> int:
        """The pool's next chunk size, stretched to the journal's ranges when resuming."""
        size = self.pool.next_size(start)
        if self.journal is not None:
            try:
                size = self.journal.aligned(start, size)
            except DatabaseError as error:  # the journal's failure, not the input's
                raise _JournalUnreadable(error) from error
        self._asked = size
        return size

    def _send(self, chunk: Chunk) -> None:
        if not self.pool.started and self.journal is not None:
            self.task = replace(self.task, journal=self.journal.ref)  # begun by the first read
        executor = self.pool.send_to(self.task, self._interrupts)
        self._scheduler.capacity = self.pool.capacity
        chunk = self.pool.shape(chunk)
        try:
            executor.submit(chunk)
        except WorkerStartupError as error:  # a dead worker could not be replaced
            self._stop(stopping.workers_lost(error))
            return
        # Counted once handed over: the serial executor runs the chunk inside submit().
        self._scheduler.sent(chunk)

    def _collect(self) -> list[tuple[Chunk, ChunkResult]]:
        """Wait for events; settle finished chunks, and let the scheduler decide on lost ones."""
        released = []
        for event in self.pool.executor.events(POLL_SECONDS):
            if not isinstance(event, ChunkLost):
                self.pool.measured(event.chunk, event.result.timings)
                self._record(event.chunk, event.result)
                released += self._scheduler.finished(event.chunk, event.result)
                continue
            if event.chunk.each_item:
                done, event = settled_apart(event, journaled=self._scheduler.journaled)
                for piece, result in done:
                    released += self._settle(piece, result)
            decision = self._scheduler.lost(event)
            if isinstance(decision, SendAgain):
                self.output.sending_again(event, decision.retried)
                released += self._send_again(decision.chunks)
            elif isinstance(decision, Fail):
                if decision.record and self.journal is not None:
                    self.journal.record_lost(event.chunk, decision.result.errors)
                released += self._settle(event.chunk, decision.result)
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
                    released += self._settle(piece, done)
            self._scheduler.again(to_run)
        return released

    def _drain(self) -> None:
        """Wait for the chunks in flight, counting them, without yielding them."""
        while self._scheduler.in_flight:
            self._collect()

    def _settle(self, chunk: Chunk, result: ChunkResult) -> list[tuple[Chunk, ChunkResult]]:
        """A chunk settled without coming back from a worker (done before, unreadable, lost)."""
        self._record(chunk, result)
        return self._scheduler.settled(chunk, result)

    def _record(self, chunk: Chunk, result: ChunkResult) -> None:
        first = self.output.record(chunk, result)
        stop = self.stops.after(chunk, result, first)
        if stop is not None:
            self._stop(stop)

    # -- stopping and finishing ------------------------------------------------------------

    def _stop(self, stop: Stop) -> None:
        """The first reason to stop wins; nothing more is sent after it."""
        if self.stops.decide(stop):
            self.pool.withdraw()
        self._scheduler.stopping = True

    def _notice_interrupt(self) -> None:
        received = self._interrupts.received
        if received and not self._scheduler.stopping:
            self._stop(stopping.interrupted(received))
        if received and self._scheduler.in_flight:
            self.output.waiting(received, self._scheduler.in_flight)

    def _finish(self, abandon: bool) -> None:
        """The one end of every run: stop the workers, close the bar, the log, the journal."""
        self.report.elapsed = time.monotonic() - self._clock
        if isinstance(self._ahead, tuple):  # read ahead when the run broke off: not run
            self.report.total += len(self._ahead[0])
        try:
            self.pool.close(stopped=self.stops.stop is not None, cancel=abandon)
        finally:
            status = self.stops.conclude()
            recorded_after = _not_read_yet(self.journal, self.report) if self.stops.stop is not None else ()
            self.output.close(abandoned=abandon, resume_hint=self.resume_hint, recorded_after=recorded_after)
            if self.journal is not None and self.stops.refused and not self.pool.started:
                self.journal.undo_begin()  # nothing was sent: the journal's run stays as it was
            elif self.journal is not None:
                self.journal.close(self.report, status)


def _not_read_yet(journal: Journal | None, report: Report) -> Iterable[Failure]:
    """The failures a resumed run that stopped early recorded in earlier attempts past the
    input it read: its rejects file is written afresh, and must still hold them."""
    if journal is None or not journal.resumed:
        return ()
    return journal.failures_from(report.total)


# -- before item one -----------------------------------------------------------------------


def _journaled_if_redelivered(options: Options, executor: Executor) -> Options:
    """A backend that may deliver a chunk twice needs the journal to apply it once."""
    at_least_once = getattr(executor, "delivery", "exactly_once") != "exactly_once"
    # A dry run commits nothing, so a chunk delivered twice applies nothing twice.
    if not at_least_once or options.run_id or options.dry_run:
        return options
    options = replace(options, run_id=new_run_id())
    logger.warning(
        "Journaled as run_id=%r: the %s backend may deliver a chunk twice, and the journal "
        "applies it once. Run again with that run_id to resume.",
        options.run_id,
        executor.name,
    )
    return options


def _task(
    func: Callable[..., Any],
    options: Options,
    executor: Executor,
    *,
    keep_values: bool,
    load: Callable[[list[Any]], list[Any]] | None,
) -> Task:
    return Task(
        func=func,
        setup=options.setup,
        prepare=options.prepare,
        atomic=options.atomic,
        database=options.database,
        retries=options.retries,
        keep_values=keep_values,
        own_connections=not executor.supports_caller_transaction,
        load=load,
        # A whole-run dry run rolls back once at the end (_dry_run), not chunk by chunk.
        dry_run=options.dry_run and not executor.supports_caller_transaction,
    )


@contextlib.contextmanager
def _dry_run(options: Options, whole_run: bool, report: Report) -> Iterator[None]:
    """A dry run's one transaction on the caller's connection (``whole_run``), or a note of
    what a dry run on concurrent workers cannot see."""
    if not options.dry_run:
        yield
        return
    if not whole_run:
        report.notes.append(
            "Dry run on concurrent workers: each chunk was rolled back alone, so what one "
            "chunk does to another (a duplicate in another chunk) was not seen; "
            "backend='serial' dry-runs the whole input in one transaction."
        )
        yield
        return
    with transaction.atomic(using=options.database):
        try:
            yield
        finally:
            transaction.set_rollback(True, using=options.database)


def _check_preconditions(options: Options, executor: Executor) -> None:
    """Refuse, before item one, what this executor or these options cannot run safely."""
    if options.run_id and options.atomic != "chunk":
        raise ConfigurationError(
            f"run_id needs atomic='chunk' (not {options.atomic!r}): the journal row of a chunk "
            "is written in the chunk's own transaction."
        )
    if options.run_id and options.dry_run:
        raise ConfigurationError("A dry run commits nothing, so there is nothing to journal: drop run_id.")
    if options.dry_run and options.atomic is False:
        raise ConfigurationError("dry_run needs transactions to roll back: use atomic='chunk' or 'item'.")
    name = executor.name or type(executor).__name__
    database = options.database
    connection = connections[database]
    if not executor.supports_caller_transaction and connection.in_atomic_block:
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
        and not executor.supports_memory_sqlite
    ):
        raise ConfigurationError(
            f"Database {database!r} is an in-memory SQLite database, which only this "
            f"connection can see, so the {name} backend's workers cannot use it. Use a "
            "file database (in tests, set DATABASES[...]['TEST']['NAME'] to a file path) "
            "or backend='serial'."
        )


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
