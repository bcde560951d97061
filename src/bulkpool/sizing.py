"""Sizing a run from its own chunks: how many items per chunk, and how many workers.

Nothing is run twice to measure it. Each chunk comes back with its ``Timings`` (measured in
the worker), and the next choice is made from the pace so far:

``chunk_size="auto"``
    The first chunk is small (``FIRST_CHUNK``; ``MEASURING_FIRST_CHUNK`` while
    ``workers="auto"`` measures on a pool's first worker, so that heavy items show before
    many of them queue there); each next one is sized to take about
    ``TARGET_SECONDS`` at the pace measured, growing at most ``GROWTH``-fold per chunk
    (or, once ``STEADY_SAMPLE`` items are measured, as far as a quarter of the target at
    their pace: light work gets its big chunks at once) and never past ``CEILING`` items.
    Commits stay rare (light work gets chunks of hundreds of items) and transactions short
    (heavy work gets a few): joblib's auto-batching, with the ceiling its users ask for.
    With a pool, the end of the input (known from its length, or from a chunk read ahead
    that came short) is shared out evenly among the workers -- in chunks of a tenth of the
    target at least once the pace is known (``SHARE_FLOOR``), not in single items whose
    COMMITs would cost more than the wait they save.

``workers="auto"`` (thread and process backends)
    The pool starts with one worker -- never the caller, whose process an item may kill --
    or two processes on a database server when one starts in a moment (``measuring_width``),
    which run the first chunks, one at a time each, while they are measured. Then the run
    either stays on those workers -- the items left would take less time than more workers
    save, or the database writes one transaction at a time (SQLite) and nearly all of each
    item's time comes from its first write on -- or grows the pool, as wide as the work can use: one
    worker per CPU the process may really use (affinity, cgroup quota), more when the items
    mostly wait (I/O, the database), never more than the database's free connection slots
    allow, and on SQLite no more than the work outside the write lock can keep busy. With
    an input of unknown length, it grows as soon as the work measured has cost more than
    the new workers cost to start.

``each_item`` (SQLite)
    A chunk's transaction holds SQLite's one write lock from its BEGIN to its COMMIT, so
    heavy items in it run one at a time however many workers there are. When the chunks
    measured show that most of an item's time comes before its first write (``unlocked``)
    -- enough to pay for a COMMIT per item -- the pool sends chunks whose items each run in
    a transaction of their own that takes the lock at its first write, and grows as wide as
    that leaves the lock free for. If the items' first writes then keep finding their
    snapshot stale (they read, and another worker wrote meanwhile: each such item runs
    again, holding the lock), the pool goes back to a transaction per chunk.

The policy here is pure: ``ChunkSizer`` and ``choose_workers`` are fed numbers. The few
facts read from the machine and the database come from ``cpu_quota`` and
``free_connections``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from django.db import connections

from bulkpool.protocol import Timings

AUTO = "auto"
FIRST_CHUNK = 10
MEASURING_FIRST_CHUNK = 1
GROWTH = 4
STEADY_SAMPLE = 10  # items measured before a chunk may grow past GROWTH-fold
CEILING = 1000  # items: what a chunk holds in memory, and the most a redo repeats
TARGET_SECONDS = 0.2  # a chunk's time: commits rare, transactions short, Ctrl-C quick to drain
REMOTE_TARGET_SECONDS = 0.5  # on workers elsewhere (celery): a broker's round trip is dearer
BALANCE = 4  # with a pool, chunks per worker still to come when the input's length is known
SHARE_FLOOR = 0.1  # ...but no chunk shared out under this share of the target time
PROBE_CHUNKS = 2  # chunks measured on the first worker before the pool is chosen...
PROBE_ITEMS = 50  # ...holding this many items at least...
PROBE_SECONDS = 0.1  # ...or seconds of them, whichever comes first (5 ms items: 20 of them)
WARM_CHUNK_SECONDS = 0.2  # a first chunk this long measures its items more than the connection it opened
PAYS_AFTER_SECONDS = 1.0  # work left (on one worker) below which growing the pool does not pay
MEASURING_WORKERS = 2  # processes a pool measures on where one starts in a moment...
CHEAP_START_SECONDS = 0.1  # ...(a fork) and the database takes more than one writer
WAITING_WIDTH = 4  # at most this many workers per CPU when the items mostly wait
SINGLE_WRITER_GAIN = 1.5  # on SQLite, a pool must promise this speed-up to be worth it
SPARE_CONNECTIONS = 5  # database connection slots left free for everyone else
STALE_SHARE = 0.2  # each_item: items run again for a stale snapshot, above which it stops


@dataclass
class Pace:
    """What the chunks measured so far add up to."""

    chunks: int = 0
    items: int = 0
    seconds: float = 0.0  # in the worker, all of it
    locked: float = 0.0  # inside the chunk's transaction: loading, func, COMMIT
    cpu: float = 0.0  # of the worker's own CPU
    runnable: float = 0.0  # waiting for a CPU other processes had
    unlocked: float = 0.0  # SQLite: func's time before each item's first write
    commit: float = 0.0
    commits: int = 0
    stale: int = 0  # items run again for a stale snapshot (each_item)

    def add(self, items: int, timings: Timings) -> None:
        if items <= 0 or timings.total <= 0:
            return
        self.chunks += 1
        self.items += items
        self.seconds += timings.total
        self.locked += timings.load + timings.work + timings.commit
        self.cpu += timings.cpu
        self.runnable += timings.runnable
        self.unlocked += timings.unlocked
        self.commit += timings.commit
        self.commits += timings.commits
        self.stale += timings.stale

    @property
    def per_item(self) -> float | None:
        return self.seconds / self.items if self.items else None

    def each_item_gain(self) -> float:
        """With each item in a transaction of its own that takes SQLite's lock at its first
        write: the item's time over the time it holds the lock -- how many workers the one
        writer keeps busy. A COMMIT per item is priced at a chunk's (an upper bound)."""
        if not self.items or not self.commits:
            return 0.0
        commit = self.commit / self.commits
        held = max(self.locked - self.unlocked, 0.0) / self.items + commit
        return (self.seconds / self.items + commit) / held if held > 0 else math.inf

    @property
    def stale_share(self) -> float:
        return self.stale / self.items if self.items else 0.0


