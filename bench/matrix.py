"""The benchmark matrix: databases x workloads x methods x sizes, in one command, as JSON.

    python -m bench.matrix [--databases sqlite,postgres,mysql] [--sizes 1000,10000]
        [--workloads trivial,setup2ms,hash2ms,io5ms] [--big 100000] [--repeat 3] [--work-repeat N]
        [--methods loop,...] [--update-methods bulk_update,...] [--timeout 300] [--big-timeout 600]
        [--output bench/results/NAME.json]

The plan, per database (``plan()``), the databases taking turns cell by cell:

- a **create cell** for each size and workload, with every method of ``CREATE_METHODS``.
  A workload with per-item work runs at most ``--work-items`` items (default 1,000): at
  2-5 ms an item, 10,000 items would take 20-50 s for each serial method and repeat;
  ``--work-repeat`` can run these cells fewer times than ``--repeat``.
  The trivial workload also runs ``FAST_METHODS``, the fast path against its floor;
- an **update cell** at the largest size, trivial workload, ``UPDATE_METHODS``;
- a **big cell** for each ``--big`` size: trivial, ``BIG_METHODS`` only, run once.

Each method runs in a fresh ``python -m bench.child`` process (``bench/run.py`` starts
them), the methods of a cell taking turns ``--repeat`` times, on an emptied ``auth_user``.
A method that writes the wrong number of rows, raises, or whose Report lists failures is
``"failed"``; one that runs past ``--timeout`` is killed with its workers, ``"timeout"``.
Neither gets a rate. The JSON is rewritten after every cell, so an interrupted run keeps
what it measured. ``python -m bench.charts`` draws it; ``python -m bench.ratios`` tabulates it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.run import ROOT, WORKLOADS, child_env, commit, cpu_model, run_child

URLS = {
    "postgres": "postgres://postgres@127.0.0.1:5432/bench_matrix",
    "mysql": "mysql://root@127.0.0.1:3306/bench_matrix",
}
PREPARE_TIMEOUT = 300  # seconds to migrate and calibrate, whatever --timeout says
HAND_WRITTEN = [
    "loop",
    "loop_atomic500",
    "ppe_script",
    "ppe_script_cpus",
    "pool_atomic500",
    "thread_atomic100",
]
CREATE_METHODS = [*HAND_WRITTEN, "bulkpool_untuned", "bulkpool_fast", "bulk_create"]
FAST_METHODS = ["signalled_bulk_create", "bulkpool_fast_serial", "bulkpool_fast_process2"]
# Run only when named in --methods: bulkpool's thread backend sized as untuned is (issue 14's
# "threads when threads are faster": where do they beat untuned's processes?)
ASKED_METHODS = ["bulkpool_thread_auto"]
UPDATE_METHODS = ["update_loop_atomic500", "bulk_update", "bulkpool_update", "bulkpool_update_fast"]
# Finish 100,000 items in a minute or two each; the plain loop (~100 s on SQLite) and the
# per-item ProcessPoolExecutor (~2 KB a pending future, FINDINGS.md) are left out.
BIG_METHODS = ["loop_atomic500", "pool_atomic500", "bulkpool_untuned", "bulkpool_fast", "bulk_create"]
KINDS = {
    **dict.fromkeys([*HAND_WRITTEN, "update_loop_atomic500"], "hand-written"),
    **dict.fromkeys(["bulk_create", "bulk_update", "signalled_bulk_create"], "reference"),
}


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One square of the matrix: the methods that take turns on the same rows."""

    database: str
    operation: str  # "create" or "update"
    workload: str
    items: int
    methods: tuple[str, ...]
    repeat: int
    timeout: float  # seconds per method and repeat


