"""Benchmark bulkpool.upsert against a loop of update_or_create and bulk_create(update_conflicts=True).

    python -m bench.upsert [--url postgres://postgres@127.0.0.1:5432/test] [--items 10000]
        [--repeat 3] [--methods update_or_create_500,bulk_create_conflicts,...]

Runs from the repository root on the bench project (``bench/settings.py``: ``auth.User``
with a ``pre_save`` and a ``post_save`` receiver). Before every method the table is reset
to the same start: the users of the even row numbers exist (with an old email), so half
the rows update an existing user and half create one. Every row sets ``email``; the key is
``username``. The methods take turns ``--repeat`` times; the table gives medians, as a
ratio to the update_or_create loop, and each method's time over bulk_create's.

    update_or_create_500    update_or_create(username=..., defaults={"email": ...}) per row,
                            in atomic() blocks of 500: the loop a careful user writes
    bulk_create_conflicts   bulk_create(update_conflicts=True, unique_fields=["username"],
                            update_fields=["email"], batch_size=1000): no save(), no signals,
                            no "created" per row (where the database cannot return keys, none)
    upsert                  bulkpool.upsert(User, rows, unique_fields=["username"]): untuned
    upsert_fast             the same with fast=True
    upsert_fast_serial      fast=True, backend="serial": on the caller's core only

Each run is checked: every row written, every email the new one, and (``signalled``) how
many post_save signals the receivers saw in this process (the serial methods only: worker
processes count their own).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.operations import DEFAULT_URL, _say, setup_django

BATCH = 500


def rows(count: int) -> list[dict[str, str]]:
    return [{"username": f"user{n}", "email": f"new{n}@example.com"} for n in range(count)]


def reset(count: int) -> None:
    """The start every method meets: the users of even row numbers exist, with an old email."""
    from django.contrib.auth.models import User

    User.objects.all().delete()
    User.objects.bulk_create(
        (User(username=f"user{n}", email=f"old{n}@example.com") for n in range(0, count, 2)), batch_size=1000
    )


def methods() -> dict[str, Callable[[list[dict[str, str]]], None]]:
    from django.contrib.auth.models import User
    from django.db import connection, transaction

    import bulkpool

    def update_or_create_500(data: list[dict[str, str]]) -> None:
        for start in range(0, len(data), BATCH):
            with transaction.atomic():
                for row in data[start : start + BATCH]:
                    User.objects.update_or_create(username=row["username"], defaults={"email": row["email"]})

    def bulk_create_conflicts(data: list[dict[str, str]]) -> None:
        # MySQL/MariaDB's ON DUPLICATE KEY UPDATE takes no conflict target.
        target = ["username"] if connection.features.supports_update_conflicts_with_target else None
        User.objects.bulk_create(
            [User(**row) for row in data],
            update_conflicts=True,
            unique_fields=target,
            update_fields=["email"],
            batch_size=1000,
        )

    def with_bulkpool(**options: Any) -> Callable[[list[dict[str, str]]], None]:
        def upsert(data: list[dict[str, str]]) -> None:
            report = bulkpool.upsert(User, data, unique_fields=["username"], progress=False, **options)
            assert (report.ok, report.failed) == (len(data), 0), report

        return upsert

    return {
        "update_or_create_500": update_or_create_500,
        "bulk_create_conflicts": bulk_create_conflicts,
        "upsert": with_bulkpool(),
        "upsert_fast": with_bulkpool(fast=True),
        "upsert_fast_serial": with_bulkpool(fast=True, backend="serial"),
    }


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    from django.contrib.auth.models import User

    from bench import jobs

    data = rows(args.items)
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for name, method in methods().items():
            if args.methods and name not in args.methods:
                continue
            reset(args.items)
            jobs.saved = 0
            started = time.perf_counter()
            method(data)
            elapsed = time.perf_counter() - started
            done = {
                "elapsed": elapsed,
                "rows": User.objects.count(),
                "new_email": User.objects.filter(email__startswith="new").count(),
                "signalled": jobs.saved,
            }
            assert done["rows"] == done["new_email"] == args.items, (name, done)
            results.setdefault(name, []).append(done)
            _say(f"{name:<22} {args.items / elapsed:>9,.0f} rows/s")
    return results


def render(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> str:
    import django
    from django.db import connection

    def seconds(name: str) -> float:
        return float(statistics.median(run["elapsed"] for run in results[name]))

    lines = [
        f"### upsert, {args.items:,} rows (half new, half existing), {connection.vendor}",
        "",
        f"{time.strftime('%Y-%m-%d')}; {os.cpu_count()} cores; Python {sys.version.split()[0]}, "
        f"Django {django.get_version()}; median of {args.repeat}; load average {args.load:.2f} at "
        "start. *vs loop*: rows/s over the update_or_create loop's; *time vs bulk*: the method's "
        "time over bulk_create(update_conflicts=True)'s, lower is better.",
        "",
        "| method | rows/s | vs loop | time vs bulk | signals seen here |",
        "|---|---:|---:|---:|---:|",
    ]
    loop = seconds("update_or_create_500") if "update_or_create_500" in results else None
    bulk = seconds("bulk_create_conflicts") if "bulk_create_conflicts" in results else None
    for name, runs in results.items():
        took = seconds(name)
        versus_loop = f"{loop / took:.2f}" if loop else ""
        versus_bulk = f"{took / bulk:.2f}x" if bulk else ""
        signalled = runs[-1]["signalled"]
        lines.append(
            f"| `{name}` | {args.items / took:,.0f} | {versus_loop} | {versus_bulk} | {signalled:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"database URL (default {DEFAULT_URL})")
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--methods", type=lambda text: text.split(","), default=None)
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    setup_django(args.url)
    print(render(args, measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
