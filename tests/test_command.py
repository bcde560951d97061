"""``manage.py bulkpool``: run / runs / show, their output and their exit status.

Tests that check rows call the command in-process (``call_command``), so that it uses the
test database. Tests of exit codes and messages as a user meets them run the command for
real in a subprocess; the subprocess sees the database named in settings, not the test
database, so those runs use functions that write nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from bulkpool.models import ChunkDelivery, Run, RunChunk, RunFailure
from tests.testapp.models import Marker

ROOT = Path(__file__).resolve().parent.parent
JOBS = "tests.command_jobs"


def marker_counts() -> Counter[str]:
    return Counter(Marker.objects.values_list("key", flat=True))


def call(*args: str) -> tuple[int, str, str]:
    """Run the command in-process: its exit status, stdout and stderr (a CommandError's message too)."""
    out, err = StringIO(), StringIO()
    code: Any = 0
    try:
        call_command("bulkpool", *args, stdout=out, stderr=err)
    except SystemExit as exit:
        code = exit.code
    except CommandError as error:
        code = error.returncode
        err.write(f"CommandError: {error}\n")
    return code, out.getvalue(), err.getvalue()


def manage(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``python -m django bulkpool ARGS`` for real: test settings, this session's DATABASE_URL."""
    return subprocess.run(
        [sys.executable, "-m", "django", "bulkpool", *args, "--settings=tests.settings", "--skip-checks"],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=timeout,
    )


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, items: list[Any]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def write_json(path: Path, items: list[Any]) -> Path:
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    return path


WRITERS = {"csv": write_csv, "jsonl": write_jsonl, "json": write_json}
ROWS = [{"key": f"k{i}"} for i in range(45)]


# -- run: rows written (in-process, on the test database) ----------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("format", ["csv", "jsonl", "json"])
def test_every_row_of_each_format_runs_once(tmp_path, format):
    """CSV, JSON Lines and JSON array inputs each run every row exactly once; exit status 0."""
    path = WRITERS[format](tmp_path / f"rows.{format}", ROWS)
    code, out, _ = call(
        "run",
        f"{JOBS}.write_row",
        "--input",
        str(path),
        "--backend",
        "thread",
        "--workers",
        "2",
        "--chunk-size",
        "10",
    )
    assert code == 0
    assert "45 items: 45 ok, 0 failed" in out
    assert marker_counts() == Counter({row["key"]: 1 for row in ROWS})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("sizes", [("auto", "auto"), ("auto", "7"), ("2", "auto")])
def test_workers_and_chunk_size_take_auto_or_a_number(tmp_path, sizes):
    """--workers / --chunk-size take "auto" (the default) or a number; the report says what
    auto chose."""
    workers, chunk_size = sizes
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--workers", workers, "--chunk-size", chunk_size
    )
    assert code == 0
    assert marker_counts() == Counter({row["key"]: 1 for row in ROWS})
    # 45 rows stay on the workers that measured them (one, or two on a server): they all
    # ran while measured, or SQLite's one writer, or too few are left for more to pay.
    assert ("Sizing: workers=" in out) == (workers == "auto")
    assert ("Sizing: chunk_size=auto: chunks of " in out) == (chunk_size == "auto")


@pytest.mark.django_db(transaction=True)
def test_process_backend_runs_every_row(tmp_path):
    """The default process backend's workers, started by the command, write to the test database."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, _, _ = call("run", f"{JOBS}.write_row", "--input", str(path), "--workers", "2")
    assert code == 0
    assert marker_counts() == Counter({row["key"]: 1 for row in ROWS})


@pytest.mark.django_db(transaction=True)
def test_stdin_input_runs_every_row(monkeypatch):
    """--input - reads standard input in the format given."""
    data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, _, _ = call("run", f"{JOBS}.write_row", "--input", "-", "--format", "jsonl", "--backend", "serial")
    assert code == 0
    assert marker_counts() == Counter({row["key"]: 1 for row in ROWS})


@pytest.mark.django_db(transaction=True)
def test_some_failures_exit_1_with_the_report(tmp_path):
    """Failed items give exit status 1 and a report naming each failure; the others are written."""
    rows = [{"key": f"k{i}", "bad": "yes" if i % 10 == 3 else ""} for i in range(30)]
    path = write_csv(tmp_path / "rows.csv", rows)
    code, out, _ = call("run", f"{JOBS}.write_row_unless_bad", "--input", str(path), "--backend", "thread")
    assert code == 1
    assert "30 items: 27 ok, 3 failed" in out
    assert "line 5 (item 3) ({'key': 'k3', 'bad': 'yes'}): ValueError: row k3 is marked bad" in out
    assert set(marker_counts()) == {row["key"] for row in rows if not row["bad"]}


@pytest.mark.django_db(transaction=True)
def test_rejects_file_fed_back_retries_only_the_failures(tmp_path):
    """The rejects of one run, given back as --input, run just the items that failed."""
    rows = [{"key": f"k{i}", "bad": i in (4, 17)} for i in range(20)]
    rejects = tmp_path / "rejects.jsonl"
    code, out, _ = call(
        "run",
        f"{JOBS}.write_row_unless_bad",
        "--input",
        str(write_jsonl(tmp_path / "rows.jsonl", rows)),
        "--backend",
        "thread",
        "--rejects",
        str(rejects),
    )
    assert code == 1
    assert f"The failed items are in {rejects}" in out
    code, out, _ = call("run", f"{JOBS}.write_row", "--input", str(rejects), "--backend", "thread")
    assert code == 0
    assert "2 items: 2 ok, 0 failed" in out
    assert marker_counts() == Counter({f"k{i}": 1 for i in range(20)})


@pytest.mark.django_db(transaction=True)
def test_max_failures_stops_with_exit_1(tmp_path):
    """--max-failures stops the run; the report says so and the exit status is 1."""
    rows = [{"key": f"k{i}", "bad": True} for i in range(50)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    code, out, _ = call(
        "run",
        f"{JOBS}.write_row_unless_bad",
        "--input",
        str(path),
        "--backend",
        "serial",
        "--chunk-size",
        "5",
        "--max-failures",
        "5",
    )
    assert code == 1
    assert "Stopped early: 5 items failed (max_failures=5)" in out
    assert Marker.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_on_error_raise_stops_with_exit_1(tmp_path):
    """--on-error raise stops at the first failure, prints the report, exit status 1."""
    rows = [{"key": f"k{i}", "bad": i == 2} for i in range(50)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    code, out, _ = call(
        "run",
        f"{JOBS}.write_row_unless_bad",
        "--input",
        str(path),
        "--backend",
        "serial",
        "--chunk-size",
        "5",
        "--on-error",
        "raise",
    )
    assert code == 1
    assert "Stopped early: an item failed (on_error='raise')" in out
    assert Marker.objects.count() == 4  # the failing item's chunk-mates


@pytest.mark.django_db(transaction=True)
def test_dry_run_writes_nothing(tmp_path):
    """--dry-run runs every item, reports it, and writes nothing."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, out, _ = call("run", f"{JOBS}.write_row", "--input", str(path), "--backend", "thread", "--dry-run")
    assert code == 0
    assert "45 ok" in out and "Dry run: every transaction was rolled back" in out
    assert Marker.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_setup_gives_each_worker_its_state(tmp_path):
    """--setup names a function whose return value reaches FUNC as its state."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:5])
    code, _, _ = call(
        "run",
        f"{JOBS}.write_row_with_state",
        "--input",
        str(path),
        "--backend",
        "thread",
        "--setup",
        f"{JOBS}.setup_state",
    )
    assert code == 0
    assert set(marker_counts()) == {f"ready:k{i}" for i in range(5)}


@pytest.mark.django_db(transaction=True)
def test_prepare_names_a_function_whose_value_reaches_func(tmp_path):
    """--prepare names a function run on each item before FUNC; FUNC gets what it returned."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:5])
    code, _, _ = call(
        "run",
        f"{JOBS}.write_row",
        "--input",
        str(path),
        "--backend",
        "thread",
        "--prepare",
        f"{JOBS}.prepare_row",
    )
    assert code == 0
    assert set(marker_counts()) == {f"prepared:k{i}" for i in range(5)}


@pytest.mark.django_db(transaction=True)
def test_verbosity_2_sets_the_bulkpool_logger_to_debug(tmp_path):
    """-v 2 (after the subcommand too) puts the "bulkpool" logger at DEBUG for the run, then restores it."""
    path = write_jsonl(tmp_path / "rows.jsonl", [1])
    level = logging.getLogger("bulkpool").level
    call("run", f"{JOBS}.record_debug_logging", "--input", str(path), "--backend", "serial")
    call("run", f"{JOBS}.record_debug_logging", "--input", str(path), "--backend", "serial", "-v", "2")
    assert marker_counts() == Counter({"debug:False": 1, "debug:True": 1})
    assert logging.getLogger("bulkpool").level == level


@pytest.mark.django_db(transaction=True)
def test_bad_line_mid_run_stops_cleanly_and_resumes(tmp_path):
    """A bad line stops the run after the items before it ran (exit 2); fixed, the same run_id resumes."""
    lines = [json.dumps({"key": f"k{i}"}) for i in range(31)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([*lines[:25], "{oops", *lines[26:]]) + "\n")
    args = [
        "run",
        f"{JOBS}.write_row",
        "--input",
        str(path),
        "--backend",
        "thread",
        "--chunk-size",
        "10",
        "--run-id",
        "import",
    ]
    code, out, err = call(*args)
    assert code == 2
    assert f"{path}: line 26: not valid JSON" in err
    assert "after the 25 items before it" in err
    assert "Stopped early: bad input at line 26" in out
    assert marker_counts() == Counter({f"k{i}": 1 for i in range(25)})
    assert Run.objects.get(run_id="import").status == Run.Status.STOPPED

    path.write_text("\n".join(lines) + "\n")
    code, out, _ = call(*args)
    assert code == 0
    assert "25 skipped" in out
    assert marker_counts() == Counter({f"k{i}": 1 for i in range(31)})
    assert Run.objects.get(run_id="import").status == Run.Status.FINISHED


@pytest.mark.django_db(transaction=True)
def test_rejects_must_not_be_the_input(tmp_path):
    """--rejects naming the --input file is refused: the run would truncate what it reads."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, _, err = call("run", f"{JOBS}.write_row", "--input", str(path), "--rejects", str(path))
    assert code == 2
    assert "is the --input file" in err
    assert len(path.read_text().splitlines()) == len(ROWS)


@pytest.mark.django_db(transaction=True)
def test_configuration_error_is_a_usage_error(tmp_path):
    """An option combination the library refuses (--dry-run with --run-id) exits 2 with its message."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, _, err = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial", "--run-id", "x", "--dry-run"
    )
    assert code == 2
    assert "nothing to journal" in err


