"""Journaled runs (run_id): resume, refusals, chunks that run twice; and dry runs."""

from __future__ import annotations

import functools
from collections import Counter
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import override_settings

import bulkpool
from bulkpool import ConfigurationError, ItemFailed
from bulkpool.journal import JournalRef
from bulkpool.models import ChunkDelivery, Run, RunChunk, RunFailure
from bulkpool.protocol import Chunk, Task
from bulkpool.work import Worker
from tests import jobs
from tests.testapp.models import Marker

BACKENDS = ["serial", "thread", "process"]

pytestmark = pytest.mark.django_db(transaction=True)


def marker_counts() -> Counter[str]:
    return Counter(Marker.objects.values_list("key", flat=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_of_a_finished_run_skips_everything(backend):
    """A second run with the same run_id skips every committed chunk and writes nothing."""
    first = bulkpool.run(
        jobs.write_marker, range(50), backend=backend, workers=2, chunk_size=10, run_id="nightly"
    )
    second = bulkpool.run(
        jobs.write_marker, range(50), backend=backend, workers=2, chunk_size=10, run_id="nightly"
    )
    assert (first.ok, first.skipped) == (50, 0)
    assert (second.ok, second.skipped) == (0, 50)
    assert set(marker_counts().values()) == {1} and len(marker_counts()) == 50
    run = Run.objects.get(run_id="nightly")
    assert (run.status, run.attempts, run.skipped) == (Run.Status.FINISHED, 2, 50)
    assert RunChunk.objects.filter(run=run).count() == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_stopped_run_resumes_with_every_item_once(backend, tmp_path):
    """A run stopped part-way resumes under the same run_id: every item is written exactly once."""
    func = functools.partial(jobs.fail_once_at, str(tmp_path / "failed-once"), 120)
    with pytest.raises(ItemFailed):
        bulkpool.run(
            func, range(300), backend=backend, workers=2, chunk_size=10, on_error="raise", run_id="resume"
        )
    written_before = sum(marker_counts().values())
    assert 0 < written_before < 300
    # The chunk holding the failed item committed its other items: resume leaves it done,
    # and reports the failure from the journal, not as skipped (feed the rejects back to retry it).
    report = bulkpool.run(func, range(300), backend=backend, workers=2, chunk_size=10, run_id="resume")
    counts = marker_counts()
    assert set(counts.values()) == {1}
    assert set(counts) == {str(i) for i in range(300)} - {"120"}
    assert (report.failed, report.failed_before, report.failures[0].index) == (1, 1, 120)
    assert report.skipped == written_before
    assert report.skipped + report.ok + report.failed == 300
    assert RunFailure.objects.get().index == 120


def test_journal_rows_and_failures_are_written_with_the_chunk():
    """Each chunk has one RunChunk row with its counts; each failed item a RunFailure row."""
    bulkpool.run(
        jobs.fail_multiples_of_7, range(30), backend="process", workers=2, chunk_size=10, run_id="counts"
    )
    chunks = list(RunChunk.objects.values_list("start", "size", "ok", "failed"))
    assert chunks == [(0, 10, 8, 2), (10, 10, 9, 1), (20, 10, 8, 2)]
    failures = list(RunFailure.objects.values_list("index", "item", "exc_type"))
    assert failures == [(i, str(i), "ValueError") for i in (0, 7, 14, 21, 28)]


def test_chunk_run_twice_is_applied_once():
    """A chunk that runs again after it committed (its worker died before replying) writes nothing."""
    run = Run.objects.create(run_id="twice", func="tests.jobs.write_marker", chunk_size=5)
    task = Task(
        func=jobs.write_marker,
        setup=None,
        atomic="chunk",
        database="default",
        retries=0,
        keep_values=True,
        own_connections=False,
        journal=JournalRef(run.pk, max_size=5),
    )
    worker = Worker(task)
    chunk = Chunk(0, 0, [1, 2, 3, 4, 5])
    first, second = worker.run(chunk), worker.run(chunk)
    assert not first.errors and not first.skipped
    # The second delivery applies nothing, and reports what the first committed.
    assert (second.values, second.errors, second.skipped) == ([1, 2, 3, 4, 5], {}, False)
    assert sum(marker_counts().values()) == 5


@pytest.mark.parametrize(
    ("second_run", "message"),
    [
        ({"func": jobs.identity}, "belongs to a run of tests.jobs.write_marker"),
        ({"items": range(100, 150)}, "was run before with different input"),
    ],
)
def test_reusing_a_run_id_for_other_work_is_refused(second_run, message):
    """A run_id reused with another function or input is refused, naming the difference."""
    bulkpool.run(jobs.write_marker, range(50), backend="serial", chunk_size=10, run_id="job")
    call = {"func": jobs.write_marker, "items": range(50), "chunk_size": 10, **second_run}
    with pytest.raises(ConfigurationError, match=message):
        bulkpool.run(call.pop("func"), call.pop("items"), backend="serial", run_id="job", **call)
    assert sum(marker_counts().values()) == 50


@pytest.mark.parametrize("sizes", [(10, 7), (10, 25), (10, "auto"), ("auto", 3)])
def test_a_resume_with_another_chunk_size_keeps_the_recorded_boundaries(sizes):
    """Chunks of a resume stretch over the ranges recorded before, whatever their size: every
    item once, the recorded ones skipped, and the journal's records never overlap."""
    first, second = sizes
    bulkpool.run(jobs.write_marker, range(95), backend="serial", chunk_size=first, run_id="sizes")
    report = bulkpool.run(jobs.write_marker, range(230), backend="serial", chunk_size=second, run_id="sizes")
    assert (report.ok, report.skipped, report.failed) == (135, 95, 0)
    counts = marker_counts()
    assert set(counts.values()) == {1} and len(counts) == 230
    ranges = sorted(RunChunk.objects.filter(run__run_id="sizes").values_list("start", "size"))
    assert [start for start, _ in ranges] == [0] + [start + size for start, size in ranges[:-1]]
    assert sum(size for _, size in ranges) == 230


def test_restart_forgets_the_starts_counted_by_earlier_attempts():
    """Starts counted for a chunk (celery's poison detection) belong to an attempt: a restart
    clears them, so a chunk that ran fine is not refused after a few restarts."""
    from bulkpool.journal import count_start
    from bulkpool.models import ChunkDelivery

    bulkpool.run(jobs.write_marker, range(20), backend="serial", chunk_size=10, run_id="starts")
    run = Run.objects.get(run_id="starts")
    ref = JournalRef(run.pk, 10)
    assert [count_start(ref, "default", Chunk(0, 0, list(range(10)))) for _ in range(3)] == [1, 2, 3]
    bulkpool.run(jobs.write_marker, range(20), backend="serial", chunk_size=10, run_id="starts", restart=True)
    assert ChunkDelivery.objects.filter(run=run).count() == 0
    assert count_start(ref, "default", Chunk(0, 0, list(range(10)))) == 1


def test_restart_forgets_the_previous_run():
    """restart=True starts a run_id over: its chunks run again."""
    bulkpool.run(jobs.write_marker, range(20), backend="serial", chunk_size=10, run_id="again")
    report = bulkpool.run(
        jobs.identity, range(20), backend="serial", chunk_size=5, run_id="again", restart=True
    )
    assert (report.ok, report.skipped) == (20, 0)
    assert Run.objects.get(run_id="again").chunk_size == 5


def test_run_id_without_the_app_is_refused_with_the_fix():
    """run_id without "bulkpool" in INSTALLED_APPS is refused, saying how to fix it."""
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "tests.testapp"]
    with override_settings(INSTALLED_APPS=apps), pytest.raises(ConfigurationError, match="INSTALLED_APPS"):
        bulkpool.run(jobs.write_marker, range(5), backend="serial", run_id="no-app")
    assert Marker.objects.count() == 0


def test_run_id_without_the_tables_is_refused_and_checked():
    """Without the journal tables, run_id is refused and `manage.py check --database` warns."""
    models = [RunFailure, RunChunk, ChunkDelivery, Run]  # children first: MySQL refuses otherwise
    with connection.schema_editor() as editor:
        for model in models:
            editor.delete_model(model)
    try:
        with pytest.raises(ConfigurationError, match="migrate bulkpool"):
            bulkpool.run(jobs.write_marker, range(5), backend="serial", run_id="no-tables")
        out = StringIO()
        call_command("check", "--database", "default", stdout=out, stderr=out)
        assert "bulkpool.W001" in out.getvalue()
    finally:
        with connection.schema_editor() as editor:
            for model in reversed(models):
                editor.create_model(model)
    assert Marker.objects.count() == 0


@pytest.mark.parametrize("atomic", ["chunk", "item"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_writes_nothing_and_reports_failures(backend, atomic, tmp_path):
    """dry_run runs every item, reports what would fail, commits nothing, fires no on_commit."""
    flag = tmp_path / "committed"
    func = functools.partial(jobs.write_marker_on_commit, str(flag))
    report = bulkpool.run(
        func, range(10), backend=backend, workers=2, chunk_size=4, atomic=atomic, dry_run=True
    )
    assert (report.ok, report.failed) == (9, 1)
    assert report.failures[0].item == 3
    assert Marker.objects.count() == 0
    assert not flag.exists()


def test_journal_open_refuses_unjournalable_options():
    """run_id needs atomic='chunk'; dry_run cannot be journaled; dry_run needs transactions."""
    with pytest.raises(ConfigurationError, match="run_id needs atomic='chunk'"):
        bulkpool.run(jobs.identity, range(3), backend="serial", run_id="x", atomic="item")
    with pytest.raises(ConfigurationError, match="nothing to journal"):
        bulkpool.run(jobs.identity, range(3), backend="serial", run_id="x", dry_run=True)
    with pytest.raises(ConfigurationError, match="dry_run needs transactions"):
        bulkpool.run(jobs.identity, range(3), backend="serial", atomic=False, dry_run=True)
    assert not Run.objects.exists()


def create_author(name: str) -> None:
    from tests.testapp.models import Author

    Author.objects.create(name=name)


def test_serial_dry_run_sees_a_duplicate_across_chunks_and_writes_nothing():
    """A serial dry run is one transaction: a name repeated in a later chunk fails, as it
    would for real, and nothing is written."""
    from tests.testapp.models import Author

    names = [f"n{i}" for i in range(9)] + ["n2"]
    report = bulkpool.run(create_author, names, backend="serial", chunk_size=3, dry_run=True)
    assert [f.index for f in report.failures] == [9]
    assert "IntegrityError" in report.failures[0].exc_type
    assert Author.objects.count() == 0


def test_concurrent_dry_run_says_what_it_cannot_see():
    """On concurrent workers each chunk rolls back alone; the report says what that hides."""
    report = bulkpool.run(
        create_author, ["a", "b", "a"], backend="thread", workers=2, chunk_size=1, dry_run=True
    )
    assert report.failed == 0
    assert "each chunk was rolled back alone" in str(report)
