"""Where SQLite's write lock goes when items are heavy: candidate designs, side by side.

Issue 14, point 1. Each item does ~2 ms of pure-Python work (``bench.jobs.spin``), then
``User.objects.create()`` with a ``pre_save`` receiver and a ``post_save`` receiver that
creates a "profile" row (an ``auth.Group``), on a SQLite file in WAL mode with
``BEGIN IMMEDIATE`` and a 60 s busy timeout (``bench/sqlite_lock_settings.py``). Every
method uses ``--processes`` processes and writes every item once; the rows are counted.

    blog_script        the SPEC's script: ProcessPoolExecutor, a future per item, autocommit
    loop_atomic500     one process, an atomic() block per 500 items
    pool_atomic500     --processes processes over atomic() blocks of 500 items
    bulkpool_untuned   bulkpool.run(job, items)
    bulkpool_untuned_generator  the same, the items from a generator (length unknown)
    bulkpool_process   bulkpool.run(job, items, backend="process", workers=P): design (a), today
    bulkpool_prepare   the same with the work moved to prepare= (tuning, for reference)
    bulkpool_fast_prepare  bulkpool.create(User, items, fast=True, prepare=work): the bulk
                       path with the work in prepare= (tuning, for reference)
    chunk_immediate    by hand, as (a) does it: 50 items per BEGIN IMMEDIATE transaction
    item_immediate     one BEGIN IMMEDIATE transaction per item, with a journal row
    item_deferred      design (b): one BEGIN DEFERRED transaction per item, with a journal
                       row: the lock is taken at the item's first write
    item_deferred_read (b) with a journal read first in each transaction, as bulkpool checks
                       its journal today: a write after a stale read fails at once (BUSY)
    group5_deferred    design (c): 5 items per BEGIN DEFERRED transaction, one journal row
    ceiling            one process, no work, one create per item: SQLite's writer ceiling

The hand-made designs run in a ``multiprocessing`` pool over chunks of 50 items, as
bulkpool's workers would; a transaction that meets "database is locked" is rolled back
and run again, and the retries are counted.

    python -m bench.sqlite_lock --items 2000 --repeat 3 [--processes P] [--synchronous NORMAL]

The JSON records the CPU count (``cpus``, and those this process may use) with the
results: run it on machines of several sizes for the scaling.

``--synchronous NORMAL`` takes the fsync out of each COMMIT (WAL keeps the file consistent;
a power cut may lose the last commits): where a COMMIT is cheap, many small transactions
cost little, as on a machine whose disk syncs fast.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench.apps import BenchConfig

CHUNK = 50  # items per chunk sent to a hand-made pool's process, as bulkpool's chunks
GROUP = 5  # items per transaction in design (c)
PATH_ENV = "BENCH_SQLITE_PATH"
SYNCHRONOUS_ENV = "BENCH_SQLITE_SYNCHRONOUS"

Items = list[dict[str, str]]
Method = Callable[[Items, int], dict[str, Any]]


class LockBenchConfig(BenchConfig):
    """The bench app's receivers, plus a post_save one that creates a profile row."""

    def ready(self) -> None:
        from django.conf import settings
        from django.db.backends.signals import connection_created
        from django.db.models.signals import post_save

        super().ready()
        post_save.connect(create_profile, sender=settings.AUTH_USER_MODEL, dispatch_uid="bench.profile")
        connection_created.connect(set_synchronous, dispatch_uid="bench.synchronous")


def set_synchronous(sender: Any, connection: Any, **kwargs: Any) -> None:
    """``--synchronous``: FULL (SQLite's default: an fsync per COMMIT) or NORMAL (in WAL
    mode, no fsync per COMMIT: what makes many small transactions cheap)."""
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA synchronous={os.environ.get(SYNCHRONOUS_ENV, 'FULL')}")