@pytest.mark.django_db(transaction=True)
def test_interrupt_exits_130_with_one_report_and_the_command_that_resumes(tmp_path):
    """Ctrl-C: the chunk in hand commits, exit 130, the report once, and one resume hint:
    the same command with --run-id, without --restart."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"key": f"k{i}"} for i in range(30)])
    code, out, err = call(
        "run",
        f"{JOBS}.press_ctrl_c_at_first_item",
        "--input",
        str(path),
        "--backend",
        "serial",
        "--chunk-size",
        "10",
        "--run-id",
        "nightly",
        "--restart",
        "--no-progress",
    )
    assert code == 130
    assert marker_counts() == Counter({f"k{i}": 1 for i in range(10)})  # the chunk in hand committed
    assert err.count("bulkpool: 10 items: 10 ok, 0 failed") == 1  # a file's length is not known
    assert err.count("To resume") == 1
    assert err.endswith(
        "To resume, run:\n  python manage.py bulkpool run tests.command_jobs.press_ctrl_c_at_first_item "
        f"--input {path} --backend serial --chunk-size 10 --no-progress --run-id nightly\n"
    )
    assert out == ""
    assert Run.objects.get(run_id="nightly").status == Run.Status.INTERRUPTED


# -- runs and show -------------------------------------------------------------------------


def journal_rows() -> Run:
    """Two runs written directly: an older finished one, and a newer interrupted one with failures."""
    now = timezone.now()
    Run.objects.create(
        run_id="old-import",
        func="myapp.jobs.old",
        chunk_size=100,
        status=Run.Status.FINISHED,
        total=300,
        ok=300,
        started_at=now - timedelta(days=1),
        finished_at=now - timedelta(hours=23),
    )
    run = Run.objects.create(
        run_id="users-2024",
        func="myapp.jobs.import_user",
        chunk_size=10,
        status=Run.Status.INTERRUPTED,
        total=40,
        ok=27,
        failed=3,
        skipped=10,
        attempts=2,
        started_at=now,
    )
    for start in (0, 10, 20):
        chunk = RunChunk.objects.create(run=run, start=start, size=10, digest="x" * 64, ok=9, failed=1)
        RunFailure.objects.create(
            chunk=chunk,
            index=start + 4,
            item=json.dumps({"email": f"bad{start}"}),
            exc_type="django.core.exceptions.ValidationError",
            message=f"bad email {start}",
        )
    return run


@pytest.mark.django_db(transaction=True)
def test_runs_lists_journaled_runs_newest_first():
    """`runs` shows run id, status, totals across attempts, the last attempt, start and function,
    newest first."""
    journal_rows()
    code, out, _ = call("runs")
    assert code == 0
    header, newer, older = out.splitlines()
    assert header.split() == [
        *("RUN", "ID", "STATUS", "DONE", "OK", "FAILED", "LAST", "ATTEMPT", "STARTED", "FUNCTION")
    ]
    assert newer.split()[:5] == ["users-2024", "interrupted", "30", "27", "3"]  # its 3 chunks
    assert "#2: 27 ok, 3 failed, 10 skipped" in newer
    assert newer.endswith("myapp.jobs.import_user")
    assert older.split()[:5] == ["old-import", "finished", "0", "0", "0"]  # no chunk recorded
    assert "#1: 300 ok, 0 failed, 0 skipped" in older


@pytest.mark.django_db(transaction=True)
def test_runs_unfinished_leaves_out_finished_runs():
    """`runs --unfinished` lists only runs that did not finish."""
    journal_rows()
    _, out, _ = call("runs", "--unfinished")
    assert "users-2024" in out and "old-import" not in out


@pytest.mark.django_db(transaction=True)
def test_runs_says_when_there_are_none():
    """An empty journal says so."""
    assert call("runs") == (0, "No journaled runs.\n", "")
    assert call("runs", "--unfinished") == (0, "No unfinished runs.\n", "")


@pytest.mark.django_db(transaction=True)
def test_show_gives_counts_chunks_and_failures():
    """`show RUN_ID` gives the run's counts, chunks done, and each failure with its item."""
    journal_rows()
    code, out, _ = call("show", "users-2024")
    assert code == 0
    assert out.startswith("Run users-2024: interrupted\n")
    assert "last attempt: 40 items: 27 ok, 3 failed, 10 skipped" in out
    assert "chunks done:  3 chunks of 10 items (30 items in all)" in out
    assert "resume:       Run the same call again with run_id='users-2024'" in out
    assert "Failures (3):" in out
    assert "item 14: django.core.exceptions.ValidationError: bad email 10" in out
    assert '{"email": "bad10"}' in out