@dataclass
class ChunkSizer:
    """The size of each next chunk: ``fixed``, or chosen from the pace (``chunk_size="auto"``)."""

    fixed: int | None = None
    first: int = FIRST_CHUNK  # the size before any pace is known
    target: float = TARGET_SECONDS
    smallest: int = 0  # of the chunks read so far
    largest: int = 0
    _last: int = 0

    @property
    def ceiling(self) -> int:
        """The most items a chunk may hold (the journal bounds its look-ups by it)."""
        return self.fixed or CEILING

    def next(self, pace: Pace, *, left: int | None = None, workers: int = 1) -> int:
        if self.fixed is not None:
            return self.fixed
        per_item = pace.per_item
        size = float(self.first) if per_item is None else self.target / max(per_item, 1e-7)
        if self._last and per_item is not None:
            # At most GROWTH-fold -- or, once a few items are measured, as far as a quarter
            # of the target at their pace: every chunk is a COMMIT that a short run pays for.
            growth: float = self._last * GROWTH
            if pace.items >= STEADY_SAMPLE:
                growth = max(growth, self.target / GROWTH / max(per_item, 1e-7))
            size = min(size, growth)
        if left is not None and workers > 1:
            size = min(size, shared_out(left, workers, per_item=per_item, target=self.target))
        self._last = max(1, min(int(size), CEILING))
        return self._last

    def read(self, items: int) -> None:
        """A chunk of ``items`` was read (the input's last may hold fewer than asked for)."""
        self.smallest = min(self.smallest or items, items)
        self.largest = max(self.largest, items)

    def summary(self) -> str:
        """What ``chunk_size="auto"`` chose, for the report."""
        if self.fixed is not None or not self.largest:
            return ""
        sizes = f"{self.smallest:,}"
        if self.largest != self.smallest:
            sizes += f" to {self.largest:,}"
        return f"chunk_size=auto: chunks of {sizes} items, each about {self.target:g} s at the pace measured"


