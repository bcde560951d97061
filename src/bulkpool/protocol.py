"""The messages that cross a process or a broker, and how they are encoded.

Data flow, whatever the executor:

    engine --Task (once per worker)--> worker
    engine --Chunk (any number)------> worker
    engine <--ChunkResult per Chunk--- worker      (as ChunkDone, from the executor)
    engine <--ChunkLost--------------- executor    (the worker died, or its chunk was lost)

Everything here is plain data. Errors travel as ``ErrorInfo`` text (class path, message,
formatted traceback), so an exception that cannot be pickled never hides the real error.

Two codecs: ``PICKLE`` for local pipes (the Task with cloudpickle, so lambdas and closures
travel by value; chunks and results with pickle), and ``JSON`` for brokers, which carry
JSON only: dates, times, decimals and UUIDs are tagged so they come back as themselves.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import pickle
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from bulkpool.errors import ItemError


@dataclass(frozen=True)
class Chunk:
    """Items ``start`` .. ``start + len(items) - 1`` of the input: the unit of work a worker runs."""

    number: int
    start: int
    items: list[Any]
    # Items a journaled run recorded as failed, run again (retry_failed=True): their new
    # outcome replaces the recorded failures instead of adding a record (journal/records.py).
    retry: bool = False
    # Each item in a transaction of its own, its write lock taken at its first write
    # (SQLite, heavy items: work/one_transaction.py); the pool decides (sizing.py).
    each_item: bool = False

    def __len__(self) -> int:
        return len(self.items)

    @property
    def end(self) -> int:
        """One past the input index of the last item."""
        return self.start + len(self.items)

    def indexed(self) -> Iterator[tuple[int, Any]]:
        return enumerate(self.items, self.start)

    def piece(self, start: int, end: int) -> Chunk:
        """The items with input index ``start`` .. ``end - 1``, as a chunk of their own."""
        items = self.items[start - self.start : end - self.start]
        return Chunk(self.number, start, items, self.retry, self.each_item)

    def halves(self) -> tuple[Chunk, Chunk]:
        middle = self.start + len(self) // 2
        return self.piece(self.start, middle), self.piece(middle, self.end)


@dataclass(frozen=True)
class ErrorInfo:
    """An exception reduced to text where it was raised.

    ``unsafe``: the item may have been written all the same (a COMMIT whose outcome is
    unknown, a worker that died with ``atomic="item"`` or ``False``), so feeding it to
    another run blindly could write it twice.
    """

    exc_type: str
    message: str
    traceback: str
    unsafe: bool = False

    @classmethod
    def of_kind(
        cls, kind: type[ItemError], message: str, traceback: str = "", *, unsafe: bool | None = None
    ) -> ErrorInfo:
        """A failure of bulkpool's own kind (``bulkpool.CommitUnknown`` ...)."""
        return cls(f"bulkpool.{kind.__name__}", message, traceback, kind.unsafe if unsafe is None else unsafe)

    @classmethod
    def from_exception(cls, error: BaseException) -> ErrorInfo:
        kind = type(error)
        return cls(
            exc_type=f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins."),
            message=str(error),
            traceback="".join(traceback.format_exception(kind, error, error.__traceback__)),
        )


UNREADABLE = "bulkpool.InputError"  # the exc_type of an Unreadable item's failure


@dataclass(frozen=True)
class Unreadable:
    """An item the input could not read (a malformed line, with ``on_bad_line="skip"``):
    it fails with ``error`` without running, and the run goes on."""

    line: int
    text: str
    error: ErrorInfo


class BatchFunc(ABC):
    """A ``func`` with a bulk path (``fast=True``'s rows): ``batch(items[, state])`` does a
    whole piece of a chunk at once and returns one value per item. Anything it raises but a
    transient error makes the worker run the piece again item by item, calling the func
    itself, so that a failing item fails alone."""

    @abstractmethod
    def batch(self, items: list[Any], *state: Any) -> list[Any]: ...