@pytest.mark.django_db(transaction=True)
def test_show_gives_the_sizes_chunks_held_counts_with_commas_and_no_resume_once_finished():
    """A run resumed with another chunk size: `show` gives the sizes its chunks held (not the
    size it started with), every count as 1,234, and no resume line once it finished."""
    run = Run.objects.create(
        run_id="big",
        func="myapp.jobs.f",
        chunk_size=1000,
        status=Run.Status.FINISHED,
        total=123456,
        ok=123000,
        failed=456,
        attempts=2,
        command="To resume, run:\n  python manage.py bulkpool run myapp.jobs.f --input a.csv --run-id big",
    )
    RunChunk.objects.create(run=run, start=0, size=10, digest="x" * 64, ok=10)
    RunChunk.objects.create(run=run, start=10, size=1551, digest="x" * 64, ok=1551)
    code, out, _ = call("show", "big")
    assert code == 0
    assert "chunks done:  2 chunks of 10-1,551 items (1,561 items in all)" in out
    assert "last attempt: 123,456 items: 123,000 ok, 456 failed, 0 skipped" in out
    assert "resume" not in out.lower()
    assert "1000" not in out and "123456" not in out
    Run.objects.filter(pk=run.pk).update(status=Run.Status.INTERRUPTED)
    _, out, _ = call("show", "big")
    assert "resume:       python manage.py bulkpool run myapp.jobs.f --input a.csv --run-id big" in out
    assert "To resume, run:" not in out


