"""The celery backend beside the process backend, with the same number of worker processes.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench_celery \\
        python -m bench.celery_bench [--items 5000] [--workers 1,2,4] [--repeat 3] \\
        [--chunk-size 100] [--workload trivial] [--broker redis://127.0.0.1:6379/14]

For each worker count N: a local celery node (``celery -A bench.celery_app worker --pool
prefork -c N``, ``worker_prefetch_multiplier = 1``) is started, not timed; then, in turn
``--repeat`` times, the same run on ``backend="process"`` with a ``run_id`` (every celery
run is journaled, so the process backend is too, for a fair comparison) and on
``CeleryExecutor(app=..., queue=...)``, each with ``workers=N`` and the same chunk size.
Each run starts from an empty ``auth_user`` table and its rows are counted after it.
Prints a Markdown table: median (and best) items/s of each, their ratio, and the per-chunk overhead
(the extra time a worker spends per chunk on celery: the difference of
the two runs' times, times the workers, over the chunks).

Nothing in ``bench/run.py`` or ``bench/methods.py`` is used or changed: this file stands alone.
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


def main() -> int:
    args = _parse()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    os.environ.setdefault("BENCH_CELERY_BROKER", args.broker)
    django.setup()
    from django.core.management import call_command

    from bench import jobs

    call_command("migrate", verbosity=0)
    os.environ[jobs.SPIN_ENV] = str(jobs.calibrate(jobs.spin))  # the nodes inherit them
    os.environ[jobs.HASH_ENV] = str(jobs.calibrate(jobs.pbkdf2))
    rows = []
    for workers in args.workers:
        process, celery = [], []
        with _node(workers) as (app, queue):
            for _ in range(args.repeat):
                process.append(_timed(args, "process", workers))
                celery.append(_timed(args, "celery", workers, app=app, queue=queue))
                timings = f"process {process[-1]:.2f}s, celery {celery[-1]:.2f}s"
                print(f"  workers={workers}: {timings}", file=sys.stderr)
        rows.append((workers, process, celery))
    print(_table(args, rows))
    return 0


def _parse() -> argparse.Namespace:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--workers", type=lambda s: [int(n) for n in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--workload", choices=["trivial", "setup2ms", "hash2ms"], default="trivial")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    return parser.parse_args()


class _node:
    """A local celery node with ``workers`` prefork processes on a queue of its own."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def __enter__(self) -> tuple[Any, str]:
        from bench.celery_app import app

        self.app, self.queue = app, f"bench-{uuid.uuid4().hex[:8]}"
        name = f"{self.queue}@localhost"
        command = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "prefork"]
        command += ["-c", str(self.workers), "-Q", self.queue, "-n", name]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "error"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[name], timeout=0.5):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.process.kill()
                raise RuntimeError("the celery worker did not start")
        return app, self.queue

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(self.queue)


def _timed(args: argparse.Namespace, backend: str, workers: int, **celery: Any) -> float:
    """Seconds for one journaled run of ``args.items`` items; its rows are checked."""
    from django.contrib.auth import get_user_model

    import bulkpool
    from bench.child import user_rows
    from bench.jobs import WORKLOADS

    user = get_user_model()
    user.objects.all().delete()
    chosen: Any = bulkpool.CeleryExecutor(**celery) if backend == "celery" else "process"
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
    return elapsed


def _table(args: argparse.Namespace, rows: list[tuple[int, list[float], list[float]]]) -> str:
    from django.db import connection

    chunks = -(-args.items // args.chunk_size)
    lines = [
        f"{args.items:,} items, workload {args.workload}, chunk_size={args.chunk_size}, "
        f"{connection.vendor}, broker {args.broker.split('://')[0]}, {args.repeat} runs each, "
        "alternating; median (best):",
        "",
        "| workers | process (journaled) | celery | celery / process | per-chunk overhead |",
        "|---:|---:|---:|---:|---:|",
    ]
    for workers, process, celery in rows:
        lines.append(f"| {workers} | {against_process(args.items, workers, chunks, process, celery)} |")
    return "\n".join(lines)


def against_process(items: int, workers: int, chunks: int, process: list[float], other: list[float]) -> str:
    """The cells that set a brokered backend's times beside the process backend's: both
    rates, their ratio, and the worker-time per chunk the broker costs (median, and best)."""
    median_p, median_o = statistics.median(process), statistics.median(other)
    best_p, best_o = min(process), min(other)
    overhead = (median_o - median_p) * workers / chunks * 1000
    best_overhead = (best_o - best_p) * workers / chunks * 1000
    return (
        f"{items / median_p:,.0f}/s ({items / best_p:,.0f}) | "
        f"{items / median_o:,.0f}/s ({items / best_o:,.0f}) | "
        f"{median_p / median_o:.2f} ({best_p / best_o:.2f}) | "
        f"{overhead:+.1f} ms ({best_overhead:+.1f})"
    )


if __name__ == "__main__":
    sys.exit(main())
