"""The tasks backend on django-tasks-db beside the process backend, with the same number of workers.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_tasks \\
        python -m bench.tasks_bench [--items 5000] [--workers 1,2] [--repeat 3] \\
        [--chunk-size 100] [--workload trivial] [--interval 0.05]

For each worker count N: N ``db_worker`` processes of django-tasks-db (``python -m django
db_worker --queue-name <a queue of their own> --interval I``) are started, not timed; then,
in turn ``--repeat`` times, the same journaled run on ``backend="process"`` and on
``TasksExecutor(backend="default", queue_name=...)``, each with ``workers=N`` and the same
chunk size. Each run starts from an empty ``auth_user`` table and its rows are counted
after it. Prints a Markdown table: median (and best) items/s of each, their ratio, the
per-chunk overhead (the extra worker-time per chunk on the queue: the difference of the two
runs' times, times the workers, over the chunks) and the caller's polls of its messages
per chunk.

The task queue is the benchmark's own database (``TASKS`` in bench/settings.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import django

from bench.celery_bench import against_process


def main() -> int:
    args = _parse()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    django.setup()
    from django.core.management import call_command

    from bench import jobs

    call_command("migrate", verbosity=0)
    os.environ[jobs.SPIN_ENV] = str(jobs.calibrate(jobs.spin))  # the workers inherit them
    os.environ[jobs.HASH_ENV] = str(jobs.calibrate(jobs.pbkdf2))
    rows = []
    for workers in args.workers:
        process, tasks, polls = [], [], []
        with _db_workers(workers, args.interval) as queue:
            for _ in range(args.repeat):
                process.append(_timed(args, "process", workers)[0])
                elapsed, reads = _timed(args, "tasks", workers, queue_name=queue)
                tasks.append(elapsed)
                polls.append(reads)
                print(
                    f"  workers={workers}: process {process[-1]:.2f}s, tasks {tasks[-1]:.2f}s",
                    file=sys.stderr,
                )
        rows.append((workers, process, tasks, polls))
    print(_table(args, rows))
    return 0


def _parse() -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--workers", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--workload", choices=["trivial", "setup2ms", "hash2ms"], default="trivial")
    parser.add_argument(
        "--interval", type=float, default=0.05, help="db_worker's poll when its queue is empty"
    )
    return parser.parse_args()


class _db_workers:
    """``workers`` db_worker processes on a queue of their own."""

    def __init__(self, workers: int, interval: float) -> None:
        self.workers, self.interval = workers, interval

    def __enter__(self) -> str:
        self.queue = f"bench-{uuid.uuid4().hex[:8]}"
        command = [sys.executable, "-m", "django", "db_worker", "--queue-name", self.queue]
        command += ["--interval", str(self.interval), "--no-startup-delay", "--no-reload", "-v", "0"]
        self.processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(self.workers)]
        return self.queue

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=60)


def _timed(args: argparse.Namespace, backend: str, workers: int, **tasks: Any) -> tuple[float, int]:
    """Seconds for one journaled run of ``args.items`` items, and the caller's polls; its rows are checked."""
    from django.contrib.auth import get_user_model

    import bulkpool
    from bench.child import user_rows
    from bench.jobs import WORKLOADS

    user = get_user_model()
    user.objects.all().delete()
    chosen: Any = bulkpool.TasksExecutor(workers, **tasks) if backend == "tasks" else "process"
    started = time.perf_counter()
    report = bulkpool.run(
        WORKLOADS[args.workload].job,
        user_rows(args.items),
        backend=chosen,
        workers=workers,
        chunk_size=args.chunk_size,
        run_id=f"bench-{backend}-{uuid.uuid4().hex}",
        progress=False,
    )
    elapsed = time.perf_counter() - started
    written = user.objects.count()
    if (report.ok, report.failed, written) != (args.items, 0, args.items):
        raise RuntimeError(f"{backend}: {report.ok} ok, {report.failed} failed, {written} rows: {report}")
    return elapsed, getattr(getattr(chosen, "_mailbox", None), "reads", 0)


def _table(args: argparse.Namespace, rows: list[tuple[int, list[float], list[float], list[int]]]) -> str:
    from django.db import connection

    chunks = -(-args.items // args.chunk_size)
    lines = [
        f"{args.items:,} items, workload {args.workload}, chunk_size={args.chunk_size}, "
        f"{connection.vendor}, django-tasks-db (db_worker --interval {args.interval:g}), "
        f"{args.repeat} runs each, alternating; median (best):",
        "",
        "| workers | process (journaled) | tasks (django-tasks-db) | tasks / process "
        "| per-chunk overhead | caller polls per chunk |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for workers, process, tasks, polls in rows:
        cells = against_process(args.items, workers, chunks, process, tasks)
        lines.append(f"| {workers} | {cells} | {statistics.median(polls) / chunks:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
