"""Drive one job over an executor: a bounded window of chunks in flight, results, Ctrl-C.

Data flow:

    items --chunked()--> Chunk --submit()--> executor --events()--> ChunkDone / ChunkLost
                                                                        |
        Report, progress bar, rejects file, imap outcomes  <--_record()-+

At most ``executor.capacity()`` chunks are in flight (for ordered ``imap``, not yet
yielded), and items are read from the input only to fill that window: memory stays flat
however long the input. A chunk whose worker died (``ChunkLost``) ran in a transaction that
rolled back with the worker, so it is sent again, up to ``retries`` times; then it is split
into single items, so an item that kills its worker fails alone. A worker that died during
COMMIT (``in_doubt``) may have committed: its chunk is sent again only if the journal can
tell (``run_id``); otherwise its items are reported ``bulkpool.CommitUnknown``.

Ctrl-C: the first stops the feeding and lets the chunks in flight finish (they commit or
roll back), prints the report and re-raises; a second abandons them at once.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import IO, Any

from django.db import connections
from tqdm import tqdm

from bulkpool.chunking import Chunk, chunked, known_length
from bulkpool.errors import ConfigurationError, ItemFailed, RunAborted, TooManyFailures
from bulkpool.executors import ChunkLost, resolve
from bulkpool.journal import Journal
from bulkpool.options import Options
from bulkpool.outcomes import ErrorInfo, Failure, Report
from bulkpool.protocol import ChunkResult, Task

POLL_SECONDS = 0.5


class Engine:
    def __init__(
        self,
        func: Callable[..., Any],
        items: Iterable[Any],
        options: Options,
        *,
        keep_values: bool = False,
        load: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        if not callable(func):
            raise ConfigurationError(f"func must be callable, not {type(func).__name__}.")
        self.items = items
        self.options = options
        self.executor = resolve(options.backend)
        self.workers = self.executor.workers or options.workers
        self.task = Task(
            func=func,
            setup=options.setup,
            atomic=options.atomic,
            database=options.database,
            retries=options.retries,
            keep_values=keep_values,
            own_connections=not self.executor.supports_caller_transaction,
            load=load,
            dry_run=options.dry_run,
        )
        self.report = Report()
        self._check_preconditions()
        self.executor.check(self.task)
        self.journal = Journal.open(options, func) if options.run_id else None
        if self.journal is not None:
            self.task = replace(self.task, journal=self.journal.ref)

    # -- the public drivers --------------------------------------------------------------

    def run(self) -> Report:
        for _ in self.chunks(ordered=False):
            pass
        return self.report

    def chunks(self, *, ordered: bool) -> Iterator[tuple[Chunk, ChunkResult]]:
        """Run the job, yielding each chunk with its result as it finishes (or in order)."""
        started = time.monotonic()
        self._stop: Callable[[], RunAborted] | None = None
        self._in_flight = 0
        self._attempts: dict[tuple[int, int], int] = {}
        cancel = False
        with (
            _sigterm_as_interrupt(),
            _progress_bar(self.options.progress, known_length(self.items)) as self._bar,
            _rejects_file(self.options.rejects) as self._rejects,
        ):
            try:
                self.executor.start(self.task, self.workers)
                yield from self._pump(ordered, started)
            except KeyboardInterrupt:
                cancel = self._finish_after_interrupt(started)
                raise
            finally:
                self.report.elapsed = time.monotonic() - started
                self.executor.stop(cancel=cancel)
                if self.journal is not None:
                    self.journal.close(self.report)
        if self._stop is not None:
            raise self._stop()  # built now, so its message tells the final count

    # -- the loop --------------------------------------------------------------------------

    def _pump(self, ordered: bool, started: float) -> Iterator[tuple[Chunk, ChunkResult]]:
        fresh = chunked(self.items, self.options.chunk_size)
        again: list[Chunk] = []
        waiting: dict[int, tuple[Chunk, ChunkResult]] = {}  # finished early, for ordered output
        next_start = 0
        exhausted = False
        while True:
            skipped = []  # chunks the journal says are done: they are not sent anywhere
            while self._stop is None and self._room(len(waiting), bool(again)):
                if again:
                    chunk = again.pop()
                elif exhausted or (chunk := next(fresh, None)) is None:  # type: ignore[assignment]
                    exhausted = True
                    break
                else:
                    self.report.total += len(chunk)
                    if self.journal is not None and self.journal.is_done(chunk):
                        skipped.append((chunk, ChunkResult(chunk.number, None, skipped=True)))
                        if len(skipped) >= self.executor.capacity():
                            break
                        continue
                # Counted once handed over: the serial executor runs the chunk inside submit(),
                # and a Ctrl-C there rolls it back, so it is not in flight.
                self.executor.submit(chunk)
                self._in_flight += 1
            if self._in_flight == 0 and not skipped:
                break
            for chunk, result in skipped:
                self._record(chunk, result)
            finished = self._collect(again) if self._in_flight else []
            for chunk, result in skipped + finished:
                self.report.elapsed = time.monotonic() - started
                if not ordered:
                    yield chunk, result
                    continue
                waiting[chunk.start] = (chunk, result)
                while next_start in waiting:
                    chunk, result = waiting.pop(next_start)
                    next_start += len(chunk)
                    yield chunk, result

    def _room(self, waiting: int, retrying: bool) -> bool:
        """Whether another chunk may go out: the workers need one, and (for ordered output)
        not too many results wait for an earlier chunk. Chunks sent again always may: an
        earlier one may be what the waiting results wait for."""
        capacity = self.executor.capacity()
        if self._in_flight >= capacity:
            return False
        return retrying or self._in_flight + waiting < 2 * capacity

    def _collect(self, again: list[Chunk]) -> list[tuple[Chunk, ChunkResult]]:
        """Wait for events; record finished chunks, queue lost ones to run again."""
        finished = []
        for event in self.executor.events(POLL_SECONDS):
            self._in_flight -= 1
            if isinstance(event, ChunkLost):
                result = self._retry_or_fail(event, again)
                if result is None:
                    continue
                chunk = event.chunk
            else:
                chunk, result = event.chunk, event.result
            self._record(chunk, result)
            finished.append((chunk, result))
        return finished

    def _retry_or_fail(self, lost: ChunkLost, again: list[Chunk]) -> ChunkResult | None:
        chunk = lost.chunk
        key = (chunk.start, len(chunk))
        self._attempts[key] = self._attempts.get(key, 0) + 1  # only lost chunks are counted
        if lost.in_doubt and self.journal is None:
            unknown = ErrorInfo(
                "bulkpool.CommitUnknown",
                f"{lost.reason} during COMMIT, so whether this item was written is unknown; it "
                "was not run again, so that it cannot be written twice. Check it, or use "
                "run_id=..., with which bulkpool finds out and resumes exactly",
                "",
            )
            return ChunkResult(chunk.number, None, dict.fromkeys(range(len(chunk)), unknown))
        if self.report.interrupted:  # nothing is sent any more: it rolled back, and stays not run
            return None
        if self.options.atomic != "chunk":
            message = (
                f"{lost.reason}; with atomic={self.options.atomic!r} some items of this chunk "
                "may have been written, so it was not run again"
            )
        elif self._attempts[key] <= self.options.retries:
            self.report.retried += len(chunk)
            again.append(chunk)
            return None
        elif len(chunk) > 1:  # find the item that kills its worker by running each alone
            singles = [Chunk(chunk.number, index, [item]) for index, item in chunk.indexed()]
            self.report.retried += len(chunk)
            again.extend(reversed(singles))
            return None
        else:
            message = f"{lost.reason} while running this item, {self._attempts[key]} times"
        error = ErrorInfo("bulkpool.WorkerDied", message, "")
        return ChunkResult(chunk.number, None, dict.fromkeys(range(len(chunk)), error))

    def _record(self, chunk: Chunk, result: ChunkResult) -> None:
        report = self.report
        self._bar.update(len(chunk))
        if result.skipped:
            report.skipped += len(chunk)
            return
        report.ok += len(chunk) - len(result.errors)
        report.failed += len(result.errors)
        report.retried += result.retried
        for offset, error in sorted(result.errors.items()):
            failure = Failure.of(chunk.start + offset, chunk.items[offset], error)
            report.failures.append(failure)
            _write_reject(self._rejects, failure)
        if result.errors and self._stop is None:
            self._stop = self._stop_reason()

    def _stop_reason(self) -> Callable[[], RunAborted] | None:
        """Why no more work goes out, if it should not; the error is raised once in-flight work is in."""
        report, options = self.report, self.options
        if options.on_error == "raise":
            report.stopped_early = "an item failed (on_error='raise')"
            return lambda: ItemFailed(report.failures[0], report)
        if options.max_failures is not None and report.failed >= options.max_failures:
            report.stopped_early = f"{report.failed} items failed (max_failures={options.max_failures})"
            return lambda: TooManyFailures(f"Stopped after {report.failed} failures.", report)
        return None

    # -- Ctrl-C ----------------------------------------------------------------------------

    def _finish_after_interrupt(self, started: float) -> bool:
        """Let the chunks in flight finish; return True if a second Ctrl-C abandoned them."""
        self.report.interrupted = True
        self.report.stopped_early = "interrupted (Ctrl-C)"
        _say(
            f"\nInterrupted: waiting for {self._in_flight} chunks in flight to commit or roll "
            "back (Ctrl-C again to abandon them)..."
        )
        try:
            while self._in_flight > 0:
                self._collect([])
        except KeyboardInterrupt:
            _say("Abandoned the chunks in flight: their transactions roll back.")
            return True
        finally:
            self.report.elapsed = time.monotonic() - started
            _say(str(self.report))
            _say(self._how_to_resume())
        return False

    def _how_to_resume(self) -> str:
        if self.options.run_id:
            return (
                f"To resume, run it again with run_id={self.options.run_id!r}: the chunks "
                "already committed are skipped."
            )
        return "Nothing records what was done; pass run_id=... to make a run resumable."

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
        database = self.options.database
        connection = connections[database]
        name = self.executor.name or type(self.executor).__name__
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


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress_bar(progress: bool | None, total: int | None) -> Any:
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return _NoBar()
    return tqdm(total=total, unit="item", desc="bulkpool", file=sys.stderr, smoothing=0.1)


class _rejects_file:
    """The rejects JSON Lines file, or nothing when ``rejects`` is None."""

    def __init__(self, path: Any) -> None:
        self.path = path

    def __enter__(self) -> IO[str] | None:
        self.file = open(self.path, "w", encoding="utf-8") if self.path else None
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()


def _write_reject(file: IO[str] | None, failure: Failure) -> None:
    if file is None:
        return
    line = {
        "index": failure.index,
        "item": failure.item,
        "exc_type": failure.exc_type,
        "message": failure.message,
    }
    file.write(json.dumps(line, default=repr, ensure_ascii=False) + "\n")
    file.flush()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like a first Ctrl-C while a run is going (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