@pytest.mark.django_db(transaction=True)
def test_show_limits_the_failures_listed():
    """`show --limit N` lists N failures and says how many more there are."""
    journal_rows()
    _, out, _ = call("show", "users-2024", "--limit", "1")
    assert "item 4:" in out and "item 14:" not in out
    assert "... and 2 more (--limit 0 shows all)" in out


@pytest.mark.django_db(transaction=True)
def test_show_unknown_run_is_a_usage_error():
    """An unknown run id exits 2 and points at `bulkpool runs`."""
    code, _, err = call("show", "nope")
    assert code == 2
    assert err == (
        "CommandError: No journaled run 'nope' in database 'default': "
        "`bulkpool runs` lists the runs there are.\n"
    )


@pytest.mark.django_db(transaction=True)
def test_show_a_run_the_command_journaled(tmp_path):
    """A run made with --run-id shows up in `runs`, and `show` lists its failure from the journal."""
    rows = [{"key": f"k{i}", "bad": i == 6} for i in range(12)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    code, _, _ = call(
        "run",
        f"{JOBS}.write_row_unless_bad",
        "--input",
        str(path),
        "--backend",
        "thread",
        "--chunk-size",
        "5",
        "--run-id",
        "real",
    )
    assert code == 1
    _, out, _ = call("runs")
    assert out.splitlines()[1].split()[:5] == ["real", "finished", "12", "11", "1"]
    _, out, _ = call("show", "real")
    assert "chunks done:  3 chunks of 2-5 items (12 items in all)" in out
    assert "item 6: ValueError: row k6 is marked bad" in out


# -- as a user meets it: a real process, its exit status and stderr --------------------------


def one_error_line(stderr: str) -> str:
    """The command's single error line; no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_stdin_run_exits_0():
    """A run fed on stdin exits 0 and prints the report."""
    result = manage(
        "run",
        "tests.jobs.identity",
        "--input",
        "-",
        "--format",
        "json",
        "--backend",
        "thread",
        stdin="[1, 2, 3, 4, 5]",
    )
    assert result.returncode == 0, result.stderr
    assert "bulkpool: 5 items: 5 ok, 0 failed" in result.stdout


def test_failed_items_exit_1():
    """A run where some items fail exits 1, with the failures in the report."""
    result = manage(
        "run",
        f"{JOBS}.fail_odd",
        "--input",
        "-",
        "--format",
        "jsonl",
        "--backend",
        "thread",
        stdin="2\n3\n4\n",
    )
    assert result.returncode == 1, result.stderr
    assert "3 items: 2 ok, 1 failed" in result.stdout
    assert "line 2 (item 1) (3): ValueError: 3 is odd" in result.stdout


@pytest.mark.parametrize(
    ("func", "message"),
    [
        (f"{JOBS}.no_such_function", 'Module "tests.command_jobs" does not define a "no_such_function"'),
        ("no_such_module.func", "No module named 'no_such_module'"),
        (f"{JOBS}.NOT_A_FUNCTION", "is not a function (its type is int)"),
    ],
)
def test_unknown_function_is_one_line_exit_2(func, message):
    """A function that cannot be imported or called: exit 2, one line, no traceback."""
    result = manage("run", func, "--input", "-", "--format", "jsonl", stdin="1\n")
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.startswith(f"CommandError: FUNC {func!r}")
    assert message in line


def test_missing_input_file_is_one_line_exit_2(tmp_path):
    """A missing --input file: exit 2, one line naming it."""
    missing = tmp_path / "missing.csv"
    result = manage("run", "tests.jobs.identity", "--input", str(missing))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        f"CommandError: {missing}: no such file (looked for {missing}). Fix: check the path."
    )


def test_bad_line_mid_run_is_one_line_exit_2():
    """An unparsable line mid-run: the report of what ran, then one line naming it; exit 2."""
    stdin = "".join(f"{i}\n" for i in range(30)) + "[1,\n" + "".join(f"{i}\n" for i in range(5))
    result = manage(
        "run",
        "tests.jobs.identity",
        "--input",
        "-",
        "--format",
        "jsonl",
        "--backend",
        "thread",
        "--chunk-size",
        "7",
        stdin=stdin,
    )
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.startswith("CommandError: -: line 31: not valid JSON")
    assert "after the 30 items before it" in line
    assert "30 items: 30 ok, 0 failed" in result.stdout


def test_failing_setup_is_one_line_exit_2():
    """A --setup that raises: exit 2 with its error on one line, and where to find the traceback."""
    result = manage(
        "run",
        "tests.jobs.write_marker_with_state",
        "--input",
        "-",
        "--format",
        "jsonl",
        "--backend",
        "thread",
        "--setup",
        "tests.jobs.failing_setup",
        stdin="1\n",
    )
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        "CommandError: A worker thread failed in setup: RuntimeError: setup could not reach the "
        "mail server (run with -v 2 to see the worker's traceback)"
    )


def test_stdin_without_format_is_exit_2():
    """Reading stdin needs --format."""
    result = manage("run", "tests.jobs.identity", "--input", "-", stdin="1\n")
    assert result.returncode == 2
    assert "needs its format" in one_error_line(result.stderr)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "argument --workers: '0' is not auto or a whole number, 1 or more"),
        (["--chunk-size", "ten"], "argument --chunk-size: 'ten' is not auto or a whole number, 1 or more"),
        (["--retries", "-1"], "argument --retries: '-1' is not a whole number, 0 or more"),
        (["--backend", "dask"], "argument --backend: invalid choice: 'dask'"),
        (["--atomic", "yes"], "argument --atomic: invalid choice: 'yes'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_flags_are_usage_errors(flags, message):
    """Bad flag values are refused by argparse with exit 2 and the usage."""
    result = manage("run", "tests.jobs.identity", "--input", "-", "--format", "jsonl", *flags, stdin="1\n")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_subcommand_is_a_usage_error():
    """A subcommand other than run, runs or show is refused with exit 2."""
    result = manage("rerun")
    assert result.returncode == 2
    assert "invalid choice: 'rerun'" in result.stderr


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_ctrl_c_exits_130_with_a_hint(tmp_path, backend):
    """SIGINT mid-run: the report, how to make the next run resumable, and exit status 130."""
    flag = tmp_path / "started"
    path = write_jsonl(tmp_path / "rows.jsonl", [{"flag": str(flag)}] * 2000)
    command = [
        sys.executable,
        "-m",
        "django",
        "bulkpool",
        "run",
        f"{JOBS}.nap_and_flag",
        "--input",
        str(path),
        "--backend",
        backend,
        "--workers",
        "2",
        "--chunk-size",
        "5",
        "--settings=tests.settings",
        "--skip-checks",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        deadline = time.monotonic() + 60
        while not flag.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
    assert process.returncode == 130, err
    assert "Stopped early: interrupted (Ctrl-C)" in err
    assert err.rstrip().endswith(
        "This run was not journaled, so it cannot be resumed. Next time pass --run-id NAME: "
        "an interrupted run then resumes by running the same command again."
    )
    assert "Traceback" not in err


# -- a command that helps ------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_on_bad_line_skip_fails_the_line_and_goes_on(tmp_path):
    """--on-bad-line skip: a malformed line fails in the report and the rejects file with its
    line number, and every other line runs."""
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"key": f"k{i}"}) for i in range(12)]
    lines[4] = "{oops"
    path.write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "thread", "--chunk-size", "5",
        "--on-bad-line", "skip", "--rejects", str(rejects),
    )  # fmt: skip
    assert code == 1
    assert "12 items: 11 ok, 1 failed" in out
    assert "line 5 (item 4) ('{oops'): bulkpool.InputError" in out
    assert marker_counts() == Counter({f"k{i}": 1 for i in range(12) if i != 4})
    (reject,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert (reject["index"], reject["line"], reject["item"]) == (4, 5, "{oops")


@pytest.mark.django_db(transaction=True)
def test_a_wrong_column_stops_early_saying_it_looks_like_a_mistake(tmp_path):
    """Every row failing alike (a KeyError for a misspelt column) stops after the first 100,
    instead of failing the whole file; --no-early-stop runs them all."""
    path = write_csv(tmp_path / "rows.csv", [{"name": f"n{i}"} for i in range(2000)])
    code, out, _ = call("run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial")
    assert code == 1
    assert "Stopped early: the first 100 items all failed with KeyError: 'key'" in out
    assert "items: 0 ok" in out and "2,000 items" not in out
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial", "--no-early-stop"
    )
    assert code == 1
    assert "2,000 items: 0 ok, 2,000 failed" in out


@pytest.mark.django_db(transaction=True)
def test_journal_commands_before_migrate_say_so_in_one_line():
    """`runs` and `show` without the journal tables: one line saying to migrate, no SQL dump."""
    from django.db import connection

    with connection.schema_editor() as editor:
        for model in (RunFailure, RunChunk, ChunkDelivery, Run):
            editor.delete_model(model)
    try:
        for args in (["runs"], ["show", "x"], ["rejects", "x"]):
            code, _, err = call(*args)
            assert code == 2
            (line,) = err.strip().splitlines()
            assert "migrate bulkpool" in line
    finally:
        with connection.schema_editor() as editor:
            for model in (Run, ChunkDelivery, RunChunk, RunFailure):
                editor.create_model(model)


def test_a_closed_output_pipe_ends_quietly():
    """The reader of stdout going away (`| head`) ends the command without a traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "django", "bulkpool", "run", "tests.command_jobs.fail_odd", "--input", "-",
         "--format", "jsonl", "--backend", "serial", "--settings=tests.settings", "--skip-checks"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    process.stdout.close()  # nobody will read the report
    _, err = process.communicate("".join(f"{i}\n" for i in range(50)).encode(), timeout=120)
    assert b"Traceback" not in err, err.decode()
    assert b"BrokenPipeError" not in err


# -- CSV files as users have them (issue 15) ----------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_unclosed_quote_skipped_loses_no_row(tmp_path):
    """--on-bad-line skip and a quote never closed: that line fails, every row after it runs."""
    path = tmp_path / "rows.csv"
    path.write_text('key\nok1\nbad"quote\n"unterminated,b\nok2\nok3\nok4\n')
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial", "--on-bad-line", "skip"
    )
    assert code == 1
    assert "6 items: 5 ok, 1 failed" in out
    assert "line 4 (item 2)" in out and "quote opened on line 4 is never closed" in out
    assert marker_counts() == Counter(["ok1", 'bad"quote', "ok2", "ok3", "ok4"])


