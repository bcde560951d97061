"""The journal's failure records: one live run per run_id, stale runs, the records' bound, retry_failed."""

from __future__ import annotations

import datetime
import functools
import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.models import Sum
from django.utils import timezone

import bulkpool
from bulkpool import RunInProgress
from bulkpool.journal import AlreadyDone, JournalRef, record_chunk, recorded_result
from bulkpool.models import Run, RunChunk, RunFailure
from bulkpool.protocol import Chunk, ErrorInfo
from bulkpool.status import STALE, STALE_AFTER_SECONDS
from tests import command_jobs, jobs
from tests.testapp.models import Marker

pytestmark = pytest.mark.django_db(transaction=True)

SLOW = functools.partial(jobs.wait_then_pass, 0.02)


def marker_counts() -> Counter[str]:
    return Counter(Marker.objects.values_list("key", flat=True))


def live_run(run_id: str, *, owner: str, renewed: float = 1.0) -> Run:
    """A run marked running whose lease ``owner`` renewed ``renewed`` seconds ago."""
    return Run.objects.create(
        run_id=run_id,
        func="tests.jobs.write_marker",
        chunk_size=10,
        status=Run.Status.RUNNING,
        owner=owner,
        heartbeat_at=timezone.now() - datetime.timedelta(seconds=renewed),
    )


def in_thread(func, *args, **kwargs):
    """Run ``func`` on a thread of its own (its own connection); returns (thread, outcome)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["report"] = func(*args, **kwargs)
        except BaseException as error:
            outcome["error"] = error
        finally:
            connections.close_all()

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_a_second_caller_of_a_live_run_id_is_refused_and_nothing_is_written_twice():
    """While a run holds its run_id, another caller gets one line naming it; every item is written once."""
    first, outcome = in_thread(
        bulkpool.run, jobs.write_marker, range(200), backend="serial", chunk_size=5, run_id="held",
        prepare=SLOW,
    )  # fmt: skip
    try:
        while not Run.objects.filter(run_id="held", status=Run.Status.RUNNING).exists():
            assert first.is_alive(), outcome
        with pytest.raises(RunInProgress) as refused:
            bulkpool.run(jobs.write_marker, range(200), backend="thread", workers=2, run_id="held")
    finally:
        first.join()
    message = str(refused.value)
    assert "\n" not in message
    assert f"{socket.gethostname()} pid {os.getpid()}" in message
    assert outcome["report"].ok == 200
    assert set(marker_counts().values()) == {1} and len(marker_counts()) == 200
    run = Run.objects.get(run_id="held")
    assert (run.status, run.attempts, run.owner) == (Run.Status.FINISHED, 1, "")


def test_two_fresh_runs_started_together_one_is_refused():
    """Two callers starting one new run_id at once: one runs it, the other is refused (not IntegrityError)."""
    barrier = threading.Barrier(2)

    def start() -> bulkpool.Report:
        barrier.wait()
        return bulkpool.run(jobs.write_marker, range(100), backend="serial", chunk_size=5, run_id="race",
                            prepare=SLOW)  # fmt: skip

    runs = [in_thread(start) for _ in range(2)]
    for thread, _ in runs:
        thread.join()
    outcomes = [outcome for _, outcome in runs]
    refused = [o["error"] for o in outcomes if "error" in o]
    assert len(refused) == 1 and isinstance(refused[0], RunInProgress), outcomes
    assert [o["report"].ok for o in outcomes if "report" in o] == [100]
    assert set(marker_counts().values()) == {1} and len(marker_counts()) == 100


def test_a_live_run_on_another_host_is_refused_before_anything_runs():
    """The refusal comes before item one, and names the other caller's host and pid."""
    live_run("remote", owner="other-host pid 4242 (abc123)")
    with pytest.raises(RunInProgress, match="other-host pid 4242"):
        bulkpool.run(jobs.write_marker, range(10), backend="serial", run_id="remote")
    assert not Marker.objects.exists()


def test_a_lapsed_lease_is_stale_and_the_run_is_taken_over():
    """A run whose caller stopped renewing its lease shows as stale, and the next caller resumes it."""
    live_run("lapsed", owner="other-host pid 4242 (abc123)", renewed=STALE_AFTER_SECONDS + 5)
    live_run("fresh", owner="other-host pid 4243 (def456)")
    assert list(Run.objects.stale().values_list("run_id", flat=True)) == ["lapsed"]
    assert Run.objects.get(run_id="lapsed").state == STALE
    assert Run.objects.get(run_id="fresh").state == Run.Status.RUNNING
    report = bulkpool.run(jobs.write_marker, range(10), backend="serial", run_id="lapsed")
    assert report.ok == 10
    assert Run.objects.get(run_id="lapsed").state == Run.Status.FINISHED