def shared_out(
    items: int, workers: int, *, per_item: float | None = None, target: float = TARGET_SECONDS
) -> int:
    """The chunk size that shares the last ``items`` of a run out among ``workers``:
    ``BALANCE`` chunks each, so none finishes much after the others -- but, at the pace
    ``per_item`` measured, none shorter than ``SHARE_FLOOR`` of the ``target`` time. A
    chunk costs a COMMIT and a round trip whatever it holds: cut to an item or two for
    light work, the end of a run costs more than a worker finishing 20 ms after another."""
    size = math.ceil(items / (workers * BALANCE))
    if per_item:
        size = max(size, int(SHARE_FLOOR * target / per_item))
    return max(1, size)


@dataclass(frozen=True)
class Limits:
    """What bounds a pool, whatever the work."""

    cpus: int
    free_connections: int | None  # None: the database does not say (SQLite)
    single_writer: bool  # SQLite: one write transaction at a time
    start_seconds: float  # about what starting the pool costs
    chunk_transactions: bool = True  # atomic="chunk": each_item may replace them
    shared_interpreter: bool = False  # threads: the workers take turns on one interpreter lock


@dataclass(frozen=True)
class Choice:
    workers: int  # 1: no more than the workers that measured
    why: str
    each_item: bool = False  # SQLite: each item in a transaction of its own (see above)


def measuring_width(limits: Limits) -> int:
    """How many workers a pool measures the first chunks on: two processes on a database
    server where a worker starts in a moment -- the second costs a fork and halves the time
    a short run spends measuring -- else one (SQLite's one writer would keep a second
    waiting; two threads would take turns on the interpreter lock, and their CPU work would
    look like waiting)."""
    if limits.single_writer or limits.shared_interpreter or limits.start_seconds > CHEAP_START_SECONDS:
        return 1
    slots = _free_slots(limits)
    room = limits.cpus if slots is None else min(limits.cpus, slots)
    return max(1, min(MEASURING_WORKERS, room))


def choose_workers(pace: Pace, left: int | None, limits: Limits) -> Choice | None:
    """The pool for the rest of the run, or None to measure (on the workers that measure) a
    while longer.

    ``left``: items not read yet, when the input's length is known. When it is not, the
    pool grows once the work measured has cost as much as its new workers cost to start
    (so a short input wastes at most that much, and a long one gets its pool at once).
    """
    if left == 0:
        return Choice(1, "the whole input ran while it was measured")
    measured = (pace.chunks >= PROBE_CHUNKS and pace.items >= PROBE_ITEMS) or pace.seconds >= PROBE_SECONDS
    per_item = pace.per_item
    if not measured or per_item is None:
        return None
    width, bound, each_item = _useful_width(pace, limits)
    pace_text = f"{per_item * 1000:.2g} ms per item"
    if width < 2:
        return Choice(1, f"{pace_text}: {bound}")
    if left is None:
        if pace.seconds < limits.start_seconds:
            return None  # an input of unknown length: measure until the workers' start is paid for
        return Choice(width, f"{pace_text}, input of unknown length: {width} workers ({bound})", each_item)
    pays_after = max(PAYS_AFTER_SECONDS, 4 * limits.start_seconds)
    serial_left = left * per_item
    if serial_left < pays_after:
        return Choice(
            1,
            f"{pace_text}: the {left:,} items left take about {serial_left:.1f} s on one worker, "
            "too little for starting more workers to pay",
        )
    return Choice(width, f"{pace_text}, {left:,} items left: {width} workers ({bound})", each_item)


