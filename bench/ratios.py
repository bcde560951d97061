"""The matrix's JSON as ratios: the tables of ``docs/benchmarks.md``, and where each target stands.

    python -m bench.ratios bench/results/NAME.json     # markdown on stdout

Only the standard library: ``bench.charts`` draws the same ratios with matplotlib.
Rates come from ``bench.matrix``: the median of a method's repeats, and none at all for a
method that failed or timed out in any repeat, so a wrong count is never a fast cell.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

WORKLOAD_LABELS = {
    "trivial": "trivial",
    "setup2ms": "2 ms CPU",
    "hash2ms": "2 ms hashing",
    "io5ms": "5 ms I/O",
}
FAST_VARIANTS = ["bulkpool_fast", "bulkpool_fast_serial", "bulkpool_fast_process2", "signalled_bulk_create"]
UPDATE_VARIANTS = ["bulkpool_update_fast", "bulkpool_update", "update_loop_atomic500"]
Cell = dict[str, Any]


def load(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def rate(cell: Cell, name: str) -> float | None:
    """Items/s of ``name`` in ``cell``: None if it did not run, failed or timed out."""
    method = cell["methods"].get(name)
    return method["items_per_s"] if method else None


def status(cell: Cell, name: str) -> str:
    method = cell["methods"].get(name)
    return method["status"] if method else "not run"


def best_hand_written(cell: Cell) -> tuple[str, float] | None:
    """The fastest hand-written method of the cell that wrote every row."""
    rates = [
        (name, method["items_per_s"])
        for name, method in cell["methods"].items()
        if method["kind"] == "hand-written" and method["items_per_s"]
    ]
    return max(rates, key=lambda pair: pair[1], default=None)


def time_ratio(cell: Cell, name: str, reference: str) -> float | None:
    """``name``'s time over ``reference``'s: under 1 is faster than the reference."""
    mine, theirs = rate(cell, name), rate(cell, reference)
    return theirs / mine if mine and theirs else None


def create_cells(results: dict[str, Any], database: str | None = None) -> Iterator[Cell]:
    for cell in results["cells"]:
        if cell["operation"] == "create" and database in (None, cell["database"]):
            yield cell


def label(cell: Cell) -> str:
    return f"{WORKLOAD_LABELS.get(cell['workload'], cell['workload'])}, {cell['items']:,}"


def database_label(results: dict[str, Any], database: str) -> str:
    return results["databases"][database]["server"]


def untuned_table(results: dict[str, Any]) -> list[str]:
    """Untuned bulkpool over the best hand-written method, per cell (target: >= 0.95)."""
    lines = [
        "| database | workload, items | best hand-written (items/s) | untuned bulkpool (items/s) "
        "| untuned / best | untuned / `loop` |",
        "|---|---|---|---:|---:|---:|",
    ]
    for cell in create_cells(results):
        best = best_hand_written(cell)
        untuned = rate(cell, "bulkpool_untuned")
        if "bulkpool_untuned" not in cell["methods"]:
            continue
        best_text = f"`{best[0]}` ({best[1]:,.0f})" if best else "none succeeded"
        lines.append(
            f"| {database_label(results, cell['database'])} | {label(cell)} | {best_text} "
            f"| {_rate_text(cell, 'bulkpool_untuned')} | {_ratio(untuned, best[1] if best else None)} "
            f"| {_ratio(untuned, rate(cell, 'loop'))} |"
        )
    return lines


def fast_table(results: dict[str, Any]) -> list[str]:
    """Time over ``bulk_create``'s, trivial cells (targets: serial <= 1.3, 2 processes <= 0.8)."""
    header = " | ".join(f"`{name}`" for name in FAST_VARIANTS)
    lines = [
        f"| database | items | `bulk_create` items/s | {header} |",
        "|---|---:|---:|" + "---:|" * len(FAST_VARIANTS),
    ]
    for cell in create_cells(results):
        if cell["workload"] != "trivial" or "bulk_create" not in cell["methods"]:
            continue
        ratios = [_time_text(cell, name, "bulk_create") for name in FAST_VARIANTS]
        lines.append(
            f"| {database_label(results, cell['database'])} | {cell['items']:,} "
            f"| {_rate_text(cell, 'bulk_create')} | {' | '.join(ratios)} |"
        )
    return lines


def update_table(results: dict[str, Any]) -> list[str]:
    """Time over ``bulk_update``'s (target for ``update(fast=True)``: <= 2)."""
    header = " | ".join(f"`{name}`" for name in UPDATE_VARIANTS)
    lines = [
        f"| database | items | `bulk_update` items/s | {header} |",
        "|---|---:|---:|" + "---:|" * len(UPDATE_VARIANTS),
    ]
    for cell in results["cells"]:
        if cell["operation"] != "update":
            continue
        ratios = [_time_text(cell, name, "bulk_update") for name in UPDATE_VARIANTS]
        lines.append(
            f"| {database_label(results, cell['database'])} | {cell['items']:,} "
            f"| {_rate_text(cell, 'bulk_update')} | {' | '.join(ratios)} |"
        )
    return lines


def ppe_table(results: dict[str, Any]) -> list[str]:
    """``fast=True`` (untuned) over the ProcessPoolExecutor script, items/s (target on PostgreSQL: >= 8)."""
    lines = [
        "| database | workload, items | `ppe_script` items/s | `bulkpool_fast` items/s | fast / script |"
    ]
    lines.append("|---|---|---:|---:|---:|")
    for cell in create_cells(results):
        if "ppe_script" not in cell["methods"] or "bulkpool_fast" not in cell["methods"]:
            continue
        lines.append(
            f"| {database_label(results, cell['database'])} | {label(cell)} "
            f"| {_rate_text(cell, 'ppe_script')} | {_rate_text(cell, 'bulkpool_fast')} "
            f"| {_ratio(rate(cell, 'bulkpool_fast'), rate(cell, 'ppe_script'))} |"
        )
    return lines


