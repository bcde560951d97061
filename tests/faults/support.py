"""Tools of the fault suite: count what was written, cut the workers' connections, run a driver.

Every fault test ends the same way: ``tally`` counts the Marker rows per key (the table has
no unique constraint, so an item written twice shows up as two rows), the test asserts
that every expected key is there exactly once and nothing else is, and ``record`` keeps
the figures for the summary printed at the end of the session (see ``conftest.py``).

Faults on the database come from an ``Injector``: a thread of the test process with its
own connection, which waits until the run has committed rows and then strikes the
*workers'* sessions -- every session on the test database except its own and the ones the
test names as ``ours`` (the test's main connection).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from django.db import connection, connections

from bulkpool import Report
from tests.faults.jobs import COUNTERS
from tests.testapp.models import Marker

REPO = Path(__file__).resolve().parent.parent.parent
DRIVER = Path(__file__).resolve().parent / "driver.py"
FIGURES: list[dict[str, Any]] = []  # one row per fault test, printed by conftest.py


# -- what was written ----------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Marker rows against the keys a run should have written once each."""

    expected: int  # keys that should be there
    written: int  # of those, how many have at least one row
    duplicated: int  # of those, how many have more than one row
    unexpected: int  # rows whose key is not expected

    @property
    def exactly_once(self) -> bool:
        return self.written == self.expected and self.duplicated == 0 and self.unexpected == 0


def marker_counts() -> Counter[str]:
    """Rows per key, counters left out."""
    keys = Marker.objects.exclude(key__in=COUNTERS).values_list("key", flat=True)
    return Counter(keys)


def tally(expected: Iterable[object]) -> Tally:
    wanted = {str(key) for key in expected}
    counts = marker_counts()
    return Tally(
        expected=len(wanted),
        written=sum(1 for key in wanted if counts[key]),
        duplicated=sum(1 for key in wanted if counts[key] > 1),
        unexpected=sum(n for key, n in counts.items() if key not in wanted),
    )


def assert_nothing_lost_or_doubled(report: Report, items: int, run_id: str | None) -> None:
    """Items ``0 .. items-1`` each written exactly once -- except, in a plain run (no
    ``run_id``), items reported ``bulkpool.CommitUnknown``, each written once or not at all."""
    found = tally(range(items))
    assert (found.duplicated, found.unexpected) == (0, 0), (found, str(report))
    unknown = {f.index for f in report.failures if f.exc_type == "bulkpool.CommitUnknown"}
    assert [f.summary() for f in report.failures if f.index not in unknown] == [], str(report)
    counts = marker_counts()
    missing = {i for i in range(items) if not counts[str(i)]}
    assert missing <= unknown, (sorted(missing), str(report))
    if run_id is None:
        assert report.ok + report.failed == items, str(report)
    else:  # a chunk committed just before its worker died is found done: skipped
        assert found.exactly_once and report.failed == 0, (found, str(report))
        assert report.ok + report.skipped == items, str(report)


def record(fault: str, found: Tally, report: Report | None = None, **notes: Any) -> None:
    """Keep one row of figures for the session summary (and BULKPOOL_FAULT_FIGURES, if set)."""
    row: dict[str, Any] = {"fault": fault, "database": connection.vendor, **asdict(found)}
    if report is not None:
        row.update(ok=report.ok, failed=report.failed, retried=report.retried, skipped=report.skipped)
        row["commit_unknown"] = sum(f.exc_type == "bulkpool.CommitUnknown" for f in report.failures)
    row.update(notes)
    FIGURES.append(row)
    path = os.environ.get("BULKPOOL_FAULT_FIGURES")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")


# -- sessions on the test database ---------------------------------------------------------


