"""Draw the matrix's JSON as PNG charts (needs matplotlib: ``pip install -e ".[bench]"``).

    python -m bench.charts bench/results/NAME.json --out docs/img/

Writes, for each database, ``matrix-<database>.png``: every method's items/s over the best
hand-written method's, per cell (log scale; 1 is the best hand-written method, the dashed
line the 0.95 target for untuned bulkpool); and ``fast-path.png``: the ``fast=True``
variants' time over ``bulk_create``'s, and the update methods' over ``bulk_update``'s.
A method that failed or timed out gets no bar, and its cell says so under the axis.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no display, no global figure state

from bench import ratios
from bench.matrix import CREATE_METHODS

WIDTH = 0.8  # of a group of bars
COLOURS = {  # one colour per method in every chart: greys and blues by hand, warm colours bulkpool's
    "loop": "#bbbbbb",
    "loop_atomic500": "#888888",
    "ppe_script": "#9ecae1",
    "ppe_script_cpus": "#6baed6",
    "pool_atomic500": "#3182bd",
    "thread_atomic100": "#08519c",
    "update_loop_atomic500": "#888888",
    "bulkpool_untuned": "#e6550d",
    "bulkpool_update": "#e6550d",
    "bulkpool_fast": "#a50f15",
    "bulkpool_update_fast": "#a50f15",
    "bulkpool_fast_serial": "#fd8d3c",
    "bulkpool_fast_process2": "#fdd0a2",
    "bulk_create": "#31a354",
    "bulk_update": "#31a354",
    "signalled_bulk_create": "#a1d99b",
}


def draw_all(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [draw_database(results, database, out) for database in results["databases"]]
    written.append(draw_fast_path(results, out))
    return written


def draw_database(results: dict[str, Any], database: str, out: Path) -> Path:
    """Grouped bars: per cell, each create method over the best hand-written one."""
    cells = list(ratios.create_cells(results, database))
    methods = [name for name in CREATE_METHODS if any(name in cell["methods"] for cell in cells)]
    figure = Figure(figsize=(max(10, 1.5 * len(cells)), 5))
    axes = figure.subplots()
    for index, name in enumerate(methods):
        values = [_over_best(cell, name) for cell in cells]
        _bars(axes, index, len(methods), values, name)
    axes.set_yscale("log")
    axes.axhline(1, color="black", linewidth=0.8)
    axes.axhline(0.95, color="black", linewidth=0.8, linestyle="--")
    _cell_axis(axes, cells, methods)
    axes.set_ylabel("items/s over the best hand-written method")
    axes.set_title(f"{ratios.database_label(results, database)}: {_subtitle(results)}")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(figure, out / f"matrix-{database}.png")


def draw_fast_path(results: dict[str, Any], out: Path) -> Path:
    """Two panels: create variants over ``bulk_create``, update variants over ``bulk_update``."""
    figure = Figure(figsize=(13, 5))
    create, update = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    created = [cell for cell in ratios.create_cells(results) if cell["workload"] == "trivial"]
    _time_panel(create, created, ratios.FAST_VARIANTS, "bulk_create", [(1.3, "1.3"), (0.8, "0.8")])
    updated = [cell for cell in results["cells"] if cell["operation"] == "update"]
    _time_panel(update, updated, ratios.UPDATE_VARIANTS, "bulk_update", [(2.0, "2")])
    figure.suptitle(f"time over the bulk method's (lower is faster): {_subtitle(results)}")
    return _save(figure, out / "fast-path.png")


def _time_panel(axes: Any, cells: list[Any], names: list[str], reference: str, lines: list) -> None:
    for index, name in enumerate(names):
        values = [ratios.time_ratio(cell, name, reference) for cell in cells]
        _bars(axes, index, len(names), values, name)
    for value, text in lines:
        axes.axhline(value, color="black", linewidth=0.8, linestyle="--")
        axes.annotate(f"target {text}", (axes.get_xlim()[0], value), fontsize="x-small", va="bottom")
    labels = [f"{cell['database']}\n{cell['items']:,}" for cell in cells]
    axes.set_xticks(range(len(cells)), labels, fontsize="small")
    axes.set_ylabel(f"time over `{reference}`")
    axes.legend(fontsize="x-small")


def _bars(axes: Any, index: int, count: int, values: list[float | None], name: str) -> None:
    offset = (index - (count - 1) / 2) * WIDTH / count
    positions = [x + offset for x, value in enumerate(values) if value]
    heights = [value for value in values if value]
    axes.bar(positions, heights, WIDTH / count, label=name, color=COLOURS.get(name))


def _over_best(cell: dict[str, Any], name: str) -> float | None:
    best = ratios.best_hand_written(cell)
    mine = ratios.rate(cell, name)
    return mine / best[1] if mine and best else None


def _cell_axis(axes: Any, cells: list[dict[str, Any]], methods: list[str]) -> None:
    labels = []
    for cell in cells:
        missing = [f"{name}: {ratios.status(cell, name)}" for name in methods if not ratios.rate(cell, name)]
        labels.append("\n".join([ratios.label(cell), *[m for m in missing if "not run" not in m]]))
    axes.set_xticks(range(len(cells)), labels, fontsize="x-small")


def _subtitle(results: dict[str, Any]) -> str:
    loads = [value for cell in results["cells"] for value in (cell["load_before"][0], cell["load_after"][0])]
    return f"commit {results['commit']}, load {min(loads):.1f}-{max(loads):.1f}"


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a JSON file written by python -m bench.matrix")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    for path in draw_all(ratios.load(args.results), args.out):
        print(path)


if __name__ == "__main__":
    main()