def each_item_pays(pace: Pace, limits: Limits) -> bool:
    """Whether a fixed pool of workers on SQLite runs faster with each item in a
    transaction of its own (``workers`` given: only the transactions are chosen)."""
    if not (limits.single_writer and limits.chunk_transactions):
        return False
    return pace.each_item_gain() >= max(SINGLE_WRITER_GAIN, _chunk_gain(pace))


def _chunk_gain(pace: Pace) -> float:
    """Workers SQLite's one writer keeps busy with a transaction per chunk."""
    return pace.seconds / pace.locked if pace.locked > 0 else math.inf


def _useful_width(pace: Pace, limits: Limits) -> tuple[int, str, bool]:
    """How many workers the work can keep busy, what bounds it, and whether on SQLite
    each item gets a transaction of its own."""
    # 1: all CPU; 4: a quarter. Time spent waiting for a CPU is not the items' waiting: two
    # workers measuring on two CPUs, beside the caller reading the input, wait so.
    waiting = (pace.seconds - pace.runnable) / pace.cpu if pace.cpu > 0 else 1.0
    width = float(limits.cpus)
    bound = f"{limits.cpus} CPU{'s' if limits.cpus != 1 else ''}"
    if waiting > 1.5:
        width = min(limits.cpus * waiting, limits.cpus * WAITING_WIDTH)
        bound = f"{limits.cpus} CPUs, items {100 - 100 / waiting:.0f}% waiting"
    each_item = False
    if limits.single_writer:
        gain = _chunk_gain(pace)
        if each_item_pays(pace, limits):
            gain, each_item = pace.each_item_gain(), True
            bound += ", each item in a transaction of its own: most of its time comes before its first write"
        if gain < SINGLE_WRITER_GAIN:
            return 1, _writer_bound(pace), False
        if gain < width:
            # A gain of 3.3: three workers leave the writer idle a tenth of the time, a
            # fourth waits for the lock now and then (io5ms on SQLite: 0.70x to 0.84x the script).
            where = "each item in a transaction of its own, holding" if each_item else "in"
            width = max(2, math.ceil(gain))
            bound = f"SQLite's one writer: {100 / gain:.0f}% of the time is {where} the write lock"
    slots = _free_slots(limits)
    if slots is not None and slots < width:
        width, bound = slots, f"{limits.free_connections} free database connections"
    return max(1, int(width)), bound, each_item


def _free_slots(limits: Limits) -> int | None:
    """The database connections a pool may open: its free slots but SPARE_CONNECTIONS
    (None: the database does not say)."""
    return None if limits.free_connections is None else limits.free_connections - SPARE_CONNECTIONS


def _writer_bound(pace: Pace) -> str:
    share = 100 * max(pace.locked - pace.unlocked, 0.0) / pace.seconds
    return (
        f"SQLite writes one transaction at a time and {share:.0f}% of each item's time comes "
        "from its first write on, holding the write lock (work before it, or in prepare=, "
        "runs in parallel)"
    )


# -- facts about the machine and the database ----------------------------------------------


def cpu_quota() -> int:
    """The CPUs this process may really use: its affinity, and a cgroup v2 ``cpu.max`` quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cpus, quota) if quota else cpus)


def _cgroup_cpus(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    try:
        limit, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(1, math.ceil(int(limit) / int(period)))


def free_connections(database: str) -> int | None:
    """Connection slots the database server has left, or None where it has no such limit."""
    connection = connections[database]
    query = {
        "postgresql": "SELECT current_setting('max_connections')::int - count(*) FROM pg_stat_activity",
        "mysql": "SELECT @@max_connections - (SELECT COUNT(*) FROM information_schema.PROCESSLIST)",
    }.get(connection.vendor)
    if query is None:
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return int(cursor.fetchone()[0])
    except Exception:  # not allowed to look: then it does not bound the pool
        return None
