"""Off the happy path: every way a run ends, and the journal as the one truth about what is done."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

import bulkpool
from bulkpool.models import Run, RunChunk, RunFailure
from tests import jobs
from tests.faults.support import REPO
from tests.testapp.models import Marker

BACKENDS = ["serial", "thread", "process"]

pytestmark = pytest.mark.django_db(transaction=True)


def marker_counts() -> Counter[str]:
    return Counter(Marker.objects.values_list("key", flat=True))


def once_each(keys: set[str]) -> bool:
    counts = marker_counts()
    return set(counts) == keys and set(counts.values()) == {1}


# -- a poison item, then a resume ----------------------------------------------------------


@pytest.mark.parametrize("poison", [0, 13, 19])
def test_poison_item_fails_alone_and_a_resume_reports_it_failed(poison):
    """An item that kills every worker fails alone (its chunk is split until it is alone); a
    resume reports it failed from the journal -- never "skipped" -- and writes nothing twice."""
    func = functools.partial(jobs.die_always_at, poison)
    options = dict(backend="process", workers=2, chunk_size=10, retries=1, run_id=f"poison-{poison}")
    first = bulkpool.run(func, range(40), **options)
    assert [(f.index, f.exc_type) for f in first.failures] == [(poison, "bulkpool.WorkerDied")]
    assert (first.ok, first.failed) == (39, 1)
    everything_but_poison = {str(i) for i in range(40)} - {str(poison)}
    assert once_each(everything_but_poison)

    again = bulkpool.run(func, range(40), **options)
    assert (again.ok, again.failed, again.failed_before, again.skipped) == (0, 1, 1, 39)
    assert again.failures[0].index == poison
    assert once_each(everything_but_poison)
    run = Run.objects.get(run_id=f"poison-{poison}")
    assert (run.status, run.attempts) == (Run.Status.FINISHED, 2)
    # Every item of the input is in exactly one record: the pieces tile the input.
    covered = sorted(
        i for start, size in RunChunk.objects.values_list("start", "size") for i in range(start, start + size)
    )
    assert covered == list(range(40))


# -- the input breaks mid-run, then a resume -----------------------------------------------


def breaking_input(total: int, breaks_at: int | None):
    for i in range(total):
        if i == breaks_at:
            raise OSError(f"the source went away at {i}")
        yield i


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_that_raises_stops_the_run_and_a_resume_finishes_it(backend):
    """The input raising mid-run: the items before it run, InputFailed carries the report, the
    journal says stopped (not finished); fed the whole input, the same run_id writes the rest once."""
    options = dict(backend=backend, workers=2, chunk_size=10, run_id="breaks")
    with pytest.raises(bulkpool.InputFailed) as failed:
        bulkpool.run(jobs.write_marker, breaking_input(100, 45), **options)
    report = failed.value.report
    assert isinstance(failed.value.__cause__, OSError)
    assert (report.total, report.ok, report.not_run) == (45, 45, 0)
    assert "the input raised OSError" in report.stopped_early
    assert once_each({str(i) for i in range(45)})
    assert Run.objects.get(run_id="breaks").status == Run.Status.STOPPED

    resumed = bulkpool.run(jobs.write_marker, breaking_input(100, None), **options)
    assert (resumed.ok, resumed.skipped) == (55, 45)
    assert once_each({str(i) for i in range(100)})
    assert Run.objects.get(run_id="breaks").status == Run.Status.FINISHED


# -- a refused rerun changes nothing -------------------------------------------------------


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_refused_rerun_leaves_the_journal_as_it_was(backend):
    """A rerun fed other input is refused with ResumeRefused, and the finished run's record stays."""
    bulkpool.run(jobs.write_marker, range(80), backend=backend, workers=2, chunk_size=10, run_id="keep")
    before = Run.objects.values().get(run_id="keep")
    with pytest.raises(bulkpool.ResumeRefused, match="different input"):
        bulkpool.run(
            jobs.write_marker, range(100, 180), backend=backend, workers=2, chunk_size=10, run_id="keep"
        )
    assert Run.objects.values().get(run_id="keep") == before
    assert (before["status"], before["ok"], before["attempts"]) == (Run.Status.FINISHED, 80, 1)
    assert once_each({str(i) for i in range(80)})


def test_run_identity_includes_the_operation_and_its_arguments():
    """An update journaled with some values cannot be resumed by an update with other values."""
    Marker.objects.bulk_create(Marker(key=str(i), value=0) for i in range(20))
    bulkpool.update(Marker.objects.all(), values={"value": 1}, backend="serial", run_id="upd")
    with pytest.raises(bulkpool.ConfigurationError, match="belongs to a run of update"):
        bulkpool.update(Marker.objects.all(), values={"value": 2}, backend="serial", run_id="upd")
    with pytest.raises(bulkpool.ConfigurationError, match="belongs to a run of update"):
        bulkpool.delete(Marker.objects.all(), backend="serial", run_id="upd")
    assert list(Marker.objects.values_list("value", flat=True)) == [1] * 20
    again = bulkpool.update(Marker.objects.all(), values={"value": 1}, backend="serial", run_id="upd")
    assert (again.ok, again.skipped) == (0, 20)