@dataclass(frozen=True)
class Task:
    """The part of a job a worker needs: shipped once to every worker."""

    func: Callable[..., Any]
    setup: Callable[[], Any] | None
    atomic: Any
    database: str
    retries: int
    keep_values: bool
    own_connections: bool  # False when running on the caller's own connection (serial)
    # Turns a chunk's items into func's arguments, once per chunk attempt, inside its
    # transaction (QuerySet input: primary keys -> model instances, one query per chunk).
    # An exception in an item's place is that item's failure.
    load: Callable[[list[Any]], list[Any]] | None = None
    # Run on each item of a chunk, outside any transaction, before the chunk's transaction
    # opens; func gets what it returned. Once per chunk delivery: redos, retries and
    # splits of that chunk reuse the values (a chunk sent again after a worker died is
    # prepared again). An exception is that item's failure; it never reaches func.
    prepare: Callable[..., Any] | None = None
    journal: Any = None  # a journal.JournalRef: write each chunk's journal row in its transaction
    dry_run: bool = False  # roll every transaction back
    # Values must cross a pipe or a broker: one that cannot be encoded fails its item
    # before its chunk commits (None: values stay in the process, as on serial and thread).
    check_value: Callable[[Any], Any] | None = None
    # SQLite: the file the run's workers queue on for the write lock (sqlite_writers.py)
    writer_queue: str | None = None

    @property
    def batch(self) -> Callable[..., list[Any]] | None:
        """func's bulk path when func is a ``BatchFunc``; None otherwise."""
        return self.func.batch if isinstance(self.func, BatchFunc) else None


@dataclass(frozen=True)
class Timings:
    """Where a chunk's time went in the worker, in seconds: for sizing chunks and pools."""

    prepare: float = 0.0  # calling prepare, outside any transaction
    load: float = 0.0  # QuerySet input: loading the rows
    work: float = 0.0  # calling func, with its queries
    commit: float = 0.0  # the constraint checks and COMMIT
    total: float = 0.0  # all of it, retries and redos included
    cpu: float = 0.0  # the worker thread's own CPU time in it (the rest was waiting)
    runnable: float = 0.0  # waiting for a CPU that other processes had (Linux): not the work's
    # SQLite: the part of ``work`` before each item's first write, which needs no write lock
    unlocked: float = 0.0
    commits: int = 0  # COMMITs, to price one
    stale: int = 0  # items run again because their first write found a newer snapshot
    # The first chunk this worker ran in this thread since it started or closed its
    # connections: it also opened a connection and filled Django's caches, so its time says
    # little of its items'.
    warming: bool = False


@dataclass
class ChunkResult:
    """What a worker sends back for one chunk; errors are keyed by offset in the chunk.

    ``callback_errors``: ``transaction.on_commit`` callbacks that raised after the chunk
    committed. Those items are written (not failed); the errors are reported so they are seen.
    """

    number: int
    values: list[Any] | None
    errors: dict[int, ErrorInfo] = field(default_factory=dict)
    retried: int = 0
    skipped: bool = False  # the journal says this chunk was committed before
    callback_errors: dict[int, ErrorInfo] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class ChunkDone:
    """A worker ran the chunk; ``result`` says how each item went."""

    chunk: Chunk
    result: ChunkResult


@dataclass(frozen=True)
class ChunkLost:
    """The chunk did not come back: its worker died, or crashed outside any item.

    Nothing of it was committed -- unless ``in_doubt``: the worker was in or past the
    chunk's COMMIT, which may have gone through. ``traceback`` is set when a crash left one.
    """

    chunk: Chunk
    reason: str
    in_doubt: bool = False
    traceback: str = ""
    started: bool = True  # False: it never began (queued for workers that died, or withdrawn)
    # A chunk of ``each_item`` transactions: the outcome of its first items, settled (each
    # committed with its journal row, or failed) before the worker was lost.
    settled: ChunkResult | None = None


Event = ChunkDone | ChunkLost


# -- codecs ----------------------------------------------------------------------------------


