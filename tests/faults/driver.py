"""A bulkpool run in a process of its own, for the faults that hit the caller: Ctrl-C, SIGTERM, SIGKILL.

    BULKPOOL_FAULTS_DB_NAME=<database> python tests/faults/driver.py --items 400 --pause 0.01

The settings are the test project's (``DATABASE_URL`` picks the server), but the database
*name* comes from ``BULKPOOL_FAULTS_DB_NAME``: the test passes the name of its own test
database (``test_test_...``, or the SQLite test file), so the rows this process writes
are the rows the test counts. Without it, the run would write into the real database.

Output: ``DRIVER DONE ok=.. failed=.. skipped=..`` on stdout when the run finishes; on
KeyboardInterrupt (the run's report and resume hint are already on stderr)
``DRIVER INTERRUPTED`` on stderr and exit status 130, as a shell reports Ctrl-C. Either
way, then ``DRIVER CHILDREN n``: the processes of this one still alive once ``run`` has
returned or raised -- what a caller that goes on (a shell, a server) would be left with.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import django
import psutil
from django.conf import settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--pause", type=float, default=0.01, help="seconds each item holds its transaction")
    parser.add_argument("--think", type=float, help="seconds each item waits before its write instead")
    parser.add_argument("--chunk-size", type=int, default=10, help="0: auto")
    parser.add_argument("--workers", type=int, default=2, help="0: auto")
    parser.add_argument("--run-id")
    parser.add_argument("--start-method")
    parser.add_argument("--setup-pause", type=float, help="seconds each worker's setup takes")
    parser.add_argument("--celery-broker", help="run on the celery backend, with this broker")
    parser.add_argument("--celery-queue", help="the celery workers' queue")
    parser.add_argument("--tasks-backend", help="run on the tasks backend, with this alias of TASKS")
    parser.add_argument("--tasks-queue", help="the task workers' queue")
    parser.add_argument("--poison", type=int, help="the item that SIGKILLs every worker that runs it")
    args = parser.parse_args()

    settings.DATABASES["default"]["NAME"] = os.environ["BULKPOOL_FAULTS_DB_NAME"]
    django.setup()

    import bulkpool
    from tests.faults.jobs import slow_marker, slow_marker_with_state, slow_setup, think_then_mark

    backend: bulkpool.ProcessExecutor | bulkpool.CeleryExecutor | bulkpool.TasksExecutor
    if args.tasks_backend:
        backend = bulkpool.TasksExecutor(
            backend=args.tasks_backend, queue_name=args.tasks_queue, lease=3.0, heartbeat=0.5
        )
    elif args.celery_broker:
        from tests.celery_app import make_app

        app = make_app(args.celery_broker)
        backend = bulkpool.CeleryExecutor(app=app, queue=args.celery_queue, lease=8.0, heartbeat=1.0)
    else:
        backend = bulkpool.ProcessExecutor(start_method=args.start_method)
    # With a setup, func takes its state too (bulkpool checks the signature before item one).
    func = functools.partial(slow_marker_with_state if args.setup_pause else slow_marker, args.pause)
    if args.think is not None:
        func = functools.partial(think_then_mark, args.think)
    extra = {}
    if args.poison is not None:  # its chunk is split at once, as in tests/faults/test_celery.py
        from tests.celery_jobs import marker_killing_at

        func, extra = functools.partial(marker_killing_at, args.poison), {"retries": 0}
    try:
        report = bulkpool.run(
            func,
            range(args.items),
            backend=backend,
            workers=args.workers or "auto",
            chunk_size=args.chunk_size or "auto",
            run_id=args.run_id,
            setup=functools.partial(slow_setup, args.setup_pause) if args.setup_pause else None,
            progress=False,
            **extra,
        )
    except KeyboardInterrupt:
        print("DRIVER INTERRUPTED", file=sys.stderr, flush=True)
        print_children()
        return 130
    print(f"DRIVER DONE ok={report.ok} failed={report.failed} skipped={report.skipped}", flush=True)
    print(f"DRIVER NOTES {report.notes}", flush=True)
    print_children()
    return 0


def print_children() -> None:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    print(f"DRIVER CHILDREN {len(alive)} {alive}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
