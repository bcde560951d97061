"""``manage.py bulkpool prune``: old runs go, with their chunks and failures; recent and
unfinished runs stay unless asked."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from bulkpool.models import Run, RunChunk, RunFailure

pytestmark = pytest.mark.django_db


def journal(run_id: str, *, days_old: int, status: str = Run.Status.FINISHED) -> Run:
    """A run last updated ``days_old`` days ago, with one chunk and one failure."""
    run = Run.objects.create(run_id=run_id, func="tests.jobs.write_marker", chunk_size=10, status=status)
    chunk = RunChunk.objects.create(run=run, start=0, size=10, digest="x", ok=9, failed=1)
    RunFailure.objects.create(chunk=chunk, index=3, item="3", exc_type="ValueError", message="no")
    # update() skips auto_now, which would stamp the row with now.
    Run.objects.filter(pk=run.pk).update(updated_at=timezone.now() - timedelta(days=days_old))
    return run


def prune(*args: str) -> str:
    out = StringIO()
    call_command("bulkpool", "prune", *args, stdout=out)
    return out.getvalue()


def remaining() -> set[str]:
    return set(Run.objects.values_list("run_id", flat=True))


def test_prune_deletes_old_finished_runs_with_their_chunks_and_failures():
    """Finished runs older than DAYS go with their chunks and failures; the others stay."""
    journal("old", days_old=40)
    journal("recent", days_old=2)
    journal("old-unfinished", days_old=40, status=Run.Status.INTERRUPTED)
    output = prune("--older-than", "30")
    assert remaining() == {"recent", "old-unfinished"}
    assert RunChunk.objects.count() == RunFailure.objects.count() == 2
    assert "Deleted 1 finished runs not updated for 30 days (1 chunks, 1 failed items)." in output
    assert "Kept 1 unfinished runs" in output and "--include-unfinished" in output


def test_prune_include_unfinished_deletes_those_too():
    """--include-unfinished also deletes old runs that did not finish."""
    journal("old", days_old=40)
    journal("old-interrupted", days_old=40, status=Run.Status.INTERRUPTED)
    journal("old-running", days_old=40, status=Run.Status.RUNNING)
    journal("recent-running", days_old=1, status=Run.Status.RUNNING)
    output = prune("--older-than", "30", "--include-unfinished")
    assert remaining() == {"recent-running"}
    assert "Deleted 3 runs not updated for 30 days (3 chunks, 3 failed items)." in output


def test_prune_dry_run_deletes_nothing():
    """--dry-run says how many would go and leaves every row."""
    journal("old", days_old=40)
    output = prune("--older-than", "30", "--dry-run")
    assert remaining() == {"old"} and RunFailure.objects.count() == 1
    assert "Would delete 1 finished runs" in output


def test_prune_needs_a_whole_number_of_days():
    """--older-than is required and must be a whole number."""
    with pytest.raises(CommandError, match="older-than"):
        call_command("bulkpool", "prune")
    with pytest.raises(CommandError, match="not a whole number"):
        call_command("bulkpool", "prune", "--older-than", "soon")