# -- rejects across attempts ---------------------------------------------------------------


def test_rejects_file_keeps_every_attempt_and_the_journal_writes_them_all(tmp_path):
    """A resumed run adds to its rejects file; `bulkpool rejects RUN_ID` writes every failure."""
    rejects = tmp_path / "rejects.jsonl"
    func = jobs.fail_multiples_of_7
    first_items = breaking_input(100, 50)
    with pytest.raises(bulkpool.InputFailed):
        bulkpool.run(
            func, first_items, backend="thread", workers=2, chunk_size=10, run_id="rj", rejects=str(rejects)
        )
    assert len(rejects.read_text().splitlines()) == len([i for i in range(50) if i % 7 == 0])
    bulkpool.run(
        func, range(100), backend="thread", workers=2, chunk_size=10, run_id="rj", rejects=str(rejects)
    )
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [i for i in range(100) if i % 7 == 0]

    out = StringIO()
    call_command("bulkpool", "rejects", "rj", stdout=out)
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["index"] for line in exported] == [i for i in range(100) if i % 7 == 0]
    assert {line["run_id"] for line in exported} == {"rj"}
    assert exported[1]["item"] == 7 and exported[1]["exc_type"] == "ValueError"
    assert RunFailure.objects.count() == len(exported)


# -- an imap consumer that stops early -----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_imap_consumer_that_stops_lets_the_chunks_in_flight_finish(backend):
    """Closing imap's outcomes early: the chunks in flight are counted, the journal says stopped."""
    with bulkpool.imap(
        jobs.write_marker, range(1000), backend=backend, workers=2, chunk_size=10, run_id="peek"
    ) as outcomes:
        seen = [next(outcomes) for _ in range(15)]
    report = outcomes.report
    assert [o.index for o in seen] == list(range(15))
    written = sum(marker_counts().values())
    assert written == report.ok and 15 <= written < 1000
    assert report.not_run == report.total - report.ok
    assert set(marker_counts().values()) == {1}
    assert Run.objects.get(run_id="peek").status == Run.Status.STOPPED
    assert report.stopped_early == "the caller stopped reading the outcomes"


# -- a flood of failures -------------------------------------------------------------------


def test_a_flood_of_failures_keeps_the_first_and_counts_the_rest(tmp_path):
    """5,000 failures: the report keeps the first 1,000 with counts by type; the rejects file has all."""
    rejects = tmp_path / "rejects.jsonl"
    report = bulkpool.run(
        jobs.fail_always, range(5000), backend="serial", chunk_size=500, rejects=str(rejects)
    )
    assert (report.failed, len(report.failures), report.failures_left_out) == (5000, 1000, 4000)
    assert report.failure_counts == Counter({"ValueError": 5000})
    assert [f.index for f in report.failures] == list(range(1000))
    assert len(rejects.read_text().splitlines()) == 5000
    assert "keeps the first 1,000" in str(report)


