"""One step of the benchmark, in a fresh process; prints its result as one JSON line.

    python -m bench.child prepare
    python -m bench.child method NAME --workload trivial --items 10000

NAME is a create method (``methods.METHODS``) or an update method (``methods.UPDATE_METHODS``:
the table is filled with ``--items`` users by ``bulk_create`` before the clock starts).

``run.py`` starts these with DJANGO_SETTINGS_MODULE, DATABASE_URL and the calibrated
loop counts in the environment. A method that raises, writes the wrong number of rows,
or whose Report disagrees with the table, is reported with ``"ok": false``.
"""

import argparse
import functools
import importlib.metadata
import json
import os
import resource
import sqlite3
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import django


def main(argv: list[str]) -> None:
    args = _parse(argv)
    django.setup()
    if args.step == "prepare":
        print(json.dumps(prepare()))
    else:
        print(json.dumps(measure(args.name, args.workload, args.items)))


UPDATED = "updated"  # the first_name every update method sets


def prepare() -> dict[str, Any]:
    """Migrate, calibrate the per-item work, and report versions."""
    from django.core.management import call_command

    from bench import jobs

    call_command("migrate", verbosity=0)
    return {
        "database": _database_version(),
        "driver": _driver_version(),
        "django": django.get_version(),
        "bulkpool": _bulkpool_version(),
        "bulkpool_defaults": _bulkpool_defaults(),
        jobs.SPIN_ENV: jobs.calibrate(jobs.spin),
        jobs.HASH_ENV: jobs.calibrate(jobs.pbkdf2),
    }


def measure(name: str, workload_name: str, count: int) -> dict[str, Any]:
    """Time one method over ``count`` items, then check what it wrote."""
    from bench.jobs import WORKLOADS
    from bench.methods import METHODS, UPDATE_METHODS

    empty_user_tables()
    if name in UPDATE_METHODS:
        _fill_user_table(count)
        call = functools.partial(UPDATE_METHODS[name], UPDATED)
    else:
        call = functools.partial(METHODS[name], WORKLOADS[workload_name], user_rows(count))
    result: dict[str, Any] = {"method": name, "items": count, "load": os.getloadavg()[0]}
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    try:
        facts = call()
    except ImportError as exc:
        if exc.name != "bulkpool":
            raise
        return {**result, "skipped": f"bulkpool is not importable ({exc})"}
    except Exception as exc:
        traceback.print_exc()
        facts = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    result["elapsed"] = time.perf_counter() - start
    result["cpu"] = _cpu_seconds() - cpu_before
    result["rss_mb"] = _peak_rss_mb()
    result.update(facts or {})
    result.update(_count_rows(updated=name in UPDATE_METHODS))
    result["problems"] = _problems(result)
    return result


def user_rows(count: int) -> Iterator[dict[str, str]]:
    for i in range(count):
        yield {"username": f"user{i:07d}", "email": f"user{i}@example.com"}


def empty_user_tables() -> None:
    from django.core.management.color import no_style
    from django.db import connection

    tables = ["auth_user_groups", "auth_user_user_permissions", "auth_user"]
    sql = connection.ops.sql_flush(no_style(), tables, reset_sequences=True)
    connection.ops.execute_sql_flush(sql)


def _fill_user_table(count: int) -> None:
    """The rows an update method changes: written in bulk, so no receiver has stamped them."""
    from django.contrib.auth import get_user_model
    from django.db import connections

    user = get_user_model()
    user.objects.bulk_create((user(**item) for item in user_rows(count)), batch_size=1000)
    connections.close_all()  # process workers must not inherit this connection


def _count_rows(updated: bool) -> dict[str, int]:
    """``rows``: the rows the method wrote (created, or changed by an update method)."""
    from django.contrib.auth import get_user_model
    from django.db import connections

    connections.close_all()  # a method may have left this connection in a bad state
    users = get_user_model().objects
    counts = {"rows": users.count(), "signalled": users.filter(last_name="signalled").count()}
    if updated:
        counts = {"table_rows": counts["rows"], "rows": users.filter(first_name=UPDATED).count()}
    return counts


def _problems(result: dict[str, Any]) -> list[str]:
    problems = []
    if "error" in result:
        problems.append(result["error"])
    if result["rows"] != result["items"]:
        problems.append(f"{result['rows']:,} rows written for {result['items']:,} items")
    if result.get("report_ok", result["items"]) != result["items"]:
        problems.append(f"Report.ok={result['report_ok']:,}, failed={result['report_failed']:,}")
    if result.get("first_failure"):
        problems.append(f"first failure: {result['first_failure']}")
    return problems


def _cpu_seconds() -> float:
    """CPU time of this process, its threads, and its worker processes that have ended."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _database_version() -> str:
    from django.db import connection

    if connection.vendor == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    query = "SHOW server_version" if connection.vendor == "postgresql" else "SELECT VERSION()"
    with connection.cursor() as cursor:
        cursor.execute(query)
        version = cursor.fetchone()[0].split(" ")[0].split("-")[0]  # 10.11.6-MariaDB-0+deb12u1
    return f"{connection.display_name} {version}"


def _driver_version() -> str:
    from django.db import connection

    if connection.vendor == "sqlite":
        return f"sqlite3 (standard library), SQLite library {sqlite3.sqlite_version}"
    names = ["psycopg", "psycopg2"] if connection.vendor == "postgresql" else ["mysqlclient"]
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _bulkpool_defaults() -> dict[str, str]:
    """What a run with no option gets today: the defaults the untuned methods measure."""
    try:
        from bulkpool.options import Options

        options = Options()
    except Exception as exc:  # bulkpool missing or changed: say so, measure the rest
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {name: repr(getattr(options, name)) for name in ("backend", "workers", "chunk_size", "atomic")}


def _bulkpool_version() -> str:
    try:
        return importlib.metadata.version("django-bulkpool")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.child")
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("prepare")
    method = steps.add_parser("method")
    method.add_argument("name")
    method.add_argument("--workload", default="trivial")
    method.add_argument("--items", type=int, default=10_000)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
