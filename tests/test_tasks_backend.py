"""The tasks backend on every leg, with no queue running: the ImmediateBackend runs serial,
the DummyBackend and unknown aliases are refused, what cannot travel as JSON is refused
before anything is enqueued, and a chunk's way through bulkpool's task and its messages
(``tests.tasks_backends.Threaded``: each task on a thread of this process)."""

from __future__ import annotations

import functools

import pytest

import bulkpool
from bulkpool import ConfigurationError, TasksExecutor
from bulkpool.executors import SerialExecutor, remote, resolve
from bulkpool.models import ChunkReply, Run, RunChunk
from tests import jobs
from tests.tasks_backends import Recording, Threaded
from tests.testapp.models import Marker


@pytest.fixture(autouse=True)
def _nothing_recorded():
    Recording.enqueued.clear()
    Threaded.enqueued.clear()
    yield
    Recording.enqueued.clear()
    Threaded.enqueued.clear()
    remote.close_connections()  # the runner threads keep theirs: the test database is dropped


def test_the_immediate_backend_runs_serial():
    """backend="tasks" on the ImmediateBackend is the serial executor."""
    assert isinstance(resolve("tasks"), SerialExecutor)
    assert isinstance(resolve(TasksExecutor(backend="default")), SerialExecutor)


@pytest.mark.django_db
def test_the_immediate_backend_behaves_as_serial_inside_a_transaction():
    """Serial sees the caller's transaction (a TestCase), so it runs where workers could not."""
    report = bulkpool.run(jobs.write_marker, range(30), backend="tasks", chunk_size=7)
    assert (report.ok, report.failed) == (30, 0)
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(range(30))


@pytest.mark.django_db
def test_the_immediate_backend_reports_failures_as_serial_does():
    """The same items fail, with the same report, as on backend="serial"."""
    tasks = bulkpool.run(jobs.fail_multiples_of_7, range(30), backend="tasks", chunk_size=10)
    serial = bulkpool.run(jobs.fail_multiples_of_7, range(30), backend="serial", chunk_size=10)
    assert [f.index for f in tasks.failures] == [f.index for f in serial.failures] == [0, 7, 14, 21, 28]
    assert (tasks.ok, tasks.failed) == (serial.ok, serial.failed) == (25, 5)


def test_the_dummy_backend_is_refused():
    """The DummyBackend never runs a task: a run over it would wait forever."""
    with pytest.raises(ConfigurationError, match="DummyBackend, which stores tasks and never runs them"):
        bulkpool.run(jobs.write_marker, range(3), backend=TasksExecutor(backend="dummy"))


def test_an_alias_not_in_settings_tasks_is_refused():
    """The message names the aliases that are configured."""
    with pytest.raises(
        ConfigurationError, match=r"No task backend 'nope' in settings.TASKS \(configured: default"
    ):
        bulkpool.run(jobs.write_marker, range(3), backend=TasksExecutor(backend="nope"))


@pytest.mark.django_db(transaction=True)
def test_a_lambda_is_refused_before_anything_is_enqueued():
    """func travels by its dotted path: a lambda cannot, and nothing is sent."""
    with pytest.raises(ConfigurationError, match="is a lambda or a closure"):
        bulkpool.run(lambda i: i, range(3), backend=TasksExecutor(backend="recording"))
    assert Recording.enqueued == []


@pytest.mark.django_db(transaction=True)
def test_an_item_json_cannot_carry_is_refused_by_index():
    """Items travel as JSON: the first one that cannot is named, and nothing of its chunk is sent."""
    items = [1, 2, object()]
    with pytest.raises(
        ConfigurationError, match=r"Item 2 \(<object object .*\) cannot be sent to task workers"
    ):
        bulkpool.run(jobs.identity, items, backend=TasksExecutor(backend="recording"), chunk_size=10)
    assert Recording.enqueued == []


@pytest.mark.django_db(transaction=True)
def test_chunks_are_enqueued_as_json_strings_on_the_queue_named():
    """Each chunk is one task of bulkpool.django_tasks.run_chunk, its arguments JSON text."""
    executor = TasksExecutor(2, backend="threaded", queue_name="default")
    report = bulkpool.run(jobs.identity, range(10), backend=executor, chunk_size=5)
    assert report.ok == 10
    assert [(task.module_path, task.queue_name) for task, _ in Threaded.enqueued] == [
        ("bulkpool.django_tasks.run_chunk", "default")
    ] * 2
    assert all(isinstance(arg, str) for _, args in Threaded.enqueued for arg in args)