def create_profile(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    from django.contrib.auth.models import Group

    if created:
        Group.objects.create(name=f"profile {instance.username}")


# -- the methods (run in the parent; their workers import this module) -----------------------


def blog_script(items: Items, processes: int) -> dict[str, Any]:
    from django.db import connections

    from bench import jobs

    connections.close_all()
    with ProcessPoolExecutor(max_workers=processes) as executor:
        for future in [executor.submit(jobs.create_user_after_spin, item) for item in items]:
            future.result()
    return {}


def loop_atomic500(items: Items, processes: int) -> dict[str, Any]:
    from bench import jobs

    for start in range(0, len(items), 500):
        jobs.run_atomically(jobs.create_user_after_spin, items[start : start + 500])
    return {}


def pool_atomic500(items: Items, processes: int) -> dict[str, Any]:
    import functools

    from django.db import connections

    from bench import jobs

    connections.close_all()
    blocks = [items[start : start + 500] for start in range(0, len(items), 500)]
    run_block = functools.partial(jobs.run_atomically, jobs.create_user_after_spin)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        list(pool.imap_unordered(run_block, blocks))
    return {}


def bulkpool_untuned(items: Items, processes: int) -> dict[str, Any]:
    import bulkpool
    from bench import jobs

    return _report(bulkpool.run(jobs.create_user_after_spin, items))


def bulkpool_untuned_generator(items: Items, processes: int) -> dict[str, Any]:
    import bulkpool
    from bench import jobs

    return _report(bulkpool.run(jobs.create_user_after_spin, (item for item in items)))


def bulkpool_process(items: Items, processes: int) -> dict[str, Any]:
    import bulkpool
    from bench import jobs

    return _report(bulkpool.run(jobs.create_user_after_spin, items, backend="process", workers=processes))


def bulkpool_prepare(items: Items, processes: int) -> dict[str, Any]:
    import functools

    import bulkpool
    from bench import jobs

    prepare = functools.partial(jobs.prepare_item, jobs.spin_work)
    report = bulkpool.run(jobs.create_user, items, prepare=prepare, backend="process", workers=processes)
    return _report(report)


def bulkpool_fast_prepare(items: Items, processes: int) -> dict[str, Any]:
    import functools

    from django.contrib.auth.models import User

    import bulkpool
    from bench import jobs

    prepare = functools.partial(jobs.prepare_item, jobs.spin_work)
    return _report(bulkpool.create(User, items, fast=True, prepare=prepare))


def _report(report: Any) -> dict[str, Any]:
    assert report.failed == 0, report.failures[:3]
    return {"notes": report.notes}


def by_hand(design: str) -> Method:
    """A method that runs ``design`` (one of DESIGNS) in a pool over chunks of CHUNK items."""

    def method(items: Items, processes: int) -> dict[str, Any]:
        from django.db import connections

        connections.close_all()
        work = [(design, start, items[start : start + CHUNK]) for start in range(0, len(items), CHUNK)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            done = list(pool.imap_unordered(run_chunk, work))
        held, spent = sum(d[1] for d in done), sum(d[2] for d in done)
        return {
            "retries": sum(d[0] for d in done),
            "lock_ms_per_item": round(1000 * held / len(items), 3),
            "worker_ms_per_item": round(1000 * spent / len(items), 3),  # not queueing for the lock
            # With the lock held this share of a worker's time, at most this many processes
            # can work at once before they queue for it.
            "processes_the_lock_allows": round(spent / held, 1) if held else None,
        }

    method.__name__ = design
    return method


def ceiling(items: Items, processes: int) -> dict[str, Any]:
    from bench import jobs

    for item in items:
        jobs.create_user(item)
    return {}


# -- in a hand-made pool's process ------------------------------------------------------------

# design -> (transaction mode, items per transaction, whether the journal is read first)
DESIGNS = {
    "chunk_immediate": ("IMMEDIATE", CHUNK, False),
    "item_immediate": ("IMMEDIATE", 1, False),
    "item_deferred": ("DEFERRED", 1, False),
    "item_deferred_read": ("DEFERRED", 1, True),
    "group5_deferred": ("DEFERRED", GROUP, False),
}


def run_chunk(work: tuple[str, int, Items]) -> tuple[int, float, float]:
    """Run one chunk as ``design`` says; returns how many transactions were run again, the
    seconds this process held the write lock, and the seconds it spent not queueing for it."""
    from django.db import OperationalError, connection, transaction

    from bench import jobs

    design, start, items = work
    mode, size, read_first = DESIGNS[design]
    connection.ensure_connection()
    connection.transaction_mode = mode  # what Django's atomic() says after BEGIN
    retries, lock = 0, LockClock()
    started = time.perf_counter()
    with connection.execute_wrapper(lock.note):
        for offset in range(0, len(items), size):
            group = items[offset : offset + size]
            while True:
                lock.transaction_begins()
                try:
                    with transaction.atomic(), connection.cursor() as cursor:
                        if read_first:
                            cursor.execute(
                                "SELECT count(*) FROM bench_journal WHERE item = %s", [start + offset]
                            )
                        for item in group:
                            jobs.create_user_after_spin(item)
                        cursor.execute("INSERT INTO bench_journal (item) VALUES (%s)", [start + offset])
                    break
                except OperationalError as error:
                    if "locked" not in str(error) and "busy" not in str(error):
                        raise
                    retries += 1
                finally:
                    lock.transaction_ends()
    return retries, lock.held, time.perf_counter() - started - lock.waited


class LockClock:
    """How long a process holds SQLite's write lock: from the statement that took it (BEGIN
    IMMEDIATE, or a transaction's first write) to the end of its transaction."""

    TAKERS = ("BEGIN IMMEDIATE", "INSERT", "UPDATE", "DELETE")

    def __init__(self) -> None:
        self.held = 0.0
        self.waited = 0.0  # in the statements that took the lock: mostly queueing for it
        self._since: float | None = None

    def note(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        if self._since is not None or not sql.lstrip().upper().startswith(self.TAKERS):
            return execute(sql, params, many, context)
        asked = time.perf_counter()
        result = execute(sql, params, many, context)
        self._since = time.perf_counter()  # the statement got the lock (after queueing for it)
        self.waited += self._since - asked
        return result

    def transaction_begins(self) -> None:
        self._since = None

    def transaction_ends(self) -> None:
        if self._since is not None:
            self.held += time.perf_counter() - self._since
            self._since = None


# -- measuring ---------------------------------------------------------------------------------


def make_template(directory: str) -> str:
    """A migrated database file in WAL mode, with the journal table, to copy for every run."""
    import django
    from django.core.management import call_command
    from django.db import connection, connections

    django.setup()
    call_command("migrate", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("CREATE TABLE bench_journal (item INTEGER PRIMARY KEY)")
    connections.close_all()
    template = os.path.join(directory, "template.sqlite3")
    _copy(os.environ[PATH_ENV], template)
    return template


def _copy(source: str, target: str) -> None:
    for suffix in ("-wal", "-shm"):
        if os.path.exists(target + suffix):
            os.remove(target + suffix)
    shutil.copyfile(source, target)


def measure(
    method: Callable[[Items, int], dict[str, Any]],
    items: Items,
    processes: int,
    template: str,
) -> dict[str, Any]:
    from django.contrib.auth.models import Group, User
    from django.db import connections

    connections.close_all()
    _copy(template, os.environ[PATH_ENV])
    started = time.perf_counter()
    facts = method(items, processes)
    seconds = time.perf_counter() - started
    connections.close_all()
    rows = (User.objects.count(), Group.objects.count())
    assert rows == (len(items), len(items)), f"{method.__name__} wrote {rows} for {len(items)} items"
    return {"seconds": seconds, **facts}


METHODS: list[Method] = [
    blog_script,
    loop_atomic500,
    pool_atomic500,
    bulkpool_untuned,
    bulkpool_untuned_generator,
    bulkpool_process,
    bulkpool_prepare,
    bulkpool_fast_prepare,
    *[by_hand(design) for design in DESIGNS],
    ceiling,
]


def users(count: int) -> Iterator[dict[str, str]]:
    for i in range(count):
        yield {"username": f"user{i}", "email": f"user{i}@example.com"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count(), help="for the hand-written methods (default: CPUs)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", default=",".join(m.__name__ for m in METHODS))
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    os.environ[SYNCHRONOUS_ENV] = args.synchronous
    chosen = [m for m in METHODS if m.__name__ in args.methods.split(",")]
    directory = tempfile.mkdtemp(prefix="bench-sqlite-lock-")
    os.environ[PATH_ENV] = os.path.join(directory, "run.sqlite3")
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.sqlite_lock_settings"
    from bench import jobs

    os.environ[jobs.SPIN_ENV] = str(jobs.calibrate(jobs.spin))
    try:
        template = make_template(directory)
        items = list(users(args.items))
        runs: dict[str, list[dict[str, Any]]] = {m.__name__: [] for m in chosen}
        for _ in range(args.repeat):  # the methods take turns, so that load hits them alike
            for method in chosen:
                runs[method.__name__].append(measure(method, items, args.processes, template))
                print(method.__name__, runs[method.__name__][-1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(summary(runs, args), indent=1))


def summary(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    rates = {
        name: args.items / statistics.median(r["seconds"] for r in found) for name, found in runs.items()
    }
    blog = rates.get("blog_script")
    return {
        "items": args.items,
        "processes": args.processes,
        "synchronous": args.synchronous,
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load": os.getloadavg(),
        "spin_iterations": int(os.environ.get("BENCH_SPIN_ITERATIONS", 0)),
        "methods": {
            name: {
                "items_per_s": round(rate),
                "vs_blog_script": round(rate / blog, 2) if blog else None,
                "runs": runs[name],
            }
            for name, rate in rates.items()
        },
    }


if __name__ == "__main__":
    main()