def test_a_killed_caller_on_this_machine_does_not_hold_its_run_id():
    """A caller of this machine that is gone (no such pid) holds nothing, however fresh its lease."""
    gone = 2**22 + 12345  # above Linux's default pid_max, so no process has it
    live_run("killed", owner=f"{socket.gethostname()} pid {gone} (abc123)")
    assert bulkpool.run(jobs.write_marker, range(10), backend="serial", run_id="killed").ok == 10


def test_the_lease_is_renewed_while_the_run_goes_on(monkeypatch):
    """Journal.beat() renews heartbeat_at while the run holds it, and warns once another caller took it."""
    from bulkpool.journal import Journal
    from bulkpool.options import Options

    journal = Journal.open(Options(run_id="beating"), "tests.jobs.write_marker", 10)
    journal.begin()
    run = Run.objects.get(run_id="beating")
    Run.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - datetime.timedelta(seconds=60))
    journal.lease._renewed = 0.0  # as if HEARTBEAT_SECONDS had passed
    journal.beat()
    renewed = Run.objects.get(pk=run.pk).heartbeat_at
    assert (timezone.now() - renewed).total_seconds() < 5
    Run.objects.filter(pk=run.pk).update(owner="other-host pid 1 (zzz)")
    warnings = []
    monkeypatch.setattr("bulkpool.journal.lease.logger.warning", lambda *args: warnings.append(args))
    journal.lease._renewed = 0.0
    journal.beat()
    assert len(warnings) == 1 and "taken over" in warnings[0][0]


def test_a_record_overlapping_a_bigger_record_of_another_attempt_is_refused():
    """The overlap window is the run's bound (its largest chunk so far), not this attempt's own."""
    run = Run.objects.create(run_id="bound", func="tests.jobs.write_marker", chunk_size=200)
    RunChunk.objects.create(run=run, start=0, size=200, digest="x", ok=200)
    small = JournalRef(run.pk, max_size=10)  # an attempt that runs chunks of 10
    with pytest.raises(AlreadyDone), transaction.atomic():  # as a worker calls it: in the chunk's own
        record_chunk(small, "default", Chunk(15, 150, list(range(150, 160))), {})
    assert RunChunk.objects.filter(run=run).count() == 1


@pytest.mark.parametrize("backend", ["serial", "thread", "process"])
def test_retry_failed_runs_only_the_failed_items_and_replaces_their_failures(backend, tmp_path):
    """retry_failed=True: once the cause is fixed, only the recorded failures run again, each once."""
    flag = tmp_path / "broken"
    flag.touch()
    func = functools.partial(jobs.fail_multiples_of_7_while_flagged, str(flag))
    options = {"backend": backend, "workers": 2, "chunk_size": 10, "run_id": "retry"}
    first = bulkpool.run(func, range(50), **options)
    assert (first.ok, first.failed) == (42, 8)
    still = bulkpool.run(func, range(50), retry_failed=True, **options)  # not fixed yet: they fail again
    assert (still.ok, still.failed, still.skipped) == (0, 8, 42)
    assert RunFailure.objects.count() == 8
    flag.unlink()  # the fix
    retried = bulkpool.run(func, range(50), retry_failed=True, **options)
    assert (retried.ok, retried.failed, retried.skipped) == (8, 0, 42)
    assert set(marker_counts().values()) == {1} and len(marker_counts()) == 50
    assert not RunFailure.objects.exists()
    assert set(RunChunk.objects.values_list("ok", "failed")) == {(10, 0)}
    again = bulkpool.run(func, range(50), retry_failed=True, **options)
    assert (again.ok, again.failed, again.skipped) == (0, 0, 50)


def test_a_resumed_create_reports_the_keys_of_the_chunks_done_before():
    """create() resumed: report.results holds every new key, those of earlier attempts from the journal."""
    rows = [{"key": f"k{i}", "value": i} for i in range(30)]
    rows[15]["value"] = "not a number"
    options: dict[str, Any] = {"backend": "serial", "chunk_size": 10, "run_id": "keys"}
    with pytest.raises(bulkpool.ItemFailed):
        bulkpool.create(Marker, rows, on_error="raise", **options)
    assert Marker.objects.count() == 19  # the first two chunks, less the failed row
    resumed = bulkpool.create(Marker, rows, **options)
    assert (resumed.skipped, resumed.ok, resumed.failed) == (19, 10, 1)
    keys = dict(Marker.objects.values_list("key", "pk"))
    assert len(keys) == 29
    assert resumed.results == [keys.get(f"k{i}") for i in range(30)]
    assert resumed.results[15] is None and None not in resumed.results[:15]