@pytest.mark.django_db(transaction=True)
def test_a_bad_line_that_stops_the_run_names_the_flag_that_skips_it(tmp_path):
    """The one-line error for a bad CSV line says --on-bad-line skip would go on past it."""
    path = tmp_path / "rows.csv"
    path.write_text("key\nk1\nk2,extra\nk3\n")
    code, _, err = call("run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial")
    assert code == 2
    assert "line 3: 2 fields, but the header row has 1" in err
    assert "--on-bad-line skip" in err


@pytest.mark.django_db(transaction=True)
def test_a_semicolon_file_is_refused_then_read_with_delimiter(tmp_path):
    """A semicolon-delimited CSV: refused before any item with the flag to pass, then read with it."""
    path = tmp_path / "rows.csv"
    path.write_text("key;note\nk1;a\nk2;b\n")
    code, _, err = call("run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial")
    assert code == 2
    assert "looks like a semicolon-delimited file" in err and "--delimiter ';'" in err
    assert marker_counts() == Counter()
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial", "--delimiter", ";"
    )
    assert code == 0, out
    assert marker_counts() == Counter(["k1", "k2"])


@pytest.mark.django_db(transaction=True)
def test_tab_delimiter_is_spelt_tab(tmp_path):
    """--delimiter tab reads a tab-separated file (a shell cannot easily pass a tab)."""
    path = tmp_path / "rows.csv"
    path.write_text("key\tnote\nk1\ta\n")
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial", "--delimiter", "tab"
    )
    assert code == 0, out
    assert marker_counts() == Counter(["k1"])


