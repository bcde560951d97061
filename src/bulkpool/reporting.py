"""What a run shows and leaves as it goes: the report, the progress bar, the rejects file, the log.

One sink, ``Output``, fed by the engine as chunks settle:

    engine --record(chunk, result)--> Output --> Report (counts, failures, callback errors)
                                             --> progress bar (items, or bytes of a file input)
                                             --> rejects file (one JSON line per failure)
                                             --> the "bulkpool" logger (callback errors)
           --sending_again(lost, retried)--> the report's retries, and the log
           --note(text) / say(text)--> the report's notes and the log, past the bar

It alone reads the input's ``line_of`` and ``position``, so the engine never reaches into
the input layer.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

from bulkpool.chunking import known_length
from bulkpool.outcomes import Failure, Report
from bulkpool.protocol import UNREADABLE, Chunk, ChunkLost, ChunkResult, ErrorInfo, Unreadable

logger = logging.getLogger("bulkpool")


class Output:
    """The report and what shows it as a run goes: open it, ``record`` each settled chunk, close it."""

    def __init__(self, report: Report, items: Any, *, progress: bool | None, rejects: Any) -> None:
        self.report = report
        self._items = items
        self._line_of = getattr(items, "line_of", None)
        self._show = progress
        self._rejects_path = rejects
        self._bar: Any = NoBar()
        self._rejects: IO[str] | None = None
        self._said_waiting = False

    def open(self) -> None:
        self._bar = progress_bar(self._show, self._items)
        self._rejects = open_rejects(self._rejects_path)

    def record(self, chunk: Chunk, result: ChunkResult) -> Failure | None:
        """Count a settled chunk; returns its first failure that ran in this attempt, if any."""
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
            # Every failure, those of earlier attempts (from the journal) too: a resumed run's
            # rejects file, written afresh, holds each failed item once.
            write_reject(self._rejects, failure)
            if not result.skipped:
                first = first or failure
        for offset, error in sorted(result.callback_errors.items()):
            callback = self._failure(chunk, offset, error)
            report.add_callback_error(callback)
            logger.warning("An on_commit callback raised after its item was written: %s", callback.summary())
        return first

    def sending_again(self, lost: ChunkLost, retried: int) -> None:
        """A lost chunk's items go out again: counted as retried, and said if they had started."""
        self.report.retried += retried
        if lost.started:
            chunk = lost.chunk
            logger.warning("%s; sending items %s again", lost.reason, f"{chunk.start}..{chunk.end - 1}")

    def note(self, note: str) -> None:
        """What the run chose, and why: in the report, and in the log."""
        logger.info("%s", note)
        self.report.notes.append(note)

    def say(self, message: str) -> None:
        """A warning for the person watching, past the progress bar."""
        if isinstance(self._bar, tqdm):
            self._bar.clear()
        logger.warning(message)

    def waiting(self, received: str, in_flight: int) -> None:
        """Said once: the run was interrupted, and waits for the chunks in flight."""
        if self._said_waiting:
            return
        self._said_waiting = True
        self.say(
            f"Interrupted ({received}): waiting for {in_flight} chunks in flight "
            f"to commit or roll back ({received} again to abandon them)..."
        )

    def close(self, *, abandoned: bool, resume_hint: str, recorded_after: Iterable[Failure] = ()) -> None:
        """The run is over; an interrupted one leaves its report and how to resume in the log.
        ``recorded_after``: the failures an earlier attempt recorded past the input read, for
        a resume that stopped early -- so its rejects file still holds every one."""
        self._bar.close()
        if self._rejects is not None:
            for failure in recorded_after:
                write_reject(self._rejects, failure)
            self._rejects.close()
            _in_input_order(self._rejects_path)
        if self.report.interrupted:
            how = "Abandoned the chunks in flight: their transactions rolled back.\n" if abandoned else ""
            logger.warning("%s%s\n%s", how, self.report, resume_hint)

    def _failure(self, chunk: Chunk, offset: int, error: ErrorInfo) -> Failure:
        item = chunk.items[offset]
        if isinstance(item, Unreadable):
            return Failure.of(chunk.start + offset, item.text, error, item.line)
        line = self._line_of(chunk.start + offset) if self._line_of else None
        return Failure.of(chunk.start + offset, item, error, line)

    def _progress(self, items_done: int) -> None:
        if getattr(self._bar, "unit", "") == "B":  # a file of known size: its bytes read so far
            self._bar.update(self._items.position - self._bar.n)
        else:
            self._bar.update(items_done)


class NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: bool | None, items: Any) -> Any:
    """A tqdm bar: in bytes for a file of known size (so it has a total and an ETA), else in items."""
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return NoBar()
    if isinstance(getattr(items, "size", None), int):
        return tqdm(
            total=items.size, unit="B", unit_scale=True, desc="bulkpool", file=sys.stderr, smoothing=0.1
        )
    return tqdm(total=known_length(items), unit="item", desc="bulkpool", file=sys.stderr, smoothing=0.1)


def _in_input_order(path: Any) -> None:
    """Chunks finish in any order, and their failures are written as they come: at the end,
    the file is put in input order, as ``bulkpool rejects`` lists a run's failures."""
    with open(path, encoding="utf-8") as file:
        lines = file.readlines()
    ordered = sorted(lines, key=lambda line: json.loads(line)["index"])
    if ordered == lines:
        return
    swap = f"{path}.sorting"
    with open(swap, "w", encoding="utf-8") as file:
        file.writelines(ordered)
    os.replace(swap, path)


def open_rejects(path: Any) -> IO[str] | None:
    """The rejects file, written afresh by every run: a resumed run writes the failures of
    its earlier attempts into it too, as the journal recorded them."""
    return open(path, "w", encoding="utf-8") if path else None


def write_reject(file: IO[str] | None, failure: Failure) -> None:
    if file is None:
        return
    file.write(reject_line(failure))
    file.flush()


def reject_line(failure: Failure, **extra: Any) -> str:
    """A failure as a line of a rejects file (JSON Lines): what a run writes, ``bulkpool
    rejects`` and the admin's download too. Given back as input, its ``item`` runs again."""
    line = {
        "index": failure.index,
        "item": failure.item,
        "exc_type": failure.exc_type,
        "message": failure.message,
    }
    if failure.line is not None:
        line["line"] = failure.line
    if failure.unsafe:
        line["unsafe"] = True
    if failure.exc_type == UNREADABLE:
        line["unreadable"] = True  # its item is the raw line: fix it in the input, not here
    return json.dumps({**line, **extra}, default=repr, ensure_ascii=False) + "\n"
