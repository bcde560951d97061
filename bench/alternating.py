"""One of bulkpool's constants at several values, compared in one process, round by round.

    python -m bench.alternating --database postgres --constant sizing.SHARE_FLOOR --values 0,0.1
        [--items 1000] [--rounds 25] [--method bulkpool_untuned] [--reference loop_atomic500]

The matrix runs every method in a fresh process, so each run's noise is its own: on a
shared machine whose speed swings twofold from one second to the next, a change worth 5%
drowns in it. Here one process runs, in every round, the reference method and then the
bulkpool method once per value, the constant set just before (forked workers inherit it).
The machine's swings then hit all of a round alike, and the median of the per-round
ratios holds still where the rates do not. It measures a change to the library, not the
library against the alternatives: that is the matrix's job. Trivial workload only; every
run must write every row, or the command stops.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Collection
from types import ModuleType

from bench.matrix import URLS
from bench.run import child_env


def main(argv: list[str]) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="bulkpool-alternating-") as tmp:
        url = args.url or URLS.get(args.database) or f"sqlite:///{tmp}/alternating.sqlite3"
        os.environ.update(child_env(url))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        homes = _homes(args.constant)
        seconds: dict[str, list[float]] = {label: [] for label in ["reference", *args.values]}
        for _ in range(args.rounds):
            seconds["reference"].append(_timed(args.reference, args.items))
            for value in args.values:
                for module, name in homes:
                    setattr(module, name, _number(value))
                seconds[value].append(_timed(args.method, args.items))
    print(_table(args, seconds))
    return 0


def _timed(method: str, count: int) -> float:
    """Seconds ``method`` took over ``count`` fresh items, after checking what it wrote."""
    from django.contrib.auth import get_user_model

    from bench.child import _empty_user_tables, _items
    from bench.jobs import WORKLOADS
    from bench.methods import METHODS

    _empty_user_tables()
    start = time.perf_counter()
    METHODS[method](WORKLOADS["trivial"], _items(count))
    elapsed = time.perf_counter() - start
    written = get_user_model().objects.count()
    if written != count:
        raise SystemExit(f"bench.alternating: {method} wrote {written:,} rows of {count:,}")
    return elapsed


def _table(args: argparse.Namespace, seconds: dict[str, list[float]]) -> str:
    reference = seconds["reference"]
    lines = [
        f"{args.database}, {args.items:,} items, {args.rounds} rounds; reference: {args.reference}",
        f"| {args.constant} | {args.method}: median ms | reference / it, median per round |",
        "|---|---:|---:|",
        f"| (reference) | {1000 * statistics.median(reference):.1f} | 1.00 |",
    ]
    for value in args.values:
        ratio = statistics.median(r / s for r, s in zip(reference, seconds[value], strict=True))
        lines.append(f"| {value} | {1000 * statistics.median(seconds[value]):.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def _homes(dotted: str) -> list[tuple[ModuleType, str]]:
    """Where ``module.NAME`` is bound: its module, and every bulkpool module that imported it
    by name (``from bulkpool.sizing import PROBE_CHUNKS`` holds a binding of its own)."""
    path, _, name = dotted.rpartition(".")
    module = importlib.import_module(f"bulkpool.{path}")
    if not path or not hasattr(module, name):
        raise SystemExit(f"bench.alternating: bulkpool.{dotted} does not exist")
    importlib.import_module("bulkpool.engine")  # and so every module a run uses
    value = getattr(module, name)
    return [
        (other, name)
        for key, other in list(sys.modules.items())
        if key.startswith("bulkpool") and getattr(other, name, None) is value
    ]


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "mysql"], default="sqlite")
    parser.add_argument("--url", help="instead of the matrix's database (it is emptied)")
    parser.add_argument("--constant", required=True, help="module.NAME in bulkpool, e.g. sizing.BALANCE")
    parser.add_argument("--values", required=True, type=lambda text: text.split(","))
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--method", default="bulkpool_untuned", choices=sorted(_methods()))
    parser.add_argument("--reference", default="loop_atomic500", choices=sorted(_methods()))
    return parser.parse_args(argv)


def _methods() -> Collection[str]:
    from bench.methods import METHODS

    return METHODS.keys()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
