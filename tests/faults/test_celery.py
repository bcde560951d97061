"""The celery backend with real Celery workers (prefork; threads and solo too), on Redis and on RabbitMQ.

Each broker gets a worker node started as ``celery -A tests.celery_app worker --pool prefork
-c 2 -Q <queue>`` (a subprocess, stopped at the end of the module), writing to this
session's test database. Every test counts the Marker rows: each item written exactly once.

- ``BULKPOOL_CELERY_TESTS=0``: skipped (CI runs them on one leg only);
- a broker that does not answer: skipped with the reason, except under ``CI=true``, where
  that is an error, since a CI run that skipped them would test nothing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
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
from tests.faults.support import (
    finish,
    kill,
    kill_with_children,
    marker_counts,
    record,
    start_driver,
    tally,
    wait_for_rows,
)

REPO = Path(__file__).resolve().parent.parent.parent
OFF = os.environ.get("BULKPOOL_CELERY_TESTS", "").strip() == "0"
BROKERS = {"redis": REDIS, "rabbitmq": RABBITMQ}
START_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.skipif(OFF, reason="BULKPOOL_CELERY_TESTS=0"),
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
        pool: str = "prefork",
        **extra_env: str,
    ) -> None:
        env = {
            **os.environ,
            **extra_env,
            "BULKPOOL_CELERY_BROKER": broker,
            "BULKPOOL_CELERY_DB_NAME": database,
            # The checkout's tests, and what the caller imports bulkpool from (its PYTHONPATH).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        self.name = f"{name}@{socket.gethostname()}"
        self.log = log
        command = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool", pool]
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
        if self.process.poll() is not None:
            return
        kill_with_children(self.process)


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


def broker_connections(url: str, pids: list[int]) -> set[int]:
    """Local ports of the established connections from these processes (and their
    children) to the broker at ``url``."""
    port = urlparse(url).port
    ports: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for process in processes:
            try:
                found = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            ports.update(
                c.laddr.port
                for c in found
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
            )
    return ports


def drop_connections(url: str, ports: set[int]) -> set[int]:
    """The broker closes these client connections, as a broker restart or a network cut
    does (Redis ``CLIENT KILL ADDR``, RabbitMQ ``rabbitmqctl close_connection``); returns
    the ports it closed. Only this test's connections: the brokers are shared."""
    closed = set()
    if url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(url)
        try:
            for port in ports:
                if client.client_kill_filter(_id=None, addr=f"127.0.0.1:{port}"):
                    closed.add(port)
        finally:
            client.close()
        return closed
    listing = ["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"]
    lines = subprocess.run(listing, capture_output=True, text=True, timeout=60).stdout.split("\n")
    pids = {int(port): pid for pid, _, port in (line.partition("\t") for line in lines) if port.isdigit()}
    closing = {
        port: subprocess.Popen(
            ["rabbitmqctl", "-q", "close_connection", pids[port], "bulkpool test: the broker drops it"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
        if port in pids
    }
    return {port for port, process in closing.items() if process.wait(timeout=60) == 0}


def drop_both_sides(url: str, caller: int, node: int, within: float = 20.0) -> tuple[int, int]:
    """Drop the connections of the caller and of the node, each side at least once (a side
    still reconnecting from the last drop is waited for); how many of each were closed."""
    closed_caller: set[int] = set()
    closed_node: set[int] = set()
    deadline = time.monotonic() + within
    while not (closed_caller and closed_node) and time.monotonic() < deadline:
        ours, theirs = broker_connections(url, [caller]), broker_connections(url, [node])
        closed = drop_connections(url, ours | theirs)
        closed_caller |= ours & closed
        closed_node |= theirs & closed
        time.sleep(0.05)
    return len(closed_caller), len(closed_node)


def _can_drop(url: str) -> str | None:
    """None when this test can make the broker close connections, else why not."""
    if url.startswith("redis"):
        return None
    try:
        done = subprocess.run(["rabbitmqctl", "-q", "list_connections"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"rabbitmqctl does not run here ({error})"
    if done.returncode:
        said = done.stderr.decode()[-300:]
        return f"rabbitmqctl cannot reach the broker (run it as root or as rabbitmq): {said}"
    return None


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


@pytest.mark.vendor("postgresql", "mysql")  # on SQLite the failing chunk may wait out the others for the lock
def test_a_stopping_run_revokes_the_chunks_still_queued(celery_env):
    """max_failures=1 stops the run at its first failure: the chunks still waiting in the
    broker are revoked and counted not run, instead of run and waited for."""
    from tests.celery_jobs import marker_failing_at_0_slowly

    with pytest.raises(bulkpool.TooManyFailures) as stopped:
        bulkpool.run(
            functools.partial(marker_failing_at_0_slowly, 0.2),
            range(64),
            backend=_executor(celery_env),
            workers=8,  # 16 chunks in flight for the node's 2 pool processes: 14 wait in the broker
            chunk_size=4,
            max_failures=1,
        )
    report = stopped.value.report
    _wait_idle(celery_env)  # a revoke can come too late for a chunk a pool process just took
    found = tally(range(1, 64))
    record(f"celery {_label(celery_env)}: stop with chunks queued", found, report)
    assert (found.duplicated, found.unexpected) == (0, 0), found
    assert report.ok <= found.written < 32  # without the revoke, all 63 would have run
    assert report.not_run == 64 - report.ok - report.failed >= 32
    # The node has no result backend, and needs none: no warning for each revoked chunk.
    assert "as revoked in backend" not in celery_env["log"].read_text(errors="replace")


def _wait_idle(env: dict[str, Any], within: float = 30.0) -> None:
    """Until the module's node runs no task (so the test's database can be emptied)."""
    node = env["node"].name
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        active = env["app"].control.inspect(destination=[node], timeout=1.0).active() or {}
        if active and not active.get(node):
            return
        time.sleep(0.2)
    raise AssertionError(f"celery node {node} still busy after {within:g}s")


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


def test_a_chunk_taken_by_a_node_that_died_before_starting_it_is_sent_again(celery_env):
    """A node dies between taking chunks and starting them: chunks sent later overtake them; they go again."""
    from tests.celery_jobs import kill_the_node_if_doomed, marker_with_state

    app, queue = celery_env["app"], celery_env["queue"]
    doomed = Node(
        celery_env["broker"], queue, celery_env["database"], f"d-{queue}", celery_env["log"],
        BULKPOOL_TEST_DOOMED_NODE="1",
    )  # fmt: skip
    doomed.wait_ready(app)
    pool = doomed.children()
    try:
        report = bulkpool.run(
            marker_with_state,
            range(300),
            setup=kill_the_node_if_doomed,
            backend=_executor(celery_env, lease=4.0),
            workers=4,
            chunk_size=10,
        )
    finally:
        doomed.kill()
        for child in pool:  # a pool process its dead node left behind
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    found = tally(range(300))
    record(f"celery {_label(celery_env)}: node died holding unstarted chunks", found, report)
    assert doomed.process.returncode == -signal.SIGKILL  # it took a chunk, and died of it
    assert found.exactly_once, found
    assert (report.ok, report.failed) == (300, 0), str(report)


def _starts(run_id: str) -> dict[tuple[int, int], int]:
    from bulkpool.models import ChunkDelivery

    rows = ChunkDelivery.objects.filter(run__run_id=run_id).values_list("start", "size", "starts")
    return {(start, size): starts for start, size, starts in rows}


def _kills(log: Path) -> int:
    """Pool processes the node's log says were SIGKILLed (the log is the module's: take a difference)."""
    return log.read_text(errors="replace").count("exited with 'signal 9 (SIGKILL)'")


def test_a_poison_chunk_with_no_caller_left_stops_killing_then_fails_alone_on_resume(celery_env):
    """Starts are counted in the journal: with its caller SIGKILLed, the broker's redeliveries of a
    poison chunk stop after MAX_STARTS; the resumed run refuses it at once and splits it."""
    from bulkpool.executors.celery import MAX_STARTS

    log, run_id = celery_env["log"], f"celery-poison-{uuid.uuid4().hex[:6]}"
    kills_before = _kills(log)
    driver = start_driver(
        "--items", "40", "--chunk-size", "4", "--poison", "13", "--run-id", run_id,
        "--celery-broker", celery_env["broker"], "--celery-queue", celery_env["queue"],
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not _starts(run_id).get((12, 4)):  # the poison chunk's first start: it kills a worker now
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.02)
    kill(driver)  # no caller left to revoke anything: only the workers can end the redeliveries
    deadline = time.monotonic() + 60
    while _starts(run_id)[(12, 4)] <= MAX_STARTS and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # a redelivery still going on would start it again, and kill once more
    assert _starts(run_id)[(12, 4)] == MAX_STARTS + 1  # the last start was refused, not run
    assert _kills(log) - kills_before == MAX_STARTS

    report = bulkpool.run(
        functools.partial(marker_killing_at, 13),
        range(40),
        backend=_executor(celery_env),
        workers=2,
        chunk_size=4,
        retries=0,
        run_id=run_id,
    )
    found = tally(i for i in range(40) if i != 13)
    record(f"celery {_label(celery_env)}: poison chunk, caller SIGKILL, resumed", found, report)
    assert found.exactly_once, found
    assert [(f.index, f.exc_type) for f in report.failures] == [(13, "bulkpool.WorkerDied")]
    assert _starts(run_id)[(12, 4)] == MAX_STARTS + 2  # refused at once in the second attempt
    # Each split-off piece with the poison in it kills MAX_STARTS workers: [12, 13], then [13].
    assert _kills(log) - kills_before == 3 * MAX_STARTS


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


@pytest.fixture
def current_app(celery_env: dict[str, Any]) -> Iterator[Any]:
    """The test app as the process's current Celery app, sending to the node's queue by
    default: what ``backend="celery"`` (no app, no queue) finds in a project that loads its
    app in ``proj/__init__.py``."""
    from celery import current_app as current

    before = current._get_current_object()
    app = celery_env["app"]
    default_queue = app.conf.task_default_queue
    app.conf.task_default_queue = celery_env["queue"]
    app.set_current()
    try:
        yield app
    finally:
        app.conf.task_default_queue = default_queue
        before.set_current()


def test_the_command_with_backend_celery_runs_on_the_workers_and_resumes(celery_env, current_app, tmp_path):
    """``manage.py bulkpool run ... --backend celery``: the project's app, real workers, each item once."""
    from django.core.management import call_command

    from bulkpool.models import Run

    items = tmp_path / "items.jsonl"
    items.write_text("".join(f"{i}\n" for i in range(200)), encoding="utf-8")
    run_id = f"celery-command-{uuid.uuid4().hex[:6]}"
    command = ["bulkpool", "run", "tests.celery_jobs.marker_of_prepared", "--input", str(items)]
    command += ["--backend", "celery", "--workers", "2", "--chunk-size", "10", "--run-id", run_id]
    for attempt in (1, 2):
        out, err = io.StringIO(), io.StringIO()
        call_command(*command, "--no-progress", stdout=out, stderr=err)  # exit status 0: no SystemExit
        found = tally(range(200))
        record(f"celery {_label(celery_env)}: the command, attempt {attempt}", found, None)
        assert found.exactly_once, (found, out.getvalue(), err.getvalue())
    run = Run.objects.get(run_id=run_id)
    assert (run.status, run.attempts, run.skipped) == ("finished", 2, 200), out.getvalue()
    assert len(_starts(run_id)) == 20  # every chunk was started by a celery worker (none twice: skipped)


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


def test_the_broker_dropping_every_connection_mid_run_loses_and_doubles_nothing(celery_env):
    """The broker closes the caller's and workers' connections twice mid-run: all reconnect; items once."""
    why_not = _can_drop(celery_env["broker"])
    if why_not:
        if _in_ci():
            pytest.fail(why_not)
        pytest.skip(why_not)
    broker, node = celery_env["broker"], celery_env["node"]
    run_id = f"celery-drop-{uuid.uuid4().hex[:6]}"
    driver = start_driver(
        "--items", "400", "--pause", "0.02", "--chunk-size", "10", "--run-id", run_id,
        "--celery-broker", broker, "--celery-queue", celery_env["queue"],
    )  # fmt: skip
    dropped = []
    for rows in (80, 200):
        wait_for_rows(driver, rows)
        dropped.append(drop_both_sides(broker, driver.pid, node.process.pid))
    status, out, err = finish(driver, within=120)  # it reconnects, or fails: never hangs
    done = re.search(r"DRIVER DONE ok=(\d+) failed=(\d+) skipped=(\d+)", out)
    found = tally(range(400))
    counts = dict(zip(("ok", "failed", "skipped"), map(int, done.groups()), strict=True)) if done else {}
    record(f"celery {_label(celery_env)}: broker connections dropped", found, None, **counts)
    assert status == 0, err[-3000:]
    # Both sides were cut at the first drop; the workers at the second too. (The caller may
    # still be reconnecting from the first, or already done, when the second comes.)
    assert dropped[0][0] and all(workers for _, workers in dropped), dropped
    assert "Lost the Celery broker" in err, err[-3000:]  # and the caller noticed
    assert found.exactly_once, (found, err[-3000:])
    assert counts["failed"] == 0 and counts["ok"] + counts["skipped"] == 400, out


def _queued(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (on Redis and RabbitMQ alike; on Redis an empty queue is
    no queue at all)."""
    with app.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except conn.channel_errors:
            return 0


def test_chunks_an_interrupted_run_left_in_the_broker_write_nothing_when_a_worker_comes(celery_env):
    """No worker takes the queue: the caller says so, naming the queue and the worker command;
    Ctrl-C ends it, the report says "not run"; a worker started afterwards takes the chunks
    and writes none of them (the journal fences the ended attempt); the resume sends them
    again and writes each item once."""
    from bulkpool.executors.celery import NOBODY_TAKES

    app, run_id = celery_env["app"], f"celery-fence-{uuid.uuid4().hex[:6]}"
    idle = f"{celery_env['queue']}-idle"  # no worker consumes it yet
    started = time.monotonic()
    driver = start_driver(
        "--items", "80", "--chunk-size", "10", "--run-id", run_id,
        "--celery-broker", celery_env["broker"], "--celery-queue", idle,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while _queued(app, idle) != 4:  # workers=2: two chunks ahead each, the rest unsent
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.1)
    time.sleep(max(0.0, started + NOBODY_TAKES + 3 - time.monotonic()))
    interrupted = time.monotonic()
    driver.send_signal(signal.SIGINT)
    status, _, err = finish(driver, within=60)
    assert status == 130, err
    assert time.monotonic() - interrupted < 15, err  # Ctrl-C ends a run that waits for workers
    assert re.search(r": 0 ok, 0 failed, \d+ not run", err), err  # the items read, none run
    assert f"No celery worker has taken a chunk for {NOBODY_TAKES:g}s from queue {idle!r}" in err, err
    assert f"worker -Q {idle} --prefetch-multiplier 1" in err, err

    late = Node(celery_env["broker"], idle, celery_env["database"], f"late-{idle}", celery_env["log"])
    try:
        late.wait_ready(app)
        deadline = time.monotonic() + 60
        while _queued(app, idle) or len(_starts(run_id)) < 4:  # every chunk delivered, its start counted
            assert time.monotonic() < deadline, (_queued(app, idle), _starts(run_id))
            time.sleep(0.2)
        time.sleep(2)  # a chunk the fence let through would commit now
        assert marker_counts() == {}, "a chunk of the interrupted run was written"
    finally:
        late.stop()
        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_delete(idle)

    report = bulkpool.run(
        functools.partial(jobs.slow_marker, 0.0),
        range(80),
        backend=_executor(celery_env),
        workers=2,
        chunk_size=10,
        run_id=run_id,
    )
    found = tally(range(80))
    record(f"celery {_label(celery_env)}: late delivery after Ctrl-C fenced, resumed", found, report)
    assert found.exactly_once, (found, str(report))
    assert (report.ok, report.skipped) == (80, 0), str(report)


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_every_outcome_is_right_on_a_thread_or_solo_pool(celery_env, pool):
    """400 items, every 7th failing, through a node of that pool (4 threads, or one solo
    process): each outcome in order with its own value or its own error, each item written once."""
    from tests.celery_jobs import marker_failing_every_slowly

    app, queue = celery_env["app"], f"{celery_env['queue']}-{pool}"
    options = ("-c", "4") if pool == "threads" else ()
    node = Node(
        celery_env["broker"],
        queue,
        celery_env["database"],
        f"{pool}-{queue}",
        celery_env["log"],
        options,
        pool,
    )
    try:
        node.wait_ready(app)
        results = bulkpool.imap(
            functools.partial(marker_failing_every_slowly, 7, 0.005),
            range(400),
            backend=CeleryExecutor(app=app, queue=queue, lease=8.0, heartbeat=1.0),
            workers=4,
            chunk_size=10,
        )
        outcomes = list(results)
    finally:
        node.stop()
        with app.connection_for_write() as conn, contextlib.suppress(Exception):
            conn.default_channel.queue_delete(queue)
    found = tally(i for i in range(400) if i % 7)
    record(f"celery {_label(celery_env)}: -P {pool}, every 7th failing", found, results.report)
    assert [o.index for o in outcomes] == list(range(400))
    wrong = [o.index for o in outcomes if not _its_own(o)]
    assert wrong == [], f"{len(wrong)} outcomes carry another item's value or error: {wrong[:20]}"
    assert found.exactly_once, found
    assert (results.report.ok, results.report.failed) == (342, 58), str(results.report)


def _its_own(outcome: Any) -> bool:
    """The outcome of ``marker_failing_every(7, ...)`` for its own item: its error, or its value."""
    if outcome.index % 7 == 0:
        return outcome.error is not None and outcome.error.message == f"item {outcome.index} is refused"
    return outcome.error is None and outcome.value == outcome.index


def test_redis_redelivering_a_dead_nodes_chunks_after_the_run_ended_writes_nothing(celery_env):
    """A node holding chunks is SIGKILLed, the caller Ctrl-C'd: Redis hands the node's unacked
    messages out again once its visibility timeout (4 s here, an hour by default) is past; a
    new node takes them after the run ended and the journal refuses them (the fence); the
    resume writes each item once."""
    import json

    from tests.celery_app import TRANSPORT_OPTIONS

    if not celery_env["broker"].startswith("redis"):
        pytest.skip("the visibility timeout is Redis's: RabbitMQ redelivers when the connection drops")
    tag = uuid.uuid4().hex[:8]
    prefix = f"bulkpool-vt-{tag}:"
    options: dict[str, Any] = {
        "visibility_timeout": 4,
        "unacked_restore_interval": 1,  # look for messages past it every second, not every 100 s
        "unacked_restore_throttle": 1,
        # The node is SIGKILLed: if it held the restore mutex then, it stays held this
        # long (300 s by default), and no node restores the messages within the test.
        "unacked_mutex_expire": 5,
        "global_keyprefix": prefix,  # the unacked set of this test alone: Redis is shared
    }
    env = {TRANSPORT_OPTIONS: json.dumps(options)}
    app, queue, log = make_app(celery_env["broker"], options), f"bulkpool-vt-{tag}", celery_env["log"]
    database, run_id = celery_env["database"], f"celery-vt-{tag}"
    greedy = ("-c", "1", "--prefetch-multiplier", "8")  # it takes 8 chunks at once: 7 wait in its buffer
    nodes = [Node(celery_env["broker"], queue, database, f"g-{queue}", log, greedy, **env)]
    try:
        nodes[0].wait_ready(app)
        driver = start_driver(
            "--items", "400", "--pause", "0.02", "--chunk-size", "10", "--workers", "4", "--run-id", run_id,
            "--celery-broker", celery_env["broker"], "--celery-queue", queue, **env,
        )  # fmt: skip
        wait_for_rows(driver, 60)
        nodes[0].kill()
        held = _unacked(app)  # what the node had taken and not acknowledged: Redis keeps it
        driver.send_signal(signal.SIGINT)
        status, _, err = finish(driver, within=60)
        assert status == 130, err
        assert re.search(r"\d+ not run", err), err
        written, starts = marker_counts(), sum(_starts(run_id).values())
        assert held and max(written.values()) == 1, (held, written)

        nodes.append(Node(celery_env["broker"], queue, database, f"l-{queue}", log, ("-c", "2"), **env))
        nodes[1].wait_ready(app)
        deadline = time.monotonic() + 60
        while _unacked(app) or _queued(app, queue) or sum(_starts(run_id).values()) < starts + held:
            assert time.monotonic() < deadline, (_unacked(app), _queued(app, queue), _starts(run_id))
            time.sleep(0.2)
        time.sleep(2)  # a chunk the fence let through would commit now
        assert marker_counts() == written, "a late redelivery of the interrupted run wrote rows"

        report = bulkpool.run(
            functools.partial(jobs.slow_marker, 0.0),
            range(400),
            backend=CeleryExecutor(app=app, queue=queue, lease=8.0, heartbeat=1.0),
            workers=2,
            chunk_size=10,
            run_id=run_id,
        )
    finally:
        for node in nodes:
            node.kill()
        _forget(celery_env["broker"], prefix)
    found = tally(range(400))
    record(
        f"celery {_label(celery_env)}: node SIGKILL, Redis redelivery after the run, fenced", found, report
    )
    assert found.exactly_once, (found, str(report))
    assert report.skipped == len(written) and report.ok == 400 - len(written), str(report)


def _unacked(app: Any) -> int:
    """Messages Redis counts as taken by a consumer and not acknowledged (its visibility set)."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        return int(channel.client.hlen(channel.unacked_key))


def _forget(url: str, prefix: str) -> None:
    """Delete every key under the test's prefix: its queue, bindings and unacked set."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
