"""The journal, as a chunk transaction uses it: asked first, written last, both inside it.

Data flow:

    transaction --journal_has(piece)--> the journal's rows: AlreadyDone if it committed before
    transaction --record(piece, errors, values)--> the piece's row (its failures, and its values
                                           where kept), committed with the items' writes or not at all
    after AlreadyDone --recorded(piece)--> what the journal recorded of it: its outcome
    a transient error         --> Transient: the transaction is run again
    any other database error  --> JournalFailed: the piece must not commit without its row
"""

from __future__ import annotations

from typing import Any

from django.db import DatabaseError

from bulkpool.journal import AlreadyDone, is_recorded, record_chunk, recorded_result
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo, Task
from bulkpool.retrying import Transient, is_transient


class JournalFailed(Exception):
    """The journal could not be asked about the chunk, or its rows could not be written:
    the chunk must not commit without them."""

    def __init__(self, error: DatabaseError, *, reading: bool) -> None:
        self.error = error
        self.reading = reading

    def failure(self, piece: Chunk) -> ErrorInfo:
        """The error each item of ``piece`` fails with."""
        info = ErrorInfo.from_exception(self.error)
        items = f"items {piece.start}..{piece.end - 1}"
        message = (
            f"the journal could not be read for {items}"
            if self.reading
            else f"the journal row for {items} could not be written"
        ) + f": {info.exc_type}: {info.message}; nothing of them was written"
        return ErrorInfo(info.exc_type, message, info.traceback)


def recorded(task: Task, piece: Chunk) -> ChunkResult | None:
    """What the journal recorded of a piece that committed before (its values too, where the
    run keeps them); None if it cannot be read."""
    try:
        result = recorded_result(task.journal, task.database, piece)
    except DatabaseError:
        return None
    if not task.keep_values:
        result.values = None
    return result


def journal_has(task: Task, piece: Chunk) -> bool:
    try:
        return is_recorded(task.journal, task.database, piece)
    except DatabaseError as error:
        if is_transient(error):
            raise Transient(error) from error
        raise JournalFailed(error, reading=True) from error


def record(task: Task, piece: Chunk, errors: dict[int, ErrorInfo], values: list[Any] | None) -> None:
    try:
        record_chunk(task.journal, task.database, piece, errors, values)
    except AlreadyDone:
        raise
    except DatabaseError as error:
        if is_transient(error):
            raise Transient(error) from error
        raise JournalFailed(error, reading=False) from error
