"""Benchmark bulkpool.create / update against bulk_create / bulk_update and a plain loop.

    python -m bench.operations [--url postgres://postgres@127.0.0.1:5432/test]
        [--items 5000] [--workers 2] [--repeat 1] [--methods loop,bulk_create,...]

Runs from the repository root, in one process, on the bench project (``bench/settings.py``:
``auth.User`` with a ``pre_save`` and a ``post_save`` receiver). Every method handles the
same rows one after the other, and the table gives each as a ratio to the plain loop of
the same operation, so the numbers of one run compare with each other. The database must
exist; ``auth_user`` is emptied before each create method, so do not point it at data
you want to keep.

create methods, each writing ``--items`` users from a generator of dicts:

    loop              for row in rows: User.objects.create(**row)      (autocommit; baseline)
    bulk_create       User.objects.bulk_create(..., batch_size=1000)    (no save(), no signals)
    bulkpool_serial   bulkpool.create(User, rows, backend="serial")
    bulkpool_thread   the same with backend="thread", workers=--workers
    bulkpool_process  the same with backend="process", workers=--workers
    signalled_bulk_create   by hand: pre_save per object, bulk_create per 1,000, post_save per
                      object, one atomic() per 1,000 (the floor for a signal-keeping bulk path)
    bulkpool_fast_serial    bulkpool.create(User, rows, fast=True, backend="serial")
    bulkpool_fast_serial_1000   the same with chunk_size=1000 (bulk_create's batch)
    bulkpool_fast_process   fast=True, backend="process", workers=--workers
    bulkpool_fast_process_1000  the same with chunk_size=1000

update methods, each setting ``first_name`` on every user and saving only that field:

    loop              for user in User.objects.all(): set; user.save(update_fields=[...])
    bulk_update       load all, set, User.objects.bulk_update(..., batch_size=1000)
    bulkpool_*        bulkpool.update(User.objects.all(), values=..., update_fields=[...])
    bulkpool_fast_*   the same with fast=True (chunk_size=1000 for *_1000)

The ``signalled`` column counts the users whose ``pre_save`` receiver ran (create) or
whose row changed (update): what each method actually did, checked after it ran.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/test"
BATCH = 1000


def rows(count: int) -> Iterator[dict[str, str]]:
    return ({"username": f"user{n}", "email": f"user{n}@example.com"} for n in range(count))


def create_methods(workers: int) -> dict[str, Callable[[int], None]]:
    from django.contrib.auth.models import User
    from django.db import transaction
    from django.db.models.signals import post_save, pre_save

    import bulkpool

    def loop(count: int) -> None:
        for row in rows(count):
            User.objects.create(**row)

    def bulk_create(count: int) -> None:
        User.objects.bulk_create((User(**row) for row in rows(count)), batch_size=BATCH)

    def signalled_bulk_create(count: int) -> None:
        # The floor for a signal-keeping bulk path (FINDINGS.md), written by hand.
        iterator = rows(count)
        while chunk := [User(**row) for row in itertools.islice(iterator, BATCH)]:
            with transaction.atomic():
                for user in chunk:
                    pre_save.send(User, instance=user, raw=False, using="default", update_fields=None)
                User.objects.bulk_create(chunk)
                for user in chunk:
                    post_save.send(
                        User, instance=user, created=True, raw=False, using="default", update_fields=None
                    )

    def with_bulkpool(backend: str, **options: Any) -> Callable[[int], None]:
        def create(count: int) -> None:
            report = bulkpool.create(
                User, rows(count), backend=backend, workers=workers, progress=False, **options
            )
            assert report.ok == count, report

        return create

    return {
        "loop": loop,
        "bulk_create": bulk_create,
        "signalled_bulk_create": signalled_bulk_create,
        "bulkpool_serial": with_bulkpool("serial"),
        "bulkpool_thread": with_bulkpool("thread"),
        "bulkpool_process": with_bulkpool("process"),
        "bulkpool_fast_serial": with_bulkpool("serial", fast=True),
        "bulkpool_fast_serial_1000": with_bulkpool("serial", fast=True, chunk_size=BATCH),
        "bulkpool_fast_process": with_bulkpool("process", fast=True),
        "bulkpool_fast_process_1000": with_bulkpool("process", fast=True, chunk_size=BATCH),
    }


def update_methods(workers: int) -> dict[str, Callable[[str], None]]:
    from django.contrib.auth.models import User

    import bulkpool

    def loop(value: str) -> None:
        for user in User.objects.all():
            user.first_name = value
            user.save(update_fields=["first_name"])

    def bulk_update(value: str) -> None:
        users = list(User.objects.all())
        for user in users:
            user.first_name = value
        User.objects.bulk_update(users, ["first_name"], batch_size=BATCH)

    def with_bulkpool(backend: str, **options: Any) -> Callable[[str], None]:
        def update(value: str) -> None:
            bulkpool.update(
                User.objects.all(),
                values={"first_name": value},
                update_fields=["first_name"],
                backend=backend,
                workers=workers,
                progress=False,
                **options,
            )

        return update

    return {
        "loop": loop,
        "bulk_update": bulk_update,
        "bulkpool_serial": with_bulkpool("serial"),
        "bulkpool_thread": with_bulkpool("thread"),
        "bulkpool_process": with_bulkpool("process"),
        "bulkpool_fast_serial": with_bulkpool("serial", fast=True),
        "bulkpool_fast_serial_1000": with_bulkpool("serial", fast=True, chunk_size=BATCH),
        "bulkpool_fast_process": with_bulkpool("process", fast=True),
    }


def measure(args: argparse.Namespace) -> dict[tuple[str, str], list[dict[str, Any]]]:
    from django.contrib.auth.models import User

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(args.repeat):
        for name, create in create_methods(args.workers).items():
            if args.methods and name not in args.methods:
                continue
            User.objects.all().delete()
            elapsed = _timed(lambda create=create: create(args.items))
            done = {"elapsed": elapsed, "rows": User.objects.count()}
            done["signalled"] = User.objects.filter(last_name="signalled").count()
            results.setdefault(("create", name), []).append(done)
            _say(f"create {name:<17} {args.items / elapsed:>9,.0f} items/s")
        # Update the rows the last create wrote: every method changes every row.
        for name, update in update_methods(args.workers).items():
            if args.methods and name not in args.methods:
                continue
            value = f"{name}-{round_}"
            elapsed = _timed(lambda update=update, value=value: update(value))
            changed = User.objects.filter(first_name=value).count()
            done = {"elapsed": elapsed, "rows": User.objects.count(), "signalled": changed}
            results.setdefault(("update", name), []).append(done)
            _say(f"update {name:<17} {args.items / elapsed:>9,.0f} items/s")
    return results


def render(args: argparse.Namespace, results: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    import django
    from django.db import connection

    def rate(runs: list[dict[str, Any]]) -> float:
        return float(statistics.median(args.items / run["elapsed"] for run in runs))

    lines = [
        f"### create and update, {args.items:,} users, {connection.vendor}",
        "",
        f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} cores; Python {sys.version.split()[0]}, "
        f"Django {django.get_version()}; bulkpool workers={args.workers}, default chunk size; "
        f"median of {args.repeat} run(s); load average {args.load:.2f} at start. "
        "Ratios are to `loop` of the same operation; *time vs bulk* is the method's time over "
        "`bulk_create`'s (`bulk_update`'s), lower is better.",
        "",
        "| operation | method | items/s | vs `loop` | time vs bulk | rows | signalled |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for operation in ("create", "update"):
        if (operation, "loop") not in results:
            continue
        baseline = rate(results[operation, "loop"])
        bulk = results.get((operation, "bulk_create" if operation == "create" else "bulk_update"))
        for (op, name), runs in results.items():
            if op != operation:
                continue
            per_second = rate(runs)
            versus_bulk = f"{rate(bulk) / per_second:.2f}x" if bulk else ""
            lines.append(
                f"| {op} | `{name}` | {per_second:,.0f} | {per_second / baseline:.2f} | {versus_bulk} "
                f"| {runs[-1]['rows']:,} | {runs[-1]['signalled']:,} |"
            )
    return "\n".join(lines) + "\n"


def _timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"database URL (default {DEFAULT_URL})")
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        default=None,
        help="a comma-separated subset (with loop)",
    )
    args = parser.parse_args()
    args.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    setup_django(args.url)
    print(render(args, measure(args)))
    return 0


def setup_django(url: str) -> None:
    """The bench project on the database at ``url``, migrated."""
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings"
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


if __name__ == "__main__":
    sys.exit(main())