def main() -> int:
    args = _parse()
    results = _header(args)
    with tempfile.TemporaryDirectory(prefix="bulkpool-matrix-") as tmp:
        envs = {database: child_env(_url(args, database, tmp)) for database in args.databases}
        for database, env in envs.items():
            results["databases"][database] = _prepare(env, args, results)
        # Databases take turns cell by cell, so a run cut short has the first cells of each.
        for cells in itertools.zip_longest(*(plan(args, database) for database in args.databases)):
            for cell in filter(None, cells):
                results["cells"].append(run_cell(cell, envs[cell.database]))
                _write(args.output, results)
    results["finished"] = _now()
    _write(args.output, results)
    print(f"bench.matrix: wrote {args.output}", file=sys.stderr)
    return 0 if all(_cell_ok(cell) for cell in results["cells"]) else 1


def plan(args: argparse.Namespace, database: str) -> list[Cell]:
    """Every cell of one database, the most wanted first: the trivial creates (largest
    first), the update, the workloads with work, then the big runs."""
    cell = functools.partial(Cell, database=database, operation="create", workload="trivial")
    every = {"repeat": args.repeat, "timeout": args.timeout}
    trivial = sorted(args.sizes, reverse=True) if "trivial" in args.workloads else []
    create = _chosen([*CREATE_METHODS, *FAST_METHODS, *ASKED_METHODS], args.methods)
    planned = [cell(items=size, methods=create, **every) for size in trivial]
    if args.update_methods and args.sizes:
        updates = tuple(args.update_methods)
        planned.append(cell(operation="update", items=max(args.sizes), methods=updates, **every))
    work = {"repeat": args.work_repeat or args.repeat, "timeout": args.timeout}
    with_work = [*CREATE_METHODS, *ASKED_METHODS]
    for workload in (name for name in args.workloads if name != "trivial"):
        for size in sorted({min(size, args.work_items) for size in args.sizes}):
            planned.append(
                cell(workload=workload, items=size, methods=_chosen(with_work, args.methods), **work)
            )
    big = {"repeat": 1, "timeout": args.big_timeout}
    planned += [cell(items=size, methods=_chosen(BIG_METHODS, args.methods), **big) for size in args.big]
    return [c for c in planned if c.methods]


def run_cell(cell: Cell, env: dict[str, str]) -> dict[str, Any]:
    """The methods of ``cell`` take turns ``cell.repeat`` times; the load is read around it."""
    _say(f"{cell.database} {cell.operation} {cell.workload} {cell.items:,} items x{cell.repeat}")
    result: dict[str, Any] = {**asdict(cell), "started": _now(), "load_before": _load()}
    result["pressure_before"] = pressure()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cell.methods}
    for _ in range(cell.repeat):
        for name in cell.methods:
            step = ["method", name, "--workload", cell.workload, "--items", str(cell.items)]
            run = run_child(env, step, cell.timeout)
            runs[name].append(run)
            _say(f"  {name:<24} {_summary(run, cell.items)}")
    result["load_after"] = _load()
    result["pressure_after"] = pressure()
    result["methods"] = {name: summarise(name, method_runs, cell.items) for name, method_runs in runs.items()}
    return result


def summarise(name: str, runs: list[dict[str, Any]], items: int) -> dict[str, Any]:
    """A method's status over its repeats, and a rate only if every repeat was right."""
    problems = sorted({problem for run in runs for problem in run.get("problems", [])})
    status = "ok"
    if any("skipped" in run for run in runs):
        status = "skipped"
    elif any(run.get("timed_out") for run in runs):
        status = "timeout"
    elif problems:
        status = "failed"
    seconds = [run["elapsed"] for run in runs if "elapsed" in run]
    median = statistics.median(seconds) if status == "ok" and seconds else None
    return {
        "kind": KINDS.get(name, "bulkpool"),
        "status": status,
        "problems": problems,
        "expected_rows": items,
        "rows": [run.get("rows") for run in runs],
        "seconds": seconds,
        "median_seconds": median,
        "items_per_s": items / median if median else None,
        "runs": runs,
    }


