"""Point 4: worker processes killed with SIGKILL from outside, mid-run."""

from __future__ import annotations

import functools
import random
import signal

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