def test_recorded_result_gives_back_a_committed_chunks_values_and_failures():
    """A chunk delivered again after it committed gets its values and failures from the journal."""
    run = Run.objects.create(run_id="again", func="x", chunk_size=5)
    ref = JournalRef(run.pk, max_size=5, attempt=1)
    chunk = Chunk(0, 0, [1, 2, 3, 4, 5])
    with transaction.atomic():
        record_chunk(ref, "default", chunk, {2: ErrorInfo("ValueError", "bad", "")}, [10, 20, None, 40, 50])
    result = recorded_result(ref, "default", chunk)
    assert result.values == [10, 20, None, 40, 50]
    assert {offset: error.message for offset, error in result.errors.items()} == {2: "bad"}
    assert not result.skipped


def test_rejects_journal_and_report_name_every_failure_once_across_resumes(tmp_path):
    """Unreadable lines and failing items, a run stopped early and resumed twice: the rejects
    file, the journal and the report each hold every failure once, unreadable lines too."""
    lines = [json.dumps({"key": f"k{i}", "bad": i in (5, 20, 41, 50)}) for i in range(60)]
    lines[10] = lines[35] = "{not json"
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    expected = [5, 10, 20, 35, 41, 50]

    def run(**options: Any) -> bulkpool.Report:
        with bulkpool.open_input(path, on_bad_line="skip") as items:
            return bulkpool.run(
                command_jobs.write_row_unless_bad, items, backend="serial", chunk_size=10,
                run_id="records", rejects=rejects, **options,
            )  # fmt: skip

    with pytest.raises(bulkpool.TooManyFailures):
        run(max_failures=2)
    for _ in range(2):  # the resume, then a rerun of the finished run
        report = run()
        written = [json.loads(line) for line in rejects.read_text().splitlines()]
        assert [line["index"] for line in written] == expected
        assert [line.get("line") for line in written if line.get("unreadable")] == [11, 36]
        assert sorted(RunFailure.objects.values_list("index", flat=True)) == expected
        assert sorted(RunFailure.objects.exclude(line=None).values_list("line", flat=True)) == [11, 36]
        assert [f.index for f in report.failures] == expected and report.failed == 6
    assert Run.objects.get(run_id="records").chunks.aggregate(Sum("failed"))["failed__sum"] == 6
    assert Marker.objects.count() == 54


@pytest.mark.vendor("sqlite")
def test_renewing_the_lease_does_not_wait_for_a_worker_holding_sqlites_lock():
    """A worker in a long write transaction: the caller's renewal gives up at once and tries
    again at the next beat, instead of stalling the run's loop for the busy timeout."""
    import sqlite3
    import time

    from bulkpool.journal import Journal
    from bulkpool.options import Options

    journal = Journal.open(Options(run_id="locked"), "tests.jobs.write_marker", 10)
    journal.begin()
    holder = sqlite3.connect(connections["default"].settings_dict["NAME"], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a worker's chunk holds it
    try:
        journal.lease._renewed = 0.0
        started = time.monotonic()
        journal.beat()
        assert time.monotonic() - started < 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    journal.lease._renewed = 0.0
    journal.beat()  # the lock is free again: renewed
    heartbeat = Run.objects.get(run_id="locked").heartbeat_at
    assert (timezone.now() - heartbeat).total_seconds() < 5


def test_a_resume_stopped_early_keeps_the_later_failures_in_its_rejects_file(tmp_path):
    """The rejects file is written afresh: a resume that stops before reaching the failures an
    earlier attempt recorded further on still writes them, from the journal."""
    rejects = tmp_path / "rejects.jsonl"
    func = jobs.fail_multiples_of_7
    options: dict[str, Any] = {"backend": "serial", "chunk_size": 10, "run_id": "early", "rejects": rejects}
    bulkpool.run(func, range(50), **options)  # failures at 0, 7, ..., 49, all recorded

    def breaking() -> Iterator[int]:
        yield from range(20)
        raise OSError("the input broke")

    with pytest.raises(bulkpool.InputFailed):
        bulkpool.run(func, breaking(), **options)
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(0, 50, 7))
