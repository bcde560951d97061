"""One of bulkpool's constants at several values, compared in one process, round by round.

    python -m bench.alternating --database postgres --constant sizing.SHARE_FLOOR --values 0.1,0
        [--items 1000] [--rounds 25] [--method bulkpool_untuned] [--reference loop_atomic500] [--list]

The matrix runs every method in a fresh process, so each run's noise is its own: on a
shared machine whose speed swings twofold from one second to the next, a change worth 5%
drowns in it. Here one process runs, in every round, the reference method with the
constant as bulkpool ships it, then the bulkpool method once per value, the values in
reverse order every other round. The machine's swings hit all of a round alike, and the
medians of the per-round ratios hold still where the rates do not. It measures a change to
the library, not the library against the alternatives: that is the matrix's job. Trivial
workload only; the rows come from a generator, as in the matrix, or with ``--list`` in a
list (a length known up front: the pool shares the whole run out among its workers).
Every run must write every row, or the command stops.

The constant is rebound in its module and wherever a bulkpool module imported it by name,
before each run; the workers inherit it when they are forked. A copy made when the code
was defined -- a default argument, a dataclass field's default -- keeps the shipped value:
the command names those it finds, and such a constant is not for this tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from types import ModuleType

from bench.matrix import URLS
from bench.run import child_env


def main(argv: list[str]) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="bulkpool-alternating-") as tmp:
        os.environ.update(child_env(args.url or URLS.get(args.database) or f"sqlite:///{tmp}/alt.sqlite3"))
        import django

        django.setup()
        homes, shipped = _homes(args.constant)
        for copy in _copies(shipped):
            print(f"bench.alternating: {copy} keeps {shipped!r} whatever the value", file=sys.stderr)
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        seconds: dict[str, list[float]] = {label: [] for label in ["reference", *args.values]}
        for round_number in range(args.rounds):
            _rebind(homes, shipped)
            seconds["reference"].append(timed_run(args.reference, args.items, args.list))
            for value in args.values if round_number % 2 == 0 else reversed(args.values):
                _rebind(homes, _number(value))
                seconds[value].append(timed_run(args.method, args.items, args.list))
    print(_table(args, seconds))
    return 0


def timed_run(
    method: str, count: int, as_list: bool, *, starting: Callable[[], object] = lambda: None
) -> float:
    """Seconds ``method`` took over ``count`` fresh rows, after checking it wrote them all;
    ``starting`` is called just before the clock starts."""
    from django.contrib.auth import get_user_model

    from bench.child import empty_user_tables, user_rows
    from bench.jobs import WORKLOADS
    from bench.methods import METHODS

    empty_user_tables()
    rows = list(user_rows(count)) if as_list else user_rows(count)
    starting()
    start = time.perf_counter()
    METHODS[method](WORKLOADS["trivial"], rows)
    elapsed = time.perf_counter() - start
    written = get_user_model().objects.count()
    if written != count:
        raise SystemExit(f"bench.alternating: {method} wrote {written:,} rows of {count:,}")
    return elapsed


def _table(args: argparse.Namespace, seconds: dict[str, list[float]]) -> str:
    """A row per value: its median time, and per round the reference's time over it and the
    first value's time over it (above 1: faster)."""
    reference, first = seconds["reference"], seconds[args.values[0]]
    lines = [
        f"{args.url or args.database}, {args.items:,} items in a {'list' if args.list else 'generator'}, "
        f"{args.rounds} rounds; "
        f"{args.method} against {args.reference}",
        f"| {args.constant} | median ms | {args.reference} / it | {args.values[0]} / it |",
        "|---|---:|---:|---:|",
        f"| ({args.reference}) | {1000 * statistics.median(reference):.1f} | 1.00 | |",
    ]
    for value in args.values:
        times = seconds[value]
        lines.append(
            f"| {value} | {1000 * statistics.median(times):.1f} | {_median_ratio(reference, times):.2f} "
            f"| {_median_ratio(first, times):.2f} |"
        )
    return "\n".join(lines)


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def _homes(dotted: str) -> tuple[list[tuple[ModuleType, str]], object]:
    """Where ``module.NAME`` is bound -- its module, and every bulkpool module that imported
    it by name (``from bulkpool.sizing import PROBE_CHUNKS``) -- and its shipped value."""
    path, _, name = dotted.rpartition(".")
    try:
        module = importlib.import_module(f"bulkpool.{path}")
    except ImportError:
        module = None
    value = getattr(module, name, None)
    if module is None or value is None or callable(value) or isinstance(value, ModuleType):
        raise SystemExit(f"bench.alternating: bulkpool.{dotted} is not a constant of bulkpool's")
    importlib.import_module("bulkpool.engine")  # and with it every module a run uses
    homes = [(other, name) for other in _bulkpool_modules() if getattr(other, name, None) is value]
    return homes, value


def _copies(value: object) -> list[str]:
    """The default arguments and dataclass defaults in bulkpool that hold ``value`` itself
    (not for ints and bools: Python shares the small ones, so an equal default is not a copy)."""
    if isinstance(value, int):
        return []
    found = []
    for module in _bulkpool_modules():
        for name, thing in vars(module).items():
            where = f"{module.__name__}.{name}"
            if getattr(thing, "__module__", None) != module.__name__:
                continue  # imported from elsewhere: looked at in its own module
            if dataclasses.is_dataclass(thing):
                fields = dataclasses.fields(thing)
                found += [f"{where}.{field.name}" for field in fields if field.default is value]
            elif inspect.isfunction(thing):
                defaults = [*(thing.__defaults__ or ()), *(thing.__kwdefaults__ or {}).values()]
                found += [f"{where}()'s default"] if any(default is value for default in defaults) else []
    return found


def _rebind(homes: list[tuple[ModuleType, str]], value: object) -> None:
    for module, name in homes:
        setattr(module, name, value)


def _bulkpool_modules() -> list[ModuleType]:
    return [module for key, module in list(sys.modules.items()) if key.split(".")[0] == "bulkpool"]


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _values(text: str) -> list[str]:
    values = text.split(",")
    try:
        [_number(value) for value in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"numbers separated by commas, not {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"each value once, not {text!r}")
    return values


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgres", "mysql"], default="sqlite")
    parser.add_argument("--url", help="instead of the matrix's database (its users are deleted)")
    parser.add_argument("--constant", required=True, help="module.NAME in bulkpool, e.g. sizing.BALANCE")
    parser.add_argument("--values", required=True, type=_values, help="0.1,0: the first against the rest")
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--list", action="store_true", help="the rows in a list, not a generator")
    parser.add_argument("--method", default="bulkpool_untuned", choices=sorted(method_names()))
    parser.add_argument("--reference", default="loop_atomic500", choices=sorted(method_names()))
    args = parser.parse_args(argv)
    if "." not in args.constant:
        parser.error(f"--constant: module.NAME, as sizing.BALANCE, not {args.constant!r}")
    return args


def method_names() -> Collection[str]:
    from bench.methods import METHODS

    return METHODS.keys()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
