"""The process executor as users meet it: scripts, `manage.py shell`, kills, leaks, memory."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from django.db import connection

import bulkpool
from bulkpool import ProcessExecutor
from tests import jobs
from tests.testapp.models import Marker

START_METHODS = ["fork", "spawn", "forkserver"]
REPO = Path(__file__).resolve().parent.parent

# A script as users write them: no `if __name__ == "__main__":` guard, a lambda, and
# settings made with settings.configure(). Under spawn/forkserver a worker that re-ran it
# would print SCRIPT-BODY again.
UNGUARDED_SCRIPT = """
import sys
print("SCRIPT-BODY", flush=True)
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": sys.argv[2]}},
    USE_TZ=True,
)
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth.models import Group
import bulkpool
suffix = "-group"
report = bulkpool.run(
    lambda i: Group.objects.create(name=f"{i}{suffix}"),
    range(30),
    backend=bulkpool.ProcessExecutor(start_method=sys.argv[1]),
    workers=2,
    chunk_size=4,
)
print("RESULT", report.ok, Group.objects.filter(name__endswith=suffix).count(), flush=True)
"""


def run_python(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO, **kwargs
    )


@pytest.mark.parametrize("start_method", START_METHODS)
def test_script_without_main_guard_runs_once(start_method, tmp_path):
    """A plain script with no __main__ guard and a lambda works; workers never re-run it."""
    script = tmp_path / "import_users.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = run_python([str(script), start_method, str(tmp_path / "db.sqlite3")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("SCRIPT-BODY") == 1
    assert "RESULT 30 30" in done.stdout


@pytest.mark.parametrize("start_method", START_METHODS)
def test_lambdas_typed_into_manage_py_shell_run_on_processes(start_method):
    """Lambdas and closures typed into `manage.py shell` run on process workers."""
    command = textwrap.dedent(f"""
        import bulkpool
        factor = 3
        def adder(k):
            return lambda i: i * factor + k
        outcomes = bulkpool.imap(adder(1), range(5), workers=2,
                                 backend=bulkpool.ProcessExecutor(start_method={start_method!r}))
        print("VALUES", [o.value for o in outcomes])
    """)
    done = run_python(["-m", "django", "shell", "--settings=tests.settings", "-c", command])
    assert done.returncode == 0, done.stderr
    assert "VALUES [1, 4, 7, 10, 13]" in done.stdout


@pytest.mark.slow
@pytest.mark.vendor("sqlite")  # it uses no database: once per test run is enough
def test_two_million_items_keep_parent_memory_flat(tmp_path):
    """A 2,000,000-item generator on the process executor keeps the parent under 150 MB."""
    # atomic=False: the function touches no database, so a transaction per item would only
    # add time; what is measured here is the parent's memory.
    script = textwrap.dedent(f"""
        import django
        from django.conf import settings
        settings.configure(DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3",
                                                    "NAME": {str(tmp_path / "db.sqlite3")!r}}}}})
        django.setup()
        import bulkpool
        report = bulkpool.run(abs, (i for i in range(2_000_000)), backend="process", workers=2,
                              atomic=False)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec, so a
        # big pytest process would show as this one's peak.
        peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print("RESULT", report.ok, report.failed, round(peak_kb / 1024))
    """)
    done = run_python(["-c", script])
    assert done.returncode == 0, done.stderr
    _, ok, failed, peak_mb = done.stdout.split()
    assert (int(ok), int(failed)) == (2_000_000, 0)
    assert int(peak_mb) < 150, f"parent peak RSS {peak_mb} MB"


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("sqlite")
def test_sqlite_file_takes_four_process_workers():
    """Four process workers on a SQLite file write every item, no 'database is locked'."""
    report = bulkpool.run(jobs.read_then_write, range(2000), backend="process", workers=4, chunk_size=25)
    assert report.failed == 0, report
    assert Marker.objects.count() == 2000
    assert Marker.objects.values("key").distinct().count() == 2000


def open_connections() -> int:
    """Connections to the test database, as the server counts them (ours included)."""
    name = connection.settings_dict["NAME"]
    query = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
        "mysql": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = %s",
    }[connection.vendor]
    with connection.cursor() as cursor:
        cursor.execute(query, [name])
        return cursor.fetchone()[0]


def settled_connections(expected: int, wait: float = 5.0) -> int:
    """The count once the server has reaped closed sessions (it does so a moment after the close)."""
    deadline = time.monotonic() + wait
    while (count := open_connections()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


@pytest.mark.django_db(transaction=True)
@pytest.mark.vendor("postgresql", "mysql")
@pytest.mark.parametrize(
    ("backend", "start_method"), [("process", "fork"), ("process", "spawn"), ("thread", None)]
)
def test_no_connection_or_process_outlives_the_run(backend, start_method):
    """After a run, the server sees as many connections as before, and no worker is left."""
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    before = open_connections()
    executor = ProcessExecutor(start_method=start_method) if start_method else backend
    report = bulkpool.run(jobs.write_marker, range(300), backend=executor, workers=3, chunk_size=10)
    assert report.ok == 300
    assert settled_connections(before) == before
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_after <= children_before


@pytest.mark.django_db(transaction=True)
def test_killed_worker_is_replaced_and_its_chunk_runs_again(tmp_path):
    """A worker killed with SIGKILL mid-chunk is replaced; every item is written exactly once."""
    func = functools.partial(jobs.die_once_at, str(tmp_path / "died"), 57)
    report = bulkpool.run(func, range(100), backend="process", workers=2, chunk_size=10)
    assert (tmp_path / "died").exists()
    assert (report.ok, report.failed) == (100, 0)
    assert report.retried >= 10
    keys = list(Marker.objects.values_list("key", flat=True))
    assert sorted(keys, key=int) == [str(i) for i in range(100)]


@pytest.mark.django_db(transaction=True)
def test_item_that_always_kills_its_worker_fails_alone():
    """An item that kills every worker it runs on fails after the retries; its chunk-mates are written."""
    func = functools.partial(jobs.die_always_at, 23)
    report = bulkpool.run(func, range(40), backend="process", workers=2, chunk_size=10, retries=1)
    assert [f.index for f in report.failures] == [23]
    assert report.failures[0].exc_type == "bulkpool.WorkerDied"
    assert "SIGKILL" in report.failures[0].message
    keys = sorted(Marker.objects.values_list("key", flat=True), key=int)
    assert keys == [str(i) for i in range(40) if i != 23]
