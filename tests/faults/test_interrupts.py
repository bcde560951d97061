"""Point 5: Ctrl-C, SIGTERM and SIGKILL of the process that called bulkpool.run.

The run happens in ``driver.py``, a process of its own started in its own process group,
so that a signal can be sent the way a terminal sends Ctrl-C: to the whole foreground
group, workers included. The driver writes into this test's database (it is given its
name), so the test counts what it wrote: every row must belong to a chunk that committed
whole, no row may be there twice, and no worker process or connection may be left.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import time

import psutil
import pytest
from django.db import connection

import bulkpool
from tests.faults import jobs
from tests.faults.support import (
    Tally,
    finish,
    kill,
    marker_counts,
    record,
    settled_sessions,
    start_driver,
    steady_sessions,
    tally,
    wait_for_rows,
    wait_gone,
    worker_processes,
)

ITEMS = 400
CHUNK = 10
REPORT_LINE = re.compile(r"bulkpool: ([\d,]+) items: ([\d,]+) ok")
QUICK = ("--items", str(ITEMS), "--pause", "0.01", "--chunk-size", str(CHUNK))  # about 2 s of work
SLOW = ("--items", str(ITEMS), "--pause", "0.2", "--chunk-size", str(CHUNK))  # 2 s per chunk


def sessions_now() -> int | None:
    """Sessions on the test database (None on SQLite, which has no server to ask)."""
    return None if connection.vendor == "sqlite" else steady_sessions()


def whole_chunks_only() -> Tally:
    """Tally what was written, asserting that every row belongs to a chunk written whole, once."""
    written = {int(key) for key in marker_counts()}
    for start in range(0, ITEMS, CHUNK):
        chunk = set(range(start, start + CHUNK))
        assert chunk <= written or not chunk & written, f"chunk {start} is partly written"
    found = tally(written)
    assert (found.duplicated, found.unexpected) == (0, 0), found
    return found


def printed_ok(err: str) -> int:
    match = REPORT_LINE.search(err)
    assert match, err
    return int(match.group(2).replace(",", ""))


def assert_nothing_left(workers: list[psutil.Process], sessions: int | None) -> None:
    assert [p.pid for p in wait_gone(workers, within=5)] == []
    if sessions is not None:
        assert settled_sessions(sessions) == sessions


@pytest.mark.django_db(transaction=True)
def test_first_ctrl_c_finishes_chunks_in_flight_and_exits_130():
    """Ctrl-C: chunks in flight commit, the report and resume hint are printed, exit 130, nothing left."""
    sessions = sessions_now()
    driver = start_driver(*QUICK)
    wait_for_rows(driver, 3 * CHUNK)
    workers = worker_processes(psutil.Process(driver.pid))
    os.killpg(driver.pid, signal.SIGINT)  # as a terminal does: the whole foreground group
    code, _, err = finish(driver, within=60)
    assert "Traceback" not in err, err
    assert "DRIVER CHILDREN 0 " in err, err  # none left when run() raised
    found = whole_chunks_only()
    ok = printed_ok(err)
    record("Ctrl-C once (driver process)", Tally(ok, found.written, found.duplicated, found.unexpected))
    assert code == 130, err
    assert "DRIVER INTERRUPTED" in err
    assert re.search(r"Interrupted \((Ctrl-C|SIGTERM)\): waiting for", err), err
    assert "pass run_id=... to make a run resumable" in err
    assert 0 < ok < ITEMS
    assert found.written == ok
    assert_nothing_left(workers, sessions)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_second_ctrl_c_abandons_chunks_in_flight_at_once():
    """A second Ctrl-C rolls the chunks in flight back and exits within seconds, leaving nothing."""
    sessions = sessions_now()
    driver = start_driver(*SLOW)
    wait_for_rows(driver, CHUNK)
    workers = worker_processes(psutil.Process(driver.pid))
    os.killpg(driver.pid, signal.SIGINT)
    time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGINT)
    code, _, err = finish(driver, within=10)  # the chunks in flight alone would take 2-4 s more
    assert "Traceback" not in err, err
    assert "DRIVER CHILDREN 0 " in err, err  # none left when run() raised
    found = whole_chunks_only()
    ok = printed_ok(err)
    record("Ctrl-C twice (driver process)", Tally(ok, found.written, found.duplicated, found.unexpected))
    assert code == 130, err
    assert "Abandoned the chunks in flight" in err
    # A chunk whose COMMIT was under way when its worker was killed may still land.
    assert ok <= found.written <= ok + 2 * CHUNK
    assert_nothing_left(workers, sessions)


@pytest.mark.django_db(transaction=True)
def test_sigterm_behaves_like_the_first_ctrl_c():
    """SIGTERM to the caller: chunks in flight commit, the report is printed, exit 130, nothing left."""
    sessions = sessions_now()
    driver = start_driver(*QUICK)
    wait_for_rows(driver, 3 * CHUNK)
    workers = worker_processes(psutil.Process(driver.pid))
    driver.send_signal(signal.SIGTERM)
    code, _, err = finish(driver, within=60)
    assert "Traceback" not in err, err
    assert "DRIVER CHILDREN 0 " in err, err  # none left when run() raised
    found = whole_chunks_only()
    ok = printed_ok(err)
    record("SIGTERM (driver process)", Tally(ok, found.written, found.duplicated, found.unexpected))
    assert code == 130, err
    assert re.search(r"Interrupted \((Ctrl-C|SIGTERM)\): waiting for", err), err
    assert found.written == ok
    assert_nothing_left(workers, sessions)


@pytest.mark.django_db(transaction=True)
def test_sigterm_to_the_whole_process_group():
    """SIGTERM to the caller and its workers at once (as systemd stops a service): exit 130, nothing left."""
    sessions = sessions_now()
    driver = start_driver(*QUICK)
    wait_for_rows(driver, 3 * CHUNK)
    workers = worker_processes(psutil.Process(driver.pid))
    os.killpg(driver.pid, signal.SIGTERM)
    code, _, err = finish(driver, within=60)
    assert "Traceback" not in err, err
    assert "DRIVER CHILDREN 0 " in err, err  # none left when run() raised
    found = whole_chunks_only()
    ok = printed_ok(err)
    record("SIGTERM to the process group", Tally(ok, found.written, found.duplicated, found.unexpected))
    assert code == 130, err
    assert found.written == ok
    assert_nothing_left(workers, sessions)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_sigterm_to_every_process_lets_workers_commit_the_chunks_in_hand(start_method):
    """SIGTERM to the caller and all its processes, as systemd stops a service (its whole
    cgroup): workers finish the chunk in hand and report it, rather than die and roll it back."""
    driver = start_driver(*SLOW, "--start-method", start_method)
    wait_for_rows(driver, CHUNK)
    time.sleep(0.5)  # both workers are inside their next 2-second chunk
    rows_before = len(marker_counts())
    tree = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
    for process in tree:
        process.send_signal(signal.SIGTERM)
    code, _, err = finish(driver, within=30)
    assert "Traceback" not in err, err
    found = whole_chunks_only()
    ok = printed_ok(err)
    record(
        f"SIGTERM to every process mid-chunk ({start_method})",
        Tally(ok, found.written, found.duplicated, found.unexpected),
    )
    assert code == 130, err
    assert found.written - rows_before >= 2 * CHUNK, (rows_before, found, err)
    assert found.written == ok
    assert [p.pid for p in wait_gone(tree[1:], within=5)] == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_ctrl_c_while_workers_start(start_method):
    """Ctrl-C while the workers run their setup: exit 130 at once, no traceback, no worker left."""
    sessions = sessions_now()
    driver = start_driver(*QUICK, "--start-method", start_method, "--setup-pause", "30")
    deadline = time.monotonic() + 30
    while len(workers := worker_processes(psutil.Process(driver.pid))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the workers are in their 30-second setup
    os.killpg(driver.pid, signal.SIGINT)
    code, _, err = finish(driver, within=10)
    assert code == 130, err
    assert "Traceback" not in err, err
    assert "DRIVER CHILDREN 0 " in err, err  # none left when run() raised
    assert marker_counts() == {}
    assert_nothing_left(workers, sessions)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_workers_of_a_killed_caller_exit_and_release_their_connections(start_method):
    """SIGKILL of the caller: its workers exit within seconds; their chunks roll back, connections close."""
    sessions = sessions_now()
    driver = start_driver(*SLOW, "--start-method", start_method)
    wait_for_rows(driver, CHUNK)
    workers = worker_processes(psutil.Process(driver.pid))
    assert len(workers) == 2
    kill(driver)
    left = wait_gone(workers, within=5)
    found = whole_chunks_only()
    record(f"caller SIGKILLed ({start_method})", found)
    assert left == []
    assert_nothing_left(workers, sessions)


@pytest.mark.django_db(transaction=True)
def test_rerun_after_the_caller_was_killed_resumes_exactly():
    """Kill a journaled run's caller with SIGKILL, rerun the run_id: every item written exactly once."""
    driver = start_driver(*QUICK, "--run-id", "killed-then-resumed")
    wait_for_rows(driver, ITEMS // 4)
    workers = worker_processes(psutil.Process(driver.pid))
    kill(driver)
    assert wait_gone(workers, within=5) == []
    before = len(marker_counts())
    report = bulkpool.run(
        functools.partial(jobs.slow_marker, 0.001),
        range(ITEMS),
        backend="process",
        workers=2,
        chunk_size=CHUNK,
        run_id="killed-then-resumed",
        progress=False,
    )
    found = tally(range(ITEMS))
    record("caller SIGKILLed, then the run_id rerun", found, report, written_before_rerun=before)
    assert found.exactly_once, (found, str(report))
    assert 0 < report.skipped < ITEMS
    assert report.skipped == before
    assert (report.ok, report.failed, report.skipped) == (ITEMS - before, 0, before)