def machine() -> dict[str, Any]:
    """What the numbers ran on: the CPUs this process may really use, and the load."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "cgroup_cpu_max": _read("/sys/fs/cgroup/cpu.max"),
        "cpu_model": cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "load_at_start": _load(),
        "pressure_at_start": pressure(),
    }


def pressure() -> dict[str, float]:
    """Linux's pressure stall figures: the share of the last 60 s in which some task waited
    for a CPU or for the disk. Unlike the load average, they say what the waiting was for."""
    stalls = {}
    for resource in ("cpu", "io"):
        line = (_read(f"/proc/pressure/{resource}") or "").splitlines()[:1]
        fields = dict(part.split("=") for part in line[0].split()[1:]) if line else {}
        if "avg60" in fields:
            stalls[f"{resource}_some_avg60"] = float(fields["avg60"])
    return stalls


def _header(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "schema": 1,
        "command": ["python", "-m", "bench.matrix", *sys.argv[1:]],
        "started": _now(),
        "commit": commit(),
        "python": platform.python_version(),
        "machine": machine(),
        "timeout_seconds": args.timeout,
        "work_items": args.work_items,
        "databases": {},
        "cells": [],
    }


def _prepare(env: dict[str, str], args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Migrate and read the versions; calibrate the per-item work once, for every database."""
    prepared = run_child(env, ["prepare"], PREPARE_TIMEOUT)
    if "problems" in prepared:
        sys.exit(f"bench.matrix: preparing {env['DATABASE_URL']} failed: {prepared['problems']}")
    calibration = results.setdefault(
        "calibration", {k: v for k, v in prepared.items() if k.startswith("BENCH_")}
    )
    env.update({k: str(v) for k, v in calibration.items()})
    results.setdefault("django", prepared["django"])
    results.setdefault("bulkpool", prepared["bulkpool"])
    results.setdefault("bulkpool_defaults", prepared["bulkpool_defaults"])
    return {"server": prepared["database"], "driver": prepared["driver"], "url": env["DATABASE_URL"]}


def _url(args: argparse.Namespace, database: str, tmp: str) -> str:
    if database == "sqlite":
        return f"sqlite:///{tmp}/bench.sqlite3"
    return args.postgres_url if database == "postgres" else args.mysql_url


def _cell_ok(cell: dict[str, Any]) -> bool:
    return all(method["status"] in ("ok", "skipped") for method in cell["methods"].values())


def _summary(run: dict[str, Any], items: int) -> str:
    rate = f"{items / run['elapsed']:>9,.0f} items/s" if run.get("elapsed") else ""
    return f"{rate} {'; '.join(run.get('problems', [])) or 'ok'}".strip()


def _chosen(methods: list[str], only: list[str] | None) -> tuple[str, ...]:
    if only is None:
        return tuple(name for name in methods if name not in ASKED_METHODS)
    return tuple(name for name in methods if name in only)


def _load() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _names(known: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = set(names) - set(known)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(sorted(unknown))}")
        return names

    return parse


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",") if size.strip() and int(size) > 0]


def _parse() -> argparse.Namespace:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    parser = argparse.ArgumentParser(prog="python -m bench.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=_names(["sqlite", "postgres", "mysql"]), default="sqlite")
    parser.add_argument("--postgres-url", default=URLS["postgres"])
    parser.add_argument("--mysql-url", default=URLS["mysql"], help="MySQL or MariaDB")
    parser.add_argument("--sizes", type=_sizes, default="1000,10000", help="items per create cell")
    parser.add_argument("--workloads", type=_names(WORKLOADS), default=",".join(WORKLOADS))
    parser.add_argument("--work-items", type=int, default=1000, help="most items for a workload with work")
    parser.add_argument("--big", type=_sizes, default="100000", help="trivial-only sizes, BIG_METHODS, once")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work-repeat", type=int, help="repeats of the cells with work (default: --repeat)")
    all_create = [*CREATE_METHODS, *FAST_METHODS, *ASKED_METHODS]
    parser.add_argument(
        "--methods", type=_names(all_create), default=None, help="a subset of the create methods"
    )
    parser.add_argument("--update-methods", type=_names(UPDATE_METHODS), default=",".join(UPDATE_METHODS))
    parser.add_argument("--timeout", type=float, default=300, help="seconds per method and repeat")
    parser.add_argument("--big-timeout", type=float, default=600, help="the same in the --big cells")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / f"matrix-{stamp}.json")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main())