def targets_table(results: dict[str, Any]) -> list[str]:
    """Issue 9's targets against this run: the measured range and how many cells meet it."""
    create = list(create_cells(results))
    trivial = [cell for cell in create if cell["workload"] == "trivial"]
    servers = [cell for cell in trivial if cell["database"] != "sqlite"]
    updates = [cell for cell in results["cells"] if cell["operation"] == "update"]
    postgres = [cell for cell in trivial if cell["database"] == "postgres"]
    rows = [
        ("untuned bulkpool >= 0.95x the best hand-written method", _over_best(create), ">=", 0.95),
        ("untuned bulkpool >= 1x the plain loop", _untuned_over(create, "loop"), ">=", 1.0),
        (
            "`create(fast=True)`, serial: time <= 1.3x `bulk_create`'s",
            _times(trivial, "bulkpool_fast_serial", "bulk_create"),
            "<=",
            1.3,
        ),
        (
            "`create(fast=True)`, 2 processes, servers: time <= 0.8x `bulk_create`'s",
            _times(servers, "bulkpool_fast_process2", "bulk_create"),
            "<=",
            0.8,
        ),
        (
            "`update(fast=True)`: time <= 2x `bulk_update`'s",
            _times(updates, "bulkpool_update_fast", "bulk_update"),
            "<=",
            2.0,
        ),
        (
            "`fast=True` >= 8x `ppe_script`'s items/s, PostgreSQL, trivial",
            _untuned_over(postgres, "ppe_script", "bulkpool_fast"),
            ">=",
            8.0,
        ),
    ]
    lines = ["| target | cells measured | met in | measured |", "|---|---:|---:|---|"]
    for text, values, sense, bound in rows:
        known = [value for value in values if value is not None]
        met = sum(1 for value in known if (value >= bound if sense == ">=" else value <= bound))
        span = f"{min(known):.2f} to {max(known):.2f}" if known else "n/a"
        lines.append(f"| {text} | {len(values)} | {met} | {span}{_unknown(values)} |")
    return lines


def _over_best(cells: list[Cell]) -> list[float | None]:
    values = []
    for cell in cells:
        if "bulkpool_untuned" in cell["methods"]:
            best = best_hand_written(cell)
            values.append(_quotient(rate(cell, "bulkpool_untuned"), best[1] if best else None))
    return values


def _untuned_over(cells: list[Cell], other: str, mine: str = "bulkpool_untuned") -> list[float | None]:
    return [
        _quotient(rate(c, mine), rate(c, other))
        for c in cells
        if mine in c["methods"] and other in c["methods"]
    ]


def _times(cells: list[Cell], name: str, reference: str) -> list[float | None]:
    return [time_ratio(cell, name, reference) for cell in cells if name in cell["methods"]]


def _quotient(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine and theirs else None


def _unknown(values: list[float | None]) -> str:
    missing = sum(1 for value in values if value is None)
    return f" ({missing} without a ratio: a method failed or timed out)" if missing else ""


def context(results: dict[str, Any]) -> list[str]:
    """One paragraph: what ran, where, and how loaded the machine was."""
    loads = [value for cell in results["cells"] for value in (cell["load_before"][0], cell["load_after"][0])]
    machine = results["machine"]
    servers = ", ".join(f"{db['server']} ({db['driver']})" for db in results["databases"].values())
    return [
        f"Run of {results['started']} to {results.get('finished', 'unfinished')}, commit "
        f"{results['commit']}; {machine['cpu_count']} CPUs ({machine['cpu_model']}), affinity "
        f"{machine['affinity']}, cgroup cpu.max {machine['cgroup_cpu_max']}; Python {results['python']}, "
        f"Django {results['django']}, django-bulkpool {results['bulkpool']} with defaults "
        f"{_defaults(results)}; {servers}. 1-minute load average {min(loads):.2f} to {max(loads):.2f} "
        f"around the cells{_stalls(results)}."
    ]


def _stalls(results: dict[str, Any]) -> str:
    cells = results["cells"]
    cpu = [
        cell.get(key, {}).get("cpu_some_avg60")
        for cell in cells
        for key in ("pressure_before", "pressure_after")
    ]
    known = [value for value in cpu if value is not None]
    if not known:
        return ""
    return f"; some task waited for a CPU {min(known):.0f}-{max(known):.0f}% of the time (Linux PSI, 60 s)"


def markdown(results: dict[str, Any]) -> str:
    sections = [
        ("Context", context(results)),
        ("Issue 9's targets", targets_table(results)),
        ("Untuned bulkpool against the best hand-written method", untuned_table(results)),
        ("`fast=True` against `bulk_create` (time ratio)", fast_table(results)),
        ("`update(fast=True)` against `bulk_update` (time ratio)", update_table(results)),
        ("`fast=True` against the ProcessPoolExecutor script (items/s ratio)", ppe_table(results)),
    ]
    return "\n\n".join(f"### {title}\n\n" + "\n".join(lines) for title, lines in sections) + "\n"


def _defaults(results: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in results.get("bulkpool_defaults", {}).items())


def _rate_text(cell: Cell, name: str) -> str:
    value = rate(cell, name)
    return f"{value:,.0f}" if value else status(cell, name)


def _time_text(cell: Cell, name: str, reference: str) -> str:
    value = time_ratio(cell, name, reference)
    return f"{value:.2f}" if value else status(cell, name if rate(cell, reference) else reference)


def _ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}" if mine and theirs else "n/a"


if __name__ == "__main__":
    print(markdown(load(sys.argv[1])))
