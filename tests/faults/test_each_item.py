"""SQLite's parallel path for heavy items: faults mid-chunk, nothing lost, nothing twice.

When most of an item's time comes before its first write, bulkpool runs each item of a chunk
in a transaction of its own that takes SQLite's write lock at that write (sizing.py,
``each_item``), so that workers think in parallel. Every test here runs bulkpool untuned
(no ``workers``, no ``chunk_size``) and checks in the report's notes that the path was
taken, so a test fails if it is not. The faults: workers SIGKILLed from outside, an item
that kills every worker it runs on, Ctrl-C and SIGKILL of the caller, each followed by a
resume where the run has a ``run_id``. No "database is locked" may reach the user.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time

import psutil
import pytest

import bulkpool
from tests.faults import jobs
from tests.faults.support import (
    assert_nothing_lost_or_doubled,
    finish,
    injecting,
    marker_counts,
    record,
    start_driver,
    tally,
    wait_for_rows,
    worker_processes,
)

pytestmark = [pytest.mark.vendor("sqlite"), pytest.mark.django_db(transaction=True)]

ITEMS = 1000
THINK = 0.02  # seconds before each item's write: 20 s of it in all, a few on 8 workers
UP_FOR = 0.5  # seconds a worker has run before it is struck: the pool has grown, not growing
EACH_ITEM = "each item in a transaction of its own"
UNTUNED = ("--items", str(ITEMS), "--think", str(THINK), "--workers", "0", "--chunk-size", "0")


def took_the_each_item_path(notes: object) -> bool:
    return EACH_ITEM in str(notes)


def kill_a_running_worker() -> int:
    """SIGKILL one of this process's workers that has been up UP_FOR seconds, chosen at
    random. Not one still starting: a worker that dies before it is ready is a worker that
    could not start, and the pool goes on without growing (so the path under test would
    not be taken)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = [p for p in worker_processes() if _up_for(p) > UP_FOR]
        if len(running) >= 2:
            try:
                random.choice(running).send_signal(signal.SIGKILL)
                return 1
            except psutil.Error:  # it ended meanwhile: choose again
                continue
        time.sleep(0.02)
    return 0


def _up_for(process: psutil.Process) -> float:
    try:
        return time.time() - process.create_time()
    except psutil.Error:  # gone meanwhile
        return 0.0


@pytest.mark.parametrize("run_id", [None, "each-item-kills"], ids=["plain", "journaled"])
def test_workers_killed_mid_chunk(run_id):
    """Three workers SIGKILLed mid-item: the items they settled stay written once, the rest
    of their chunks runs on the replacements."""
    func = functools.partial(jobs.think_then_mark, THINK)
    # Not uses_db: the pool forks as it grows, and a worker forked while a thread of this
    # process holds SQLite's read lock inherits SQLite's record of that lock and can never
    # commit (see docs/guides/backends.md). Worker processes exist only while the run goes
    # on, so three kills are three kills mid-run.
    with injecting(kill_a_running_worker, times=3, interval=0.3, workers=2, uses_db=False) as injector:
        report = bulkpool.run(func, range(ITEMS), progress=False, run_id=run_id)
    mode = "journaled" if run_id else "plain"
    record(f"each_item: 3 workers SIGKILLed ({mode})", tally(range(ITEMS)), report)
    assert took_the_each_item_path(report.notes), report.notes
    assert injector.faults == 3
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)


@pytest.mark.parametrize("run_id", [None, "each-item-poison"], ids=["plain", "journaled"])
def test_item_that_kills_every_worker_fails_alone_and_resume_runs_past_it(run_id):
    """Under the default options, an item that SIGKILLs its worker fails alone, WorkerDied;
    every other item is written once, and a resume does not run it again."""
    # Without a journal this also shows that the worker's progress counts: the items of the
    # poison's chunk settled before it would otherwise be sent again and written twice.
    poison = 750
    func = functools.partial(jobs.think_then_mark_dying_at, poison, THINK)
    report = bulkpool.run(func, range(ITEMS), progress=False, run_id=run_id)
    assert took_the_each_item_path(report.notes), report.notes
    assert [(f.index, f.exc_type) for f in report.failures] == [(poison, "bulkpool.WorkerDied")]
    found = tally(i for i in range(ITEMS) if i != poison)
    record(f"each_item: an item that kills its worker ({'journaled' if run_id else 'plain'})", found, report)
    assert found.exactly_once, found
    if run_id is None:
        return
    again = bulkpool.run(func, range(ITEMS), progress=False, run_id=run_id)
    assert again.ok == 0, str(again)  # nothing ran again: the poison's failure is recorded
    assert [(f.index, f.exc_type) for f in again.failures] == [(poison, "bulkpool.WorkerDied")]
    assert tally(i for i in range(ITEMS) if i != poison) == found


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_caller_stopped_mid_run_then_resumed(how):
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGKILL of the caller
    mid-run; the same command run again finishes the job: every item written once."""
    run_id = f"each-item-{how}"
    driver = start_driver(*UNTUNED, "--run-id", run_id)
    wait_for_rows(driver, ITEMS // 5)
    workers = worker_processes(psutil.Process(driver.pid))
    if how == "ctrl-c":
        os.killpg(driver.pid, signal.SIGINT)
        code, _, err = finish(driver, within=60)
        assert code == 130, err
    else:
        os.killpg(driver.pid, signal.SIGKILL)  # caller and workers die at once, mid-item
        code, _, err = finish(driver, within=30)
        assert code == -signal.SIGKILL, err
    assert "database is locked" not in err, err
    assert "Traceback" not in err, err
    before = tally(range(ITEMS))
    assert 0 < before.written < ITEMS and before.duplicated == 0, before
    assert workers, "the run had grown its pool before it was stopped"

    code, out, err = finish(start_driver(*UNTUNED, "--run-id", run_id), within=120)
    assert code == 0, err
    assert took_the_each_item_path(out), out  # DRIVER NOTES: the resume took the path too
    assert "database is locked" not in out + err
    found = tally(range(ITEMS))
    record(f"each_item: {how} mid-run, then resumed", found)
    assert found.exactly_once, (found, out, err)
    assert len(marker_counts()) == ITEMS
    assert "failed=0" in out, out