@pytest.mark.django_db(transaction=True)
def test_a_run_over_threaded_workers_writes_each_item_once():
    """Through the task and its messages: every item written once, results in input order,
    the run journaled, the messages read and deleted."""
    executor = TasksExecutor(2, backend="threaded")
    report = bulkpool.run(jobs.write_marker, range(50), backend=executor, chunk_size=10)
    assert (report.ok, report.failed) == (50, 0)
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(range(50))
    run = Run.objects.get()
    assert sum(RunChunk.objects.filter(run=run).values_list("size", flat=True)) == 50
    assert not ChunkReply.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_failures_come_back_with_their_items():
    """A failing item fails alone; its chunk-mates are written; the report names it."""
    executor = TasksExecutor(2, backend="threaded")
    report = bulkpool.run(jobs.fail_multiples_of_7, range(30), backend=executor, chunk_size=10)
    assert [f.index for f in report.failures] == [0, 7, 14, 21, 28]
    assert {f.exc_type for f in report.failures} == {"ValueError"}
    assert Marker.objects.count() == 25


@pytest.mark.django_db(transaction=True)
def test_a_dry_run_writes_nothing():
    """Every chunk rolled back, on the workers too."""
    executor = TasksExecutor(2, backend="threaded")
    report = bulkpool.run(jobs.write_marker, range(20), backend=executor, chunk_size=5, dry_run=True)
    assert report.ok == 20
    assert Marker.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_a_partial_with_json_arguments_travels():
    """functools.partial of a module-level function, with JSON arguments, is sent."""
    executor = TasksExecutor(2, backend="threaded")
    func = functools.partial(jobs.wait_then_pass, 0.0)
    report = bulkpool.run(func, range(12), backend=executor, chunk_size=4)
    assert report.ok == 12


@pytest.mark.django_db(transaction=True)
def test_max_failures_stops_the_run_and_the_rejects_file_names_each_failure(tmp_path):
    """max_failures and rejects as on every backend: the run stops, the file lists the failures."""
    import json

    rejects = tmp_path / "rejects.jsonl"
    executor = TasksExecutor(1, backend="threaded", ahead=1)
    with pytest.raises(bulkpool.TooManyFailures) as stopped:
        bulkpool.run(
            jobs.fail_multiples_of_7,
            range(200),
            backend=executor,
            chunk_size=10,
            max_failures=2,
            rejects=rejects,
        )
    report = stopped.value.report
    assert report.failed >= 2
    assert report.ok + report.failed < 200  # stopped before the end
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [line["index"] for line in lines] == [f.index for f in report.failures]
    assert Marker.objects.count() == report.ok


@pytest.mark.django_db(transaction=True)
def test_the_chunks_in_flight_are_capped_at_ahead_per_worker():
    """Enqueue has no back-pressure: the caller never has more than ahead x workers out."""
    executor = TasksExecutor(2, backend="threaded", ahead=2)
    out_at_each_send: list[int] = []
    send = executor._send

    def counting(payload: str, key: str) -> None:
        out_at_each_send.append(len(executor._leases))  # sent and not finished, before this one
        send(payload, key)

    executor._send = counting  # type: ignore[method-assign]
    report = bulkpool.run(jobs.write_marker, range(100), backend=executor, chunk_size=5)
    assert report.ok == 100
    assert len(out_at_each_send) == 20
    assert max(out_at_each_send) == 3  # the window filled (4 out with this one), never past it


@pytest.mark.django_db(transaction=True)
def test_a_queue_the_backend_does_not_serve_is_refused_before_anything_is_enqueued():
    """The backend's own validation (its QUEUES) speaks before item one."""
    with pytest.raises(ConfigurationError, match=r"refuses bulkpool's task: .*Queue 'elsewhere'"):
        bulkpool.run(
            jobs.identity, range(3), backend=TasksExecutor(backend="recording", queue_name="elsewhere")
        )
    assert Recording.enqueued == []


def test_without_the_tasks_framework_the_message_says_what_to_install(monkeypatch):
    """Before Django 6.0 without the django-tasks backport: how to get it."""
    from bulkpool.executors.tasks import framework

    def missing(name: str) -> None:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(framework, "_import", missing)
    with pytest.raises(ConfigurationError, match=r"pip install 'django-bulkpool\[tasks\]'"):
        bulkpool.run(jobs.write_marker, range(3), backend="tasks")
