"""The benchmark matrix runs end to end on a tiny size (nothing is timed or compared here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ITEMS = 30
METHODS = ["loop_atomic500", "bulkpool_untuned"]


@pytest.fixture(scope="module")
def matrix_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("matrix") / "tiny.json"
    command = [sys.executable, "-m", "bench.matrix", "--databases", "sqlite", "--sizes", str(ITEMS)]
    command += ["--workloads", "trivial", "--methods", ",".join(METHODS), "--update-methods", "bulk_update"]
    command += ["--big", "", "--repeat", "1", "--timeout", "60", "--output", str(output)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return output


@pytest.fixture(scope="module")
def results(matrix_json: Path) -> dict[str, Any]:
    return json.loads(matrix_json.read_text())


@pytest.mark.vendor("sqlite")  # the matrix brings its own SQLite database: run it once, not per server
def test_the_matrix_records_the_machine_and_the_versions(results):
    """The JSON says what ran where: machine, versions, commit, bulkpool's defaults."""
    assert {"cpu_count", "affinity", "cgroup_cpu_max", "cpu_model"} <= results["machine"].keys()
    assert {"python", "django", "bulkpool", "bulkpool_defaults", "commit", "finished"} <= results.keys()
    assert results["databases"]["sqlite"]["server"].startswith("SQLite")
    assert results["databases"]["sqlite"]["driver"]


@pytest.mark.vendor("sqlite")
def test_every_method_wrote_every_row_and_got_a_rate(results):
    """Each planned method ran, wrote the expected rows, and has a rate only because it did."""
    create, update = results["cells"]
    assert (create["operation"], create["items"], list(create["methods"])) == ("create", ITEMS, METHODS)
    assert (update["operation"], list(update["methods"])) == ("update", ["bulk_update"])
    for cell in results["cells"]:
        assert len(cell["load_before"]) == len(cell["load_after"]) == 3
        for method in cell["methods"].values():
            assert method["status"] == "ok", method["problems"]
            assert method["rows"] == [method["expected_rows"]] == [ITEMS]
            assert method["items_per_s"] > 0 and len(method["seconds"]) == 1


@pytest.mark.vendor("sqlite")
def test_a_method_that_writes_the_wrong_count_is_failed_without_a_rate():
    """summarise() marks a short count failed and gives it no rate, however fast it was."""
    from bench.matrix import summarise

    run = {"elapsed": 0.001, "rows": ITEMS - 1, "problems": [f"{ITEMS - 1} rows written for {ITEMS} items"]}
    summary = summarise("loop", [run], ITEMS)
    assert (summary["status"], summary["items_per_s"], summary["median_seconds"]) == ("failed", None, None)


@pytest.mark.vendor("sqlite")
@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_the_charts_are_drawn_from_the_json(matrix_json, tmp_path):
    """python -m bench.charts writes one PNG per database and the fast-path chart."""
    command = [sys.executable, "-m", "bench.charts", str(matrix_json), "--out", str(tmp_path)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert sorted(path.name for path in tmp_path.glob("*.png")) == ["fast-path.png", "matrix-sqlite.png"]


@pytest.mark.vendor("sqlite")
def test_the_ratios_tabulate_the_json_without_matplotlib(results):
    """bench.ratios (standard library only) renders every table, the targets' first."""
    from bench import ratios

    text = ratios.markdown(results)
    server = results["databases"]["sqlite"]["server"]
    assert text.index("### Issue 9's targets") < text.index("### Untuned bulkpool against")
    assert f"| {server} | trivial, 30 | `loop_atomic500` (" in text


@pytest.mark.vendor("sqlite")
def test_alternating_compares_the_values_of_a_constant_round_by_round():
    """bench.alternating: the reference and a row per value, each with its two ratios."""
    command = [sys.executable, "-m", "bench.alternating", "--constant", "sizing.SHARE_FLOOR"]
    command += ["--values", "0.1,0", "--rounds", "2", "--items", str(ITEMS)]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    rows = [line.split("|")[1:-1] for line in finished.stdout.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in rows] == ["sizing.SHARE_FLOOR", "(loop_atomic500)", "0.1", "0"]
    assert rows[2][3].strip() == "1.00"  # the first value against itself, every round
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows[2:]), finished.stdout


@pytest.mark.vendor("sqlite")
@pytest.mark.parametrize(
    ("constant", "said"),
    [
        ("sizing.NO_SUCH", "bulkpool.sizing.NO_SUCH is not a constant of bulkpool's"),
        ("sizing.shared_out", "bulkpool.sizing.shared_out is not a constant of bulkpool's"),
        ("BALANCE", "--constant: module.NAME, as sizing.BALANCE, not 'BALANCE'"),
    ],
)
def test_alternating_refuses_what_is_not_a_constant_of_bulkpool(constant, said):
    """A name bulkpool does not have, a function, or no module: said in one line, before any run."""
    command = [sys.executable, "-m", "bench.alternating", "--constant", constant, "--values", "1"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode != 0 and "Traceback" not in finished.stderr
    assert said in finished.stderr


@pytest.mark.vendor("sqlite")
def test_alternating_rebinds_a_constant_where_other_modules_imported_it_and_names_its_copies():
    """``from bulkpool.sizing import PROBE_CHUNKS`` binds the name in pooling too: both are
    rebound. TARGET_SECONDS was also copied into ChunkSizer's default: named, as rebinding
    cannot reach it."""
    from bench.alternating import _copies, _homes

    from bulkpool import sizing

    homes, shipped = _homes("sizing.PROBE_CHUNKS")
    assert {"bulkpool.sizing", "bulkpool.pooling"} <= {module.__name__ for module, _ in homes}
    assert shipped is sizing.PROBE_CHUNKS
    assert "bulkpool.sizing.ChunkSizer.target" in _copies(_homes("sizing.TARGET_SECONDS")[1])


@pytest.mark.vendor("sqlite")
def test_timeline_shows_the_pool_start_every_chunk_sent_and_back_and_its_stop():
    """bench.timeline: the last run's chunks add up to its items, each one back after it
    was sent, between the executor's start and its stop."""
    command = [sys.executable, "-m", "bench.timeline", "--items", str(ITEMS), "--rounds", "2", "--list"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    stamped = [line.split(None, 1) for line in finished.stdout.splitlines() if line.startswith(" ")]
    events = [what for _, what in stamped]
    assert [float(at) for at, _ in stamped] == sorted(float(at) for at, _ in stamped)
    assert events[0] == "called" and events[-1] == "returned", events
    start, stop = events.index("process executor: start ended"), events.index("process executor: stop began")
    sent = [i for i, what in enumerate(events) if what.endswith(" sent")]
    back = [i for i, what in enumerate(events) if what.endswith(" back (ChunkDone)")]
    sizes = [sum(int(events[i].split()[2]) for i in indexes) for indexes in (sent, back)]
    assert sizes == [ITEMS, ITEMS] and len(sent) == len(back) >= 2, events
    assert start < sent[0] and back[-1] < stop, events
    assert "bulkpool_fast: median" in finished.stdout and "x bulk_create" in finished.stdout