@pytest.mark.django_db(transaction=True)
def test_a_long_field_names_field_size_limit_which_raises_it(tmp_path):
    """A 200 KB field: the error names --field-size-limit; with it raised, the row runs."""
    path = tmp_path / "rows.csv"
    path.write_text(f"key,note\nk1,{'x' * 200_000}\n")
    code, _, err = call("run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial")
    assert code == 2
    assert "--field-size-limit" in err
    code, out, _ = call(
        "run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial",
        "--field-size-limit", "300000",
    )  # fmt: skip
    assert code == 0, out
    assert marker_counts() == Counter(["k1"])


@pytest.mark.django_db(transaction=True)
def test_bare_carriage_returns_are_read(tmp_path):
    """A file with old Mac line endings (bare CR) runs every row."""
    path = tmp_path / "rows.csv"
    path.write_bytes(b"key\rk1\rk2\r")
    code, out, _ = call("run", f"{JOBS}.write_row", "--input", str(path), "--backend", "serial")
    assert code == 0, out
    assert marker_counts() == Counter(["k1", "k2"])


def test_the_resume_command_keeps_the_csv_options():
    """The command that resumes a run repeats --delimiter (a tab as "tab") and --field-size-limit."""
    from bulkpool.management.commands.bulkpool import _command_line

    options = {"func": "app.jobs.f", "input": "a.tsv", "format": "csv", "on_bad_line": "skip"}
    line = _command_line({**options, "delimiter": "\t", "field_size_limit": 500000, "run_id": "r"})
    assert "--on-bad-line skip --delimiter tab --field-size-limit 500000" in line
    assert "--delimiter" not in _command_line({**options, "delimiter": None, "field_size_limit": None})


