"""Point 4: worker processes killed with SIGKILL from outside, mid-run."""

from __future__ import annotations

import functools
import random
import signal
import time

import psutil
import pytest

import bulkpool
from bulkpool import ProcessExecutor
from tests.faults import jobs
from tests.faults.support import assert_nothing_lost_or_doubled, injecting, record, tally, worker_processes

ITEMS = 400
pytestmark = pytest.mark.slow  # each run lasts seconds, so that faults land mid-run


def kill_a_worker() -> int:
    """SIGKILL one of this process's bulkpool workers, chosen at random."""
    workers = worker_processes()
    if not workers:
        return 0
    random.choice(workers).send_signal(signal.SIGKILL)
    return 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.parametrize("run_id", [None, "faults"], ids=["plain", "journaled"])
def test_workers_killed_from_outside(start_method, run_id):
    """Three workers SIGKILLed mid-run are replaced, their chunks run again; nothing lost, nothing doubled."""
    func = functools.partial(jobs.slow_marker, 0.01)
    executor = ProcessExecutor(start_method=start_method)
    with injecting(kill_a_worker, times=3, interval=0.5, workers=2, uses_db=False) as injector:
        report = bulkpool.run(
            func, range(ITEMS), backend=executor, workers=2, chunk_size=10, progress=False, run_id=run_id
        )
    found = tally(range(ITEMS))
    mode = "journaled" if run_id else "plain"
    record(f"3 workers SIGKILLed from outside ({start_method}, {mode})", found, report)
    assert injector.faults == 3
    assert report.retried >= 10  # lost chunks were sent again: the kills came mid-run
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)


def kill_the_forkserver() -> int:
    """SIGKILL the forkserver ("zygote") once it has forked workers (so it is not still
    starting, after the previous strike): its workers notice their parent died and exit.
    A worker it forked runs its command line; a program it runs while it starts does not
    (``platform.architecture()`` runs ``file``). A strike may still land while it forks
    a replacement: the worker that was starting is started again (``START_ATTEMPTS``)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        working = [child for child in psutil.Process().children() if _is_working_zygote(child)]
        if working:
            for zygote in working:
                zygote.send_signal(signal.SIGKILL)
            return len(working)
        time.sleep(0.05)
    return 0


def _is_working_zygote(process: psutil.Process) -> bool:
    try:
        return "zygote" in process.cmdline() and any(_is_its_worker(child) for child in process.children())
    except psutil.Error:  # gone, or a zombie: the previous strike's, or a worker of it
        return False


def _is_its_worker(child: psutil.Process) -> bool:
    """A child running the forkserver's command line for more than a moment: a worker (a
    program it runs has that command line too, between its fork and its exec)."""
    return "zygote" in child.cmdline() and time.time() - child.create_time() > 0.1


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("run_id", [None, "faults"], ids=["plain", "journaled"])
def test_forkserver_killed_from_outside(run_id):
    """The forkserver SIGKILLed twice mid-run: it is started again, and the workers with it."""
    func = functools.partial(jobs.slow_marker, 0.01)
    executor = ProcessExecutor(start_method="forkserver")
    with injecting(kill_the_forkserver, times=2, interval=1.0, workers=2, uses_db=False) as injector:
        report = bulkpool.run(
            func, range(ITEMS), backend=executor, workers=2, chunk_size=10, progress=False, run_id=run_id
        )
    found = tally(range(ITEMS))
    record(f"the forkserver SIGKILLed twice ({'journaled' if run_id else 'plain'})", found, report)
    assert injector.faults == 2
    assert report.retried >= 10  # its workers' chunks were sent again
    assert_nothing_lost_or_doubled(report, ITEMS, run_id)
    assert worker_processes() == []