@pytest.mark.slow
def test_two_hundred_thousand_failures_keep_the_parent_under_250_mb(tmp_path):
    """200,000 failing items on process workers: the parent's peak memory stays under 250 MB."""
    rejects = tmp_path / "rejects.jsonl"
    script = textwrap.dedent(
        f"""
        import os, django
        from django.conf import settings
        settings.DATABASES["default"]["NAME"] = os.environ["BULKPOOL_FAULTS_DB_NAME"]
        django.setup()
        import bulkpool
        from tests import jobs
        report = bulkpool.run(
            jobs.fail_always, range(200_000), backend="process", workers=2, chunk_size=1000,
            rejects={str(rejects)!r},
        )
        # VmHWM, not ru_maxrss, which Linux carries over from the parent (pytest) across exec.
        peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(report.failed, len(report.failures), report.failures_left_out, round(peak_kb / 1024))
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "BULKPOOL_FAULTS_DB_NAME": str(connection.settings_dict["NAME"]),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    failed, kept, left_out, peak_mb = map(int, done.stdout.split())
    assert (failed, kept, left_out) == (200_000, 1000, 199_000)
    assert peak_mb < 250, f"parent peak RSS {peak_mb} MB"
    with open(rejects, encoding="utf-8") as file:
        assert sum(1 for _ in file) == 200_000


# -- a worker that cannot be replaced ------------------------------------------------------


def test_a_worker_that_cannot_be_replaced_stops_the_run_with_the_partial_report(tmp_path):
    """A dead worker whose replacement fails in setup: the other worker's chunks are drained
    and counted, and WorkersLost (with the startup error as its cause) carries the report."""
    flag = str(tmp_path / "no-more-workers")
    func = functools.partial(jobs.write_marker_with_state_then_die_at, flag, 55)
    setup = functools.partial(jobs.setup_fails_once_flagged, flag)
    with pytest.raises(bulkpool.WorkersLost) as lost:
        bulkpool.run(
            func, range(200), backend="process", workers=2, chunk_size=10, setup=setup, run_id="lost"
        )
    report = lost.value.report
    assert isinstance(lost.value.__cause__, bulkpool.WorkerStartupError)
    assert "setup refuses" in str(lost.value.__cause__)
    written = marker_counts()
    assert set(written.values()) == {1}
    assert sum(written.values()) == report.ok
    assert "55" not in written
    assert report.ok + report.failed + report.not_run == report.total
    assert report.not_run > 0
    assert Run.objects.get(run_id="lost").status == Run.Status.STOPPED


# -- executors that may deliver a chunk twice ----------------------------------------------


class AtLeastOnceSerial(bulkpool.SerialExecutor):
    """A serial executor that declares what a broker does: a chunk may arrive twice."""

    delivery = "at_least_once"


def test_an_at_least_once_executor_always_runs_journaled(caplog):
    """Without a run_id, a backend that may deliver a chunk twice gets a made-up one, logged."""
    report = bulkpool.run(jobs.write_marker, range(30), backend=AtLeastOnceSerial(), chunk_size=10)
    assert report.ok == 30
    (run,) = Run.objects.all()
    assert run.run_id.startswith("run-") and run.status == Run.Status.FINISHED
    assert f"Journaled as run_id={run.run_id!r}" in caplog.text
    assert RunChunk.objects.filter(run=run).count() == 3


# -- found in review -------------------------------------------------------------------------


@pytest.mark.vendor("sqlite")  # the halving path: PostgreSQL redoes the chunk with checks instead
def test_a_chunk_split_on_a_refused_commit_whose_worker_dies_resends_only_what_is_not_recorded(tmp_path):
    """A chunk split on a refused COMMIT commits its first half, then its worker dies in the
    second: sent again, only the unrecorded half runs, and every good row is written once."""
    from tests.testapp.models import Author, Book

    authors = [Author.objects.create(name=f"a{i}").pk for i in range(8)]
    dangling, poison = max(authors) + 1000, authors[6]
    items = [*authors[:1], dangling, *authors[2:]]
    func = functools.partial(jobs.write_book_dying_on_second_run, str(tmp_path), poison)
    report = bulkpool.run(func, items, backend="process", workers=1, chunk_size=8, run_id="split-die")
    assert [(f.index, "IntegrityError" in f.exc_type) for f in report.failures] == [(1, True)]
    assert (report.ok, report.failed, report.skipped) == (7, 1, 0)
    books = Counter(Book.objects.values_list("author_id", flat=True))
    assert books == Counter(i for i in items if i != dangling)


def test_ordered_imap_over_bad_lines_does_not_spin(tmp_path):
    """Ordered imap on serial over a file whose first chunk has bad lines (skipped): the
    settled pieces wait for the one in flight, and the run finishes."""
    path = tmp_path / "rows.jsonl"
    lines = [str(i) for i in range(40)]
    lines[10] = lines[20] = "{oops"
    path.write_text("\n".join(lines) + "\n")
    with bulkpool.open_input(path, on_bad_line="skip") as items:
        outcomes = list(bulkpool.imap(jobs.write_marker, items, backend="serial", chunk_size=40))
    assert [o.index for o in outcomes] == list(range(40))
    assert [o.index for o in outcomes if not o.ok] == [10, 20]
    assert len(marker_counts()) == 38


@pytest.mark.parametrize("backend", ["serial", "process"])
def test_a_rerun_refused_past_its_first_chunk_leaves_the_journal_as_it_was(backend):
    """Input that differs only in a later chunk: refused there, and nothing of the finished
    run's record changes (no attempt counted, status and counts kept)."""
    bulkpool.run(jobs.write_marker, range(50), backend=backend, workers=2, chunk_size=10, run_id="late")
    before = Run.objects.values().get(run_id="late")
    changed = [*range(30), 999, *range(31, 50)]
    with pytest.raises(bulkpool.ResumeRefused, match=r"items at 30\.\.39"):
        bulkpool.run(jobs.write_marker, changed, backend=backend, workers=2, chunk_size=10, run_id="late")
    assert Run.objects.values().get(run_id="late") == before


def test_unreadable_lines_are_marked_in_the_rejects_file_and_not_fed_back(tmp_path):
    """A skipped bad line is a rejects line marked unreadable; fed back, it is left out."""
    path = tmp_path / "rows.jsonl"
    path.write_text("1\n{oops\n3\n")
    rejects = tmp_path / "rejects.jsonl"
    with bulkpool.open_input(path, on_bad_line="skip") as items:
        bulkpool.run(jobs.fail_always, items, backend="serial", rejects=str(rejects), early_stop=False)
    lines = sorted((json.loads(line) for line in rejects.read_text().splitlines()), key=lambda x: x["index"])
    assert [(line["index"], line.get("unreadable", False)) for line in lines] == [
        (0, False),
        (1, True),
        (2, False),
    ]
    with bulkpool.open_input(rejects) as again:
        assert list(again) == [1, 3]
    assert again.unreadable_skipped == 1
