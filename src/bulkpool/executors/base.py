"""The small interface every executor implements, and the events it hands back.

The engine drives an executor through four calls -- ``start``, ``submit``, ``events``,
``stop`` -- and reads its ``supports_*`` flags instead of asking what class it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from bulkpool.protocol import Chunk, Event, Task

if TYPE_CHECKING:
    from bulkpool.options import Options


class Executor(ABC):
    """Runs chunks of a task on workers.

    Flags the engine reads:

    ``supports_caller_transaction``
        Items run on the caller's own connection, inside any transaction it has open
        (the serial executor). Other executors open their own connections, so they cannot
        see uncommitted rows and are refused inside a transaction.
    ``supports_memory_sqlite``
        Can run against an in-memory SQLite database (only the caller's connection sees it).
    ``delivery``
        ``"exactly_once"``: a chunk submitted once runs at most once. ``"at_least_once"``
        (a broker): it may run twice, so the engine requires the journal (a ``run_id``),
        whose record in the chunk's own transaction keeps the second run from applying it.
    ``detects_loss``
        The executor itself reports a chunk whose worker went away as ``ChunkLost``.
    """

    name: str = ""
    supports_caller_transaction: bool = False
    supports_memory_sqlite: bool = False
    delivery: str = "exactly_once"
    detects_loss: bool = True

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    def configure(self, options: Options) -> Options:
        """The options the run goes with, given the caller's: a hook called before anything
        is checked (the celery executor makes up a ``run_id`` when none is given)."""
        return options

    def check(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Refuse, with a ``ConfigurationError``, a task this executor cannot run."""

    @abstractmethod
    def start(self, task: Task, workers: int) -> None:
        """Start the workers; each runs ``task.setup`` once. Raise ``WorkerStartupError`` if one cannot."""

    @abstractmethod
    def capacity(self) -> int:
        """How many chunks may be submitted and not yet reported, to keep every worker busy."""

    @abstractmethod
    def submit(self, chunk: Chunk) -> None:
        """Hand a chunk to a worker. Never blocks for long: the engine respects ``capacity``."""

    @abstractmethod
    def events(self, timeout: float | None = None) -> list[Event]:
        """Wait up to ``timeout`` seconds for finished or lost chunks; return them (maybe none)."""

    @abstractmethod
    def stop(self, *, cancel: bool = False) -> None:
        """Shut the workers down and release their connections.

        With ``cancel``, abandon work in flight at once (its transactions roll back).
        """