@pytest.mark.django_db(transaction=True)
def test_a_function_whose_signature_does_not_fit_is_refused_before_any_row(tmp_path):
    """FUNC taking (item, state) without --setup: exit 2 with what is wrong and how to fix it;
    no row is written."""
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    code, _, err = call("run", f"{JOBS}.write_row_with_state", "--input", str(path), "--backend", "serial")
    assert code == 2
    assert "write_row_with_state(item, state) takes 2 arguments but bulkpool calls it with 1" in err
    assert "--setup" in err
    assert marker_counts() == Counter()


@pytest.mark.django_db(transaction=True)
def test_upsert_creates_and_updates_from_a_csv_and_says_how_many(tmp_path):
    """bulkpool upsert MODEL --key: existing rows updated, new ones created, counted in the report."""
    from tests.thirdparty.models import Customer

    Customer.objects.create(name="c0", email="old@example.com")
    path = write_csv(
        tmp_path / "customers.csv", [{"name": f"c{i}", "email": f"c{i}@example.com"} for i in range(5)]
    )
    code, out, err = call(
        "upsert", "thirdparty.Customer", "--key", "name", "--input", str(path), "--backend", "serial",
        "--run-id", "customers",
    )  # fmt: skip
    assert code == 0, err
    assert "5 ok (4 created, 1 updated)" in out
    assert sorted(Customer.objects.values_list("name", "email")) == [
        (f"c{i}", f"c{i}@example.com") for i in range(5)
    ]
    assert Customer.history.filter(history_type="~").count() == 1  # django-simple-history saw the update
    assert Run.objects.get(run_id="customers").func.startswith("upsert(thirdparty.Customer")