class PickleCodec:
    """Local pipes: chunks and results with pickle; the Task with cloudpickle."""

    name = "pickle"

    def encode(self, message: Any) -> bytes:
        return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)

    def encode_task(self, task: Task) -> bytes:
        import cloudpickle

        return bytes(cloudpickle.dumps(task))

    def check_value(self, value: Any) -> Any:
        """Raise if ``value`` cannot be sent back to the parent."""
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


_TAGS: dict[str, tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "datetime": (datetime.datetime, datetime.datetime.isoformat, datetime.datetime.fromisoformat),
    "date": (datetime.date, datetime.date.isoformat, datetime.date.fromisoformat),
    "time": (datetime.time, datetime.time.isoformat, datetime.time.fromisoformat),
    "decimal": (decimal.Decimal, str, decimal.Decimal),
    "uuid": (uuid.UUID, str, uuid.UUID),
    "bytes": (bytes, lambda b: base64.b64encode(b).decode(), base64.b64decode),
}
_TAG = "__bulkpool__"


class JsonCodec:
    """Brokers: plain JSON text. Dates, times, decimals, UUIDs and bytes are tagged
    (``{"__bulkpool__": "date", "v": "2024-05-01"}``) and come back as themselves; a
    value JSON cannot carry raises ``TypeError`` naming its type."""

    name = "json"

    def encode(self, message: Any) -> bytes:
        return json.dumps(self._plain(message), default=self._tag, ensure_ascii=False).encode()

    def decode(self, data: bytes | str) -> Any:
        return self._rebuild(json.loads(data, object_hook=self._untag))

    def check_value(self, value: Any) -> Any:
        return json.dumps(value, default=self._tag)

    # Messages become {"type": ..., fields...}; ChunkResult's offset keys become strings.
    def _plain(self, message: Any) -> Any:
        if isinstance(message, Chunk):
            chunk = {"type": "chunk", "number": message.number, "start": message.start}
            chunk["items"] = message.items
            if message.each_item:
                chunk["each_item"] = True
            return {**chunk, "retry": True} if message.retry else chunk  # retry_failed's pieces only
        if isinstance(message, ChunkResult):
            return {
                "type": "result",
                "number": message.number,
                "values": message.values,
                "errors": {str(k): vars(v) for k, v in message.errors.items()},
                "retried": message.retried,
                "skipped": message.skipped,
                "callback_errors": {str(k): vars(v) for k, v in message.callback_errors.items()},
                "timings": vars(message.timings),
            }
        return message

    def _rebuild(self, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "chunk":
            retry, each_item = data.get("retry", False), data.get("each_item", False)
            return Chunk(data["number"], data["start"], data["items"], retry, each_item)
        if kind == "result":
            return ChunkResult(
                number=data["number"],
                values=data["values"],
                errors={int(k): ErrorInfo(**v) for k, v in data["errors"].items()},
                retried=data["retried"],
                skipped=data["skipped"],
                callback_errors={int(k): ErrorInfo(**v) for k, v in data["callback_errors"].items()},
                timings=_timings(data["timings"]),
            )
        return data

    @staticmethod
    def _tag(value: Any) -> Any:
        # datetime before date: a datetime is a date too.
        for tag, (kind, dump, _) in _TAGS.items():
            if isinstance(value, kind):
                return {_TAG: tag, "v": dump(value)}
        raise TypeError(f"a {type(value).__module__}.{type(value).__qualname__} cannot be sent as JSON")

    @staticmethod
    def _untag(data: dict[str, Any]) -> Any:
        tag = data.get(_TAG)
        if tag in _TAGS and set(data) == {_TAG, "v"}:
            return _TAGS[tag][2](data["v"])
        return data


PICKLE = PickleCodec()
JSON = JsonCodec()


_TIMINGS = frozenset(timing.name for timing in fields(Timings))


def _timings(data: dict[str, Any]) -> Timings:
    """A result's timings, from a worker of this version or another: the fields this one
    knows (they only size the run; a field added since must not lose a committed chunk's result)."""
    return Timings(**{name: value for name, value in data.items() if name in _TIMINGS})
