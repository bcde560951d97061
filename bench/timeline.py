"""Where one run's time goes: the pool's start, each chunk sent and back, its stop.

    python -m bench.timeline [--database sqlite] [--method bulkpool_fast] [--reference bulk_create]
        [--items 1000] [--rounds 5] [--list]

Every round runs the reference, then the method, over fresh rows of the trivial workload
(in one process, as ``bench.alternating`` does: the machine's swings hit both alike).
It prints the median of each and of their per-round ratio, then the last round's run of
the method as a timeline: milliseconds since the call, as the process or thread
executor started, was sent each chunk, gave each back, and stopped. The fixed costs of a
small run -- the workers' start and stop, the chunks that measure the pace, a COMMIT
each -- are read off it. Every run must write every row, or the command stops.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.alternating import method_names, timed_run
from bench.matrix import URLS
from bench.run import child_env

Stamps = list[tuple[float, str]]


def main(argv: list[str]) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="bulkpool-timeline-") as tmp:
        os.environ.update(child_env(URLS.get(args.database) or f"sqlite:///{tmp}/timeline.sqlite3"))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        stamps: Stamps = []
        _instrument(stamps)
        seconds: dict[str, list[float]] = {args.reference: [], args.method: []}
        for _ in range(args.rounds):
            seconds[args.reference].append(timed_run(args.reference, args.items, args.list))
            took = timed_run(args.method, args.items, args.list, starting=_restart(stamps))
            seconds[args.method].append(took)
            stamps.append((stamps[0][0] + took, "returned"))
    print(_report(args, seconds, stamps))
    return 0


def _restart(stamps: Stamps) -> Callable[[], None]:
    def called() -> None:
        stamps[:] = [(time.perf_counter(), "called")]

    return called


def _instrument(stamps: Stamps) -> None:
    """Stamp the start, stop, submits and events of the process and thread executors."""
    from bulkpool.executors.process import ProcessExecutor
    from bulkpool.executors.thread import ThreadExecutor

    for cls in (ProcessExecutor, ThreadExecutor):
        for name in ("start", "stop"):
            setattr(cls, name, _stamping(getattr(cls, name), stamps, f"{cls.name} executor: {name}"))
        cls.submit = _stamping_submit(cls.submit, stamps)  # type: ignore[method-assign]
        cls.events = _stamping_events(cls.events, stamps)  # type: ignore[method-assign]


def _stamping(method: Callable[..., Any], stamps: Stamps, label: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        stamps.append((time.perf_counter(), f"{label} began"))
        try:
            return method(self, *args, **kwargs)
        finally:
            stamps.append((time.perf_counter(), f"{label} ended"))

    return stamped


def _stamping_submit(method: Callable[..., Any], stamps: Stamps) -> Callable[..., Any]:
    @functools.wraps(method)
    def stamped(self: Any, chunk: Any) -> Any:
        stamps.append((time.perf_counter(), f"chunk of {len(chunk)} sent"))
        return method(self, chunk)

    return stamped


def _stamping_events(method: Callable[..., Any], stamps: Stamps) -> Callable[..., Any]:
    @functools.wraps(method)
    def stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        events = method(self, *args, **kwargs)
        now = time.perf_counter()
        stamps.extend((now, f"chunk of {len(event.chunk)} back ({type(event).__name__})") for event in events)
        return events

    return stamped


def _report(args: argparse.Namespace, seconds: dict[str, list[float]], stamps: Stamps) -> str:
    reference, method = seconds[args.reference], seconds[args.method]
    ratio = statistics.median(m / r for m, r in zip(method, reference, strict=True))
    lines = [
        f"{args.database}, {args.items:,} items in a {'list' if args.list else 'generator'}, "
        f"{args.rounds} rounds",
        f"{args.reference}: median {1000 * statistics.median(reference):.1f} ms",
        f"{args.method}: median {1000 * statistics.median(method):.1f} ms, {ratio:.2f}x {args.reference} "
        "(median of the rounds' ratios)",
        f"The last round's {args.method}, in ms since it was called:",
    ]
    begun = stamps[0][0]
    lines += [f"{1000 * (at - begun):9.2f}  {what}" for at, what in stamps]  # as they were stamped
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "mysql"], default="sqlite")
    parser.add_argument("--method", default="bulkpool_fast", choices=sorted(method_names()))
    parser.add_argument("--reference", default="bulk_create", choices=sorted(method_names()))
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--list", action="store_true", help="the rows in a list, not a generator")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