@pytest.mark.django_db(transaction=True)
def test_upsert_with_update_fields_and_a_wrong_key(tmp_path):
    """--update-fields limits what existing rows get; a key that is not unique is a usage error, one line."""
    from tests.thirdparty.models import Customer

    Customer.objects.create(name="c0", email="old@example.com")
    path = write_csv(tmp_path / "customers.csv", [{"name": "c0", "email": "new@example.com"}])
    code, _, err = call(
        "upsert", "thirdparty.Customer", "--key", "email", "--input", str(path), "--backend", "serial"
    )
    assert code == 2 and "no unique constraint of Customer covers exactly these fields" in err
    code, _, err = call(
        "upsert", "thirdparty.Customer", "--key", "name", "--update-fields", "name", "--input", str(path),
        "--backend", "serial",
    )  # fmt: skip
    assert code == 0, err
    assert Customer.objects.get().email == "old@example.com"


def test_an_interrupted_upsert_says_the_upsert_command_that_resumes_it():
    """The resume hint of an upsert is the upsert command line, with its key and fields."""
    from bulkpool.management.commands.bulkpool import _command_line

    options = {
        "subcommand": "upsert", "model": "shop.Customer", "key": ["email"], "update_fields": ["name"],
        "fast": True, "input": "c.csv", "format": None, "run_id": "x",
    }  # fmt: skip
    line = _command_line(options)
    assert line.startswith(
        "python manage.py bulkpool upsert shop.Customer --key email --update-fields name --fast --input c.csv"
    )
    assert "--run-id x" in line
