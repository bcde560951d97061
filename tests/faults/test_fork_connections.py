"""Issue 7 point 4: forked workers never use nor close a connection they inherit.

The caller's connection is open while the run goes on (it read the QuerySet's keys, and a
journaled run asks its journal), so every worker forked mid-run to replace a killed one
starts with a copy of it. The test notes the caller's session (its server id and a
temporary table, which lives exactly as long as the session), kills workers several
times so that replacements are forked, and checks afterwards that the session is the same
one and that every row was updated exactly once.
"""

from __future__ import annotations

import signal
import time

import pytest
from django.db import connection
from django.db.models import F

import bulkpool
from bulkpool import ProcessExecutor
from tests.faults.support import injecting, record, session_id, tally, worker_processes
from tests.testapp.models import Marker

ROWS = 600
WORKERS = 2
KILLS = 3
pytestmark = pytest.mark.slow  # each run lasts seconds, so that the kills land mid-run
TEMP_TABLE = "bulkpool_caller_temp"


def bump_slowly(marker: Marker) -> None:
    """Add 1 to the row's value, holding the chunk's transaction a moment."""
    marker.value = F("value") + 1
    time.sleep(0.01)


class KillReplacements:
    """Each strike SIGKILLs a worker not struck before, then waits for its replacement."""

    def __init__(self) -> None:
        self.killed: set[int] = set()

    def __call__(self) -> int:
        fresh = [p for p in worker_processes() if p.pid not in self.killed]
        if not fresh:
            return 0
        victim = fresh[0]
        self.killed.add(victim.pid)
        victim.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the run forks the replacement when it next sends work
            if len([p for p in worker_processes() if p.pid not in self.killed]) >= WORKERS:
                break
            time.sleep(0.02)
        return 1


def caller_session() -> tuple[int | None, list[tuple[int]]]:
    """The caller's session id (None on SQLite) and its temporary table's rows."""
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT n FROM {TEMP_TABLE}")
        rows = [tuple(row) for row in cursor.fetchall()]
    return (None if connection.vendor == "sqlite" else session_id()), rows


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("run_id", [None, "fork-connections"], ids=["plain", "journaled"])
def test_caller_session_survives_forked_replacements(run_id):
    """Workers forked mid-run leave the caller's session alone: same id, its temp table still there."""
    Marker.objects.bulk_create(Marker(key=str(n), value=n) for n in range(ROWS))
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE {TEMP_TABLE} (n integer)")
        cursor.execute(f"INSERT INTO {TEMP_TABLE} (n) VALUES (42)")
    before = caller_session()
    strike = KillReplacements()
    with injecting(strike, times=KILLS, interval=0.2, workers=WORKERS, uses_db=False) as injector:
        report = bulkpool.update(
            Marker.objects.all(),
            bump_slowly,
            update_fields=["value"],
            backend=ProcessExecutor(start_method="fork"),
            workers=WORKERS,
            chunk_size=10,
            progress=False,
            run_id=run_id,
        )
    assert caller_session() == before, "the caller's session was ended or replaced"
    assert before[1] == [(42,)]
    assert injector.faults == KILLS
    rows = Marker.objects.values_list("pk", "key", "value")
    doubt = {f.item for f in report.failures if f.exc_type == "bulkpool.CommitUnknown"}
    wrong = [key for pk, key, value in rows if value != int(key) + 1 and pk not in doubt]
    mode = "journaled" if run_id else "plain"
    record(f"{KILLS} fork workers killed, caller's session kept ({mode})", tally(range(ROWS)), report)
    assert wrong == [], str(report)
    assert [f.summary() for f in report.failures if f.item not in doubt] == []
    assert report.retried > 0  # the kills came mid-run
    if run_id:
        assert doubt == set()
