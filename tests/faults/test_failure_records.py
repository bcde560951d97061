"""A CSV import interrupted with Ctrl-C, then killed with SIGKILL, then resumed: the rejects
file, ``bulkpool rejects``, ``bulkpool show``, the journal and the report name every failed
item once, unreadable lines included, and every good row is written once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from django.db import connection

from bulkpool.models import RunFailure
from tests.faults.support import REPO, finish, kill, marker_counts, record, tally, wait_for_rows, wait_gone
from tests.faults.support import worker_processes as workers_of

ROWS = 300
BAD = set(range(0, ROWS, 37))  # rows marked bad: their function raises
UNREADABLE = {101, 202}  # lines that are not UTF-8: skipped with --on-bad-line skip
RUN_ID = "csv-ctrl-c-then-kill"


def write_input(path: Path) -> Path:
    lines = [b"key,bad"]
    for i in range(ROWS):
        if i in UNREADABLE:
            lines.append(b"k%d,\xff\xfe" % i)
        else:
            lines.append(b"k%d,%s" % (i, b"yes" if i in BAD else b"no"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "django", "bulkpool", *args, "--settings=tests.settings_subprocess"]


def start(rows: Path, rejects: Path) -> subprocess.Popen[str]:
    """The import, as a user runs it: its own process group, as a shell runs a job."""
    return subprocess.Popen(
        command(
            "run", "tests.command_jobs.write_row_unless_bad_slowly", "--input", str(rows),
            "--on-bad-line", "skip", "--rejects", str(rejects), "--run-id", RUN_ID,
            "--backend", "process", "--workers", "2", "--chunk-size", "10", "--skip-checks",
        ),
        cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "BULKPOOL_FAULTS_DB_NAME": str(connection.settings_dict["NAME"]),
    }


def indexes(jsonl: str) -> list[int]:
    return [json.loads(line)["index"] for line in jsonl.splitlines() if line.strip()]


@pytest.mark.django_db(transaction=True)
def test_ctrl_c_then_kill_then_resume_names_every_failure_once_everywhere(tmp_path):
    """Ctrl-C, resume, SIGKILL, resume: every record of the failures agrees, each failure once."""
    rows, rejects = write_input(tmp_path / "rows.csv"), tmp_path / "rejects.jsonl"
    expected = sorted(BAD | UNREADABLE)

    first = start(rows, rejects)
    wait_for_rows(first, 40)
    os.killpg(first.pid, signal.SIGINT)
    code, _, err = finish(first, within=60)
    assert code == 130, err

    second = start(rows, rejects)
    wait_for_rows(second, 150)
    workers = workers_of(psutil.Process(second.pid))
    kill(second)
    assert wait_gone(workers, within=10) == []

    third = start(rows, rejects)
    code, out, err = finish(third, within=120)
    assert code == 1, (out, err)  # done, with failures

    assert indexes(rejects.read_text()) == expected
    listed = subprocess.run(
        command("rejects", RUN_ID), cwd=REPO, env=environment(), capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert indexes(listed.stdout) == expected
    assert sorted(RunFailure.objects.values_list("index", flat=True)) == expected
    shown = subprocess.run(
        command("show", RUN_ID, "--limit", "0"), cwd=REPO, env=environment(), capture_output=True, text=True
    )
    assert f"Failures ({len(expected)}):" in shown.stdout, shown.stdout
    assert f"{len(expected)} failed (" in out, out  # the report counts them all, earlier ones too
    found = tally(f"k{i}" for i in range(ROWS) if i not in BAD | UNREADABLE)
    record("CSV import: Ctrl-C, then SIGKILL, then resumed", found)
    assert found.exactly_once, found
    assert len(marker_counts()) == ROWS - len(expected)