def session_id() -> int:
    """The server's id of this thread's connection (it opens one if needed)."""
    query = {"postgresql": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(query)
        return int(cursor.fetchone()[0])


def other_sessions(ours: Collection[int] = ()) -> list[int]:
    """Client sessions on the test database, except this thread's and ``ours``."""
    name = connection.settings_dict["NAME"]
    query = {
        "postgresql": "SELECT pid FROM pg_stat_activity WHERE datname = %s "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        "mysql": "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
        "AND COMMAND <> 'Daemon' AND ID <> CONNECTION_ID()",
    }[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(query, [name])
        return sorted(int(row[0]) for row in cursor.fetchall() if int(row[0]) not in ours)


def end_session(session: int) -> None:
    """pg_terminate_backend / KILL: the session's open transaction rolls back, its client gets an error."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(%s)", [session])
        else:
            try:
                cursor.execute("KILL %s", [session])
            except Exception as error:  # it ended by itself meanwhile: "Unknown thread id"
                if "1094" not in str(error.args[:1]):
                    raise


def open_sessions() -> int:
    """Sessions on the test database, this thread's included."""
    return len(other_sessions()) + 1


def steady_sessions(quiet: float = 1.0, wait: float = 10.0) -> int:
    """The session count once it has stayed the same for ``quiet`` seconds.

    A test's baseline: sessions of the test before it may still be closing on the server.
    """
    deadline = time.monotonic() + wait
    count, since = open_sessions(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.1)
        if (now := open_sessions()) != count:
            count, since = now, time.monotonic()
    return count


def settled_sessions(expected: int, wait: float = 10.0) -> int:
    """The session count once the server has let closed sessions go (it takes a moment)."""
    deadline = time.monotonic() + wait
    while (count := open_sessions()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


# -- striking from a thread ----------------------------------------------------------------


class Injector(threading.Thread):
    """Calls ``strike()`` every ``interval`` seconds, ``times`` times, once the run is under way.

    Under way: the ``workers`` worker processes are running and, when ``uses_db``, the run
    has committed rows. ``strike`` runs in this thread and returns how many faults it
    caused (sessions ended, workers killed); ``faults`` adds them up.

    The connection is opened only once the workers are running, and a strike that kills
    workers uses none: a process forked while another thread holds a MySQL connection
    closes that connection (the child discards the thread's state, and mysqlclient sends
    COM_QUIT on the socket both share). Workers are forked when the run starts, as the
    pool grows and when one is replaced. On SQLite, a run whose pool grows must not
    count rows here (``uses_db=False``): a worker forked while this thread holds SQLite's
    read lock inherits SQLite's record of it, and never commits.
    """

    def __init__(
        self, strike: Callable[[], int], *, times: int, interval: float, workers: int, uses_db: bool
    ) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.strike, self.times, self.interval = strike, times, interval
        self.workers, self.uses_db = workers, uses_db
        self.stopped = threading.Event()
        self.strikes = 0
        self.faults = 0
        self.rows_at_first_strike = -1  # rows committed when the first strike came: mid-run if < all
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopped.is_set() and len(worker_processes()) < self.workers:
                time.sleep(0.02)
            if self.uses_db:
                while not self.stopped.is_set() and not marker_counts():
                    time.sleep(0.02)
                self.rows_at_first_strike = len(marker_counts())
            else:
                self.stopped.wait(0.3)  # let the first chunks commit
            while not self.stopped.is_set() and self.strikes < self.times:
                self.faults += self.strike()
                self.strikes += 1
                self.stopped.wait(self.interval)
        except BaseException as error:
            self.error = error
        finally:
            connections.close_all()

    def finish(self) -> None:
        self.stopped.set()
        self.join(30)
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def injecting(
    strike: Callable[[], int], *, times: int, interval: float, workers: int, uses_db: bool = True
) -> Iterator[Injector]:
    """Run an ``Injector`` while the body (the run) goes on; stop it, and re-raise its error, after."""
    injector = Injector(strike, times=times, interval=interval, workers=workers, uses_db=uses_db)
    injector.start()
    try:
        yield injector
    finally:
        injector.finish()


def end_some(ours: Collection[int], how_many: int | None = 1) -> Callable[[], int]:
    """A strike that ends ``how_many`` of the workers' sessions (None: all of them)."""

    def strike() -> int:
        sessions = other_sessions(ours)
        chosen = sessions if how_many is None else random.sample(sessions, min(how_many, len(sessions)))
        for session in chosen:
            end_session(session)
        return len(chosen)

    return strike


# -- processes -----------------------------------------------------------------------------


def worker_processes(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """The bulkpool worker processes under ``parent`` (default: this process), not the forkserver.

    The forkserver ("zygote") is a direct child; its workers are its children.
    """
    parent = parent or psutil.Process()
    found = []
    for child in parent.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not (child.ppid() == parent.pid and "zygote" in child.cmdline()):
                found.append(child)
    return found


def alive(process: psutil.Process) -> bool:
    """Running (a zombie waiting for a parent that never reaps it counts as gone)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes: Iterable[psutil.Process], within: float) -> list[psutil.Process]:
    """The processes still alive after ``within`` seconds (ideally none)."""
    left = list(processes)
    deadline = time.monotonic() + within
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def start_driver(*args: str, **env: str) -> subprocess.Popen[str]:
    """``driver.py`` in its own process group (as a shell runs a job), on the test database."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "BULKPOOL_FAULTS_DB_NAME": str(connection.settings_dict["NAME"]),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, str(DRIVER), *args],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_rows(process: subprocess.Popen[str], rows: int, within: float = 60.0) -> None:
    """Wait until the run in ``process`` has committed ``rows`` Marker rows."""
    deadline = time.monotonic() + within
    while len(marker_counts()) < rows:
        if process.poll() is not None:
            raise AssertionError(f"the driver ended early ({process.returncode}): {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no {rows} rows within {within}s: {process.communicate()}")
        time.sleep(0.02)


def kill_with_children(process: subprocess.Popen[Any]) -> None:
    """SIGKILL a worker command and the children it forked (a pool's processes, rq's
    work-horse) at once, as when their machine dies, and collect it."""
    try:
        everyone = [psutil.Process(process.pid), *psutil.Process(process.pid).children()]
    except psutil.NoSuchProcess:
        everyone = []
    for member in everyone:
        try:
            member.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL the driver alone (not its workers) and collect it."""
    process.kill()
    process.communicate()


def finish(process: subprocess.Popen[str], within: float) -> tuple[int, str, str]:
    """Wait ``within`` seconds for the driver to exit (kill it and fail if it hangs)."""
    try:
        out, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"the driver hung for {within}s\nstdout:\n{out}\nstderr:\n{err}") from None
    return process.returncode, out, err
