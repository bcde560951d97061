"""The small interface every executor implements, and the events it hands back.

The engine drives an executor through four calls -- ``start``, ``submit``, ``events``,
``stop`` -- and reads its flags (``supports_*``, ``delivery``, ``detects_loss``) instead of
asking what class it is.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from bulkpool.protocol import Chunk, ChunkLost, Event, Task

Delivery = Literal["exactly_once", "at_least_once"]

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
        ``"exactly_once"``: a chunk is given to one worker at a time, and runs again only
        when the engine sends it again (every local executor). ``"at_least_once"``: the
        transport may run a chunk twice by itself (a broker redelivering a task), so the
        run needs the journal to apply each chunk once.
    ``detects_loss``
        The executor notices by itself when a chunk will not come back (its worker died or
        crashed) and reports it as ``ChunkLost``; without it, the engine must time chunks out.
    ``local``
        Its workers run on this machine: their number is chosen from this machine's CPUs.
    ``grows``
        ``grow`` adds workers to a started pool: with ``workers="auto"`` the pool starts
        with one worker, which runs the first chunks while they are measured, and grows
        once the pace says how wide the work can use (``bulkpool.pooling``). Without it,
        ``workers="auto"`` starts as many workers as the CPUs at once.
    ``start_seconds``
        About what starting its workers costs: a pool must save more than that to pay.
    ``shares_interpreter``
        Its workers are threads of the caller's process, taking turns on one interpreter
        lock: two of them measuring CPU work would slow each other, so one measures.
    """

    name: str = ""
    supports_caller_transaction: bool = False
    supports_memory_sqlite: bool = False
    # The cautious answers, for an executor that does not say: each one sets its own.
    delivery: Delivery = "at_least_once"
    detects_loss: bool = False
    local: bool = False
    grows: bool = False
    start_seconds: float = 0.5
    shares_interpreter: bool = False

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers

    def resolved(self) -> Executor:
        """The executor that runs the job: this one, or one it hands the run to (the tasks
        executor on Django's ImmediateBackend is serial). Refuses a backend that cannot run."""
        return self

    def check_options(self, options: Options) -> None:  # noqa: B027 - optional hook
        """Refuse, with a ``ConfigurationError``, options this executor cannot run with.
        Executors never change the options: what a run needs (a ``run_id`` for an
        at-least-once ``delivery``) the engine decides from the flags above."""

    def check(self, task: Task) -> None:  # noqa: B027 - optional hook
        """Refuse, with a ``ConfigurationError``, a task this executor cannot run."""

    @abstractmethod
    def start(self, task: Task, workers: int) -> None:
        """Start the workers; each runs ``task.setup`` once. Raise ``WorkerStartupError`` if one cannot."""

    def grow(self, workers: int) -> None:
        """Start more workers, up to ``workers`` in all (with ``grows``); each runs
        ``task.setup`` once. Raise ``WorkerStartupError`` if one cannot start: the pool
        keeps the workers it had. ``capacity`` says the new width from then on."""
        raise NotImplementedError(f"{type(self).__name__} cannot grow its pool")

    @abstractmethod
    def capacity(self) -> int:
        """How many chunks may be submitted and not yet reported, to keep every worker busy."""

    @abstractmethod
    def submit(self, chunk: Chunk) -> None:
        """Hand a chunk to a worker. Never blocks for long: the engine respects ``capacity``."""

    @abstractmethod
    def events(self, timeout: float | None = None) -> list[Event]:
        """Wait up to ``timeout`` seconds for finished or lost chunks; return them (maybe none).

        Every submitted chunk comes back once: ``ChunkDone`` with its result, or (with
        ``detects_loss``) ``ChunkLost`` -- its worker died, or raised outside any item
        (``traceback`` says where). ``in_doubt`` once the chunk's COMMIT had begun.
        """

    def withdraw(self) -> None:  # noqa: B027 - optional hook
        """The run is stopping: take back, where the transport can, chunks sent and not
        started yet; each comes back ``ChunkLost(started=False)`` and counts as not run."""

    @abstractmethod
    def stop(self, *, cancel: bool = False) -> None:
        """Shut the workers down and release their connections.

        With ``cancel``, abandon work in flight at once (its transactions roll back).
        """


def crashed(chunk: Chunk, error: BaseException, *, in_doubt: bool, where: str = "the worker") -> ChunkLost:
    """``chunk`` lost because its worker raised ``error`` outside any item, with the traceback."""
    return ChunkLost(
        chunk,
        f"{where} crashed outside any item ({type(error).__name__}: {error})",
        in_doubt=in_doubt,
        traceback="".join(traceback.format_exception(type(error), error, error.__traceback__)),
    )


class CommitWatch:
    """Whether the chunk a Worker runs got as far as its COMMIT: a crash from then on leaves
    the chunk in doubt (it may be committed), so it must not simply run again.

    Give it to the Worker as ``before_commit`` (with ``then``, what else that hook does) and
    ``reset`` it before each chunk. A Worker that keeps ``committing`` itself is asked too.
    """

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.reached = False
        self._then = then

    def __call__(self) -> None:
        self.reached = True
        if self._then is not None:
            self._then()

    def reset(self) -> None:
        self.reached = False

    def in_doubt(self, worker: Any) -> bool:
        return self.reached or bool(getattr(worker, "committing", False))
