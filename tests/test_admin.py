"""The run journal in the Django admin, through Django's test client (the browser test is
tests/test_admin_browser.py)."""

from __future__ import annotations

import datetime
import json
import re
from io import StringIO
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

import bulkpool
from bulkpool.admin import FAILURES_PER_PAGE, RunAdmin
from bulkpool.inputs import open_input
from bulkpool.models import Run, RunChunk, RunFailure
from bulkpool.status import STALE_AFTER_SECONDS
from tests import jobs

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:bulkpool_run_changelist"


def make_run(run_id: str, *, status: str = Run.Status.FINISHED, chunks: int = 0, failures: int = 0, **fields):
    """A journal as a run leaves it: ``chunks`` chunks of 10 items, ``failures`` of them failed."""
    run = Run.objects.create(
        run_id=run_id, func="tests.jobs.write_marker", chunk_size=10, status=status, **fields
    )
    for number in range(chunks):
        failed = min(10, max(0, failures - number * 10))
        chunk = RunChunk.objects.create(
            run=run, start=number * 10, size=10, digest="x", ok=10 - failed, failed=failed
        )
        RunFailure.objects.bulk_create(
            RunFailure(
                chunk=chunk,
                index=number * 10 + offset,
                item=json.dumps({"username": f"user{number * 10 + offset}"}),
                exc_type="django.db.utils.IntegrityError",
                message=f"duplicate key {number * 10 + offset}",
                traceback="Traceback (most recent call last):\n  ...",
            )
            for offset in range(failed)
        )
    return run


def run_ids_listed(response: Any) -> list[str]:
    """The run ids in the changelist's rows, in order."""
    return [
        re.sub(r"<[^>]+>", "", cell)
        for cell in re.findall(r'<th class="field-run_id">(.*?)</th>', response.content.decode())
    ]


def streamed(response: Any) -> bytes:
    """The body of a streaming response."""
    assert response.streaming, "expected a streamed download"
    return b"".join(response.streaming_content)


def failure_indexes(html: str) -> list[int]:
    """The input indexes of the failed items on a run's page, in order."""
    return [int(index) for index in re.findall(r'<tr class="bulkpool-failure">\s*<td>(\d+)</td>', html)]


def changelist_row(response: Any, run_id: str) -> str:
    html = response.content.decode()
    for row in re.findall(r"<tr>(.*?)</tr>", html, flags=re.S):
        if f">{run_id}<" in row:
            return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", row)).strip()
    raise AssertionError(f"no row for {run_id} in the changelist")


def test_run_admin_passes_the_admin_checks():
    """RunAdmin is registered and Django's admin system checks find nothing wrong with it."""
    model_admin = admin.site._registry[Run]
    assert isinstance(model_admin, RunAdmin)
    assert model_admin.check() == []


def test_with_totals_sums_every_attempts_chunks():
    """with_totals() adds up the committed chunks; a run without chunks gets zeros."""
    make_run("two-chunks", chunks=2, failures=3)
    make_run("no-chunks")
    totals = {run.run_id: (run.done_items, run.done_ok, run.done_failed) for run in Run.objects.with_totals()}
    assert totals == {"two-chunks": (20, 17, 3), "no-chunks": (0, 0, 0)}


def test_changelist_shows_totals_across_attempts_and_the_last_attempt(admin_client: Client):
    """A resumed run: the list shows what all attempts did and what the last one did."""
    bulkpool.run(jobs.fail_multiples_of_7, range(30), backend="serial", chunk_size=10, run_id="resumed")
    Run.objects.filter(run_id="resumed").update(status=Run.Status.INTERRUPTED)
    # The second attempt finds every chunk done.
    bulkpool.run(jobs.fail_multiples_of_7, range(30), backend="serial", chunk_size=10, run_id="resumed")
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    row = changelist_row(response, "resumed")
    # All attempts: 30 items, 0 7 14 21 28 failed; the last attempt ran nothing: it reports
    # the failures recorded before as failed, and the rest as skipped.
    assert "resumed Finished 30 25 5 #2: 30 read, 0 ok, 5 failed, 25 skipped" in row


def test_changelist_searches_by_run_id(admin_client: Client):
    """?q= finds runs by run_id."""
    for run_id in ("users-2026-11", "users-2026-12", "orders-2026-11"):
        make_run(run_id)
    response = admin_client.get(reverse(CHANGELIST), {"q": "users"})
    assert sorted(run_ids_listed(response)) == ["users-2026-11", "users-2026-12"]


def test_changelist_filters_by_status(admin_client: Client):
    """The status filter keeps only runs in that status, and the sidebar offers every status."""
    make_run("done", status=Run.Status.FINISHED)
    make_run("cut", status=Run.Status.INTERRUPTED)
    make_run("stopped", status=Run.Status.STOPPED)
    response = admin_client.get(reverse(CHANGELIST), {"status__exact": "interrupted"})
    assert run_ids_listed(response) == ["cut"]
    html = response.content.decode()
    for status in Run.Status.values:
        assert f"?status__exact={status}" in html


def test_run_page_shows_its_failures_paginated(admin_client: Client):
    """The page of a run lists its failed items, FAILURES_PER_PAGE a page, in input order."""
    run = make_run("many-failures", chunks=12, failures=FAILURES_PER_PAGE * 2 + 7)
    make_run("other", chunks=1, failures=10)  # not on this run's page
    url = reverse("admin:bulkpool_run_change", args=[run.pk])
    first = admin_client.get(url).content.decode()
    last = admin_client.get(url, {"failures": 3}).content.decode()
    assert f"Failed items ({FAILURES_PER_PAGE * 2 + 7})" in first
    assert failure_indexes(first) == list(range(FAILURES_PER_PAGE))
    assert failure_indexes(last) == list(range(FAILURES_PER_PAGE * 2, FAILURES_PER_PAGE * 2 + 7))
    assert "duplicate key 0" in first and "Traceback (most recent call last)" in first
    assert "?failures=2" in first  # the page links


def test_run_page_shows_the_resume_command(admin_client: Client):
    """An unfinished run shows the recorded command (without the "To resume, run:" of the
    terminal's line), else how to resume with the run_id; a finished run has nothing to resume."""
    command = "python manage.py bulkpool run app.jobs.f --input u.csv --run-id from-cli"
    recorded = make_run("from-cli", status=Run.Status.INTERRUPTED, command=f"To resume, run:\n  {command}")
    unrecorded = make_run("from-code", status=Run.Status.INTERRUPTED)
    finished = make_run("done", command=f"To resume, run:\n  {command}")
    recorded_page = admin_client.get(
        reverse("admin:bulkpool_run_change", args=[recorded.pk])
    ).content.decode()
    unrecorded_page = admin_client.get(reverse("admin:bulkpool_run_change", args=[unrecorded.pk]))
    finished_page = admin_client.get(
        reverse("admin:bulkpool_run_change", args=[finished.pk])
    ).content.decode()
    assert command in recorded_page and "To resume, run:" not in recorded_page
    assert "Run the same call again with run_id=&#x27;from-code&#x27;" in unrecorded_page.content.decode()
    assert "No item failed." in unrecorded_page.content.decode()
    assert "Finished: nothing to resume." in finished_page
    assert command not in finished_page and "To resume" not in finished_page


def field_text(page: str, name: str) -> str:
    """The text of a read-only field on a run's page."""
    found = re.search(rf'class="[^"]*field-{name}[^"]*">(.*?)</div>\s*</div>', page, re.S)
    assert found, f"no field {name}"
    return " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())


def test_run_page_gives_the_sizes_chunks_held_and_counts_with_commas(admin_client: Client):
    """The sizes the run's chunks held (not the chunk_size it started with), and every count
    written 1,234, as `bulkpool show` writes them."""
    run = make_run("big", chunks=1, failures=1, total=123456, ok=123000, failed=456, skipped=2000, attempts=3)
    RunChunk.objects.create(run=run, start=10, size=1551, digest="x", ok=1551)
    page = admin_client.get(reverse("admin:bulkpool_run_change", args=[run.pk])).content.decode()
    assert field_text(page, "chunks").endswith("2 chunks of 10-1,551 items")
    assert field_text(page, "read_last").endswith("123,456")
    assert field_text(page, "ok_last").endswith("123,000")
    assert field_text(page, "skipped_last").endswith("2,000")
    assert field_text(page, "items_done").endswith("1,561")
    assert "123456" not in page and "1561" not in page


def test_the_item_column_wraps(admin_client: Client):
    """A long item without spaces wraps in its column instead of running off the page."""
    run = make_run("wide", chunks=1, failures=1)
    RunFailure.objects.filter(chunk__run=run).update(item="x" * 280)
    page = admin_client.get(reverse("admin:bulkpool_run_change", args=[run.pk])).content.decode()
    assert "table-layout: fixed" in page
    cell = re.search(r'<td class="bulkpool-item" style="([^"]*)"', page)
    assert cell and "overflow-wrap: anywhere" in cell.group(1)


def test_download_failures_gives_the_selected_runs_failures_as_json_lines(admin_client: Client):
    """The action streams one rejects-style JSON line per failed item of the selected runs only."""
    first = make_run("first", chunks=2, failures=12)
    second = make_run("second", chunks=1, failures=1)
    make_run("not-selected", chunks=1, failures=5)
    response = admin_client.post(
        reverse(CHANGELIST), {"action": "download_failures", "_selected_action": [first.pk, second.pk]}
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/jsonl")
    assert "attachment" in response["Content-Disposition"]
    lines = [json.loads(line) for line in streamed(response).decode().splitlines()]
    assert [(line["run_id"], line["index"]) for line in lines] == [("first", i) for i in range(12)] + [
        ("second", 0)
    ]
    assert lines[0] == {
        "index": 0,
        "item": {"username": "user0"},
        "exc_type": "django.db.utils.IntegrityError",
        "message": "duplicate key 0",
        "run_id": "first",
    }


def test_journal_rows_cannot_be_added_changed_or_deleted(admin_client: Client):
    """Even a superuser gets no add, change or delete: no buttons, no action, 403 on the URLs."""
    run = make_run("keep-me", chunks=1, failures=1)
    change_url = reverse("admin:bulkpool_run_change", args=[run.pk])
    assert admin_client.get(reverse("admin:bulkpool_run_add")).status_code == 403
    assert admin_client.get(reverse("admin:bulkpool_run_delete", args=[run.pk])).status_code == 403
    assert admin_client.post(change_url, {"run_id": "renamed", "status": "running"}).status_code == 403
    listing = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "delete_selected" not in listing and reverse("admin:bulkpool_run_add") not in listing
    page = admin_client.get(change_url).content.decode()
    assert 'name="_save"' not in page and "deletelink" not in page
    deleted = admin_client.post(
        reverse(CHANGELIST), {"action": "delete_selected", "_selected_action": [run.pk]}
    )
    assert deleted.status_code in (200, 302)
    assert Run.objects.filter(run_id="keep-me").exists() and RunFailure.objects.count() == 1


def test_staff_need_the_view_permission():
    """Staff with "view run" see the pages and may download; staff without it are refused."""
    run = make_run("watched", chunks=1, failures=2)
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    stranger = User.objects.create_user("stranger", password="pw", is_staff=True)
    client = Client()
    client.force_login(viewer)
    assert client.get(reverse(CHANGELIST)).status_code == 200
    assert client.get(reverse("admin:bulkpool_run_change", args=[run.pk])).status_code == 200
    download = client.post(reverse(CHANGELIST), {"action": "download_failures", "_selected_action": [run.pk]})
    assert len(streamed(download).splitlines()) == 2
    client.force_login(stranger)
    assert client.get(reverse(CHANGELIST)).status_code == 403
    assert client.get(reverse("admin:bulkpool_run_change", args=[run.pk])).status_code == 403


def test_downloaded_failures_feed_back_as_input(admin_client: Client, tmp_path):
    """The downloaded file is a rejects file: as input it gives back the failed items themselves."""
    run = make_run("to-retry", chunks=1, failures=3)
    response = admin_client.post(
        reverse(CHANGELIST), {"action": "download_failures", "_selected_action": [run.pk]}
    )
    path = tmp_path / "failures.jsonl"
    path.write_bytes(streamed(response))
    with open_input(path) as items:
        assert list(items) == [{"username": f"user{index}"} for index in range(3)]


@pytest.mark.django_db
def test_a_run_whose_caller_died_is_stale_in_the_admin_and_in_show(admin_client):
    """A run marked running whose lease lapsed shows as stale, with who held it, not as running."""
    lapsed = timezone.now() - datetime.timedelta(seconds=STALE_AFTER_SECONDS + 60)
    run = Run.objects.create(
        run_id="died", func="f", chunk_size=10, status=Run.Status.RUNNING, owner="box pid 7 (abc)",
        heartbeat_at=lapsed,
    )  # fmt: skip
    page = admin_client.get(f"/admin/bulkpool/run/{run.pk}/change/").content.decode()
    assert "Stale" in page and "box pid 7 (abc)" in page and "it is gone" in page
    listing = admin_client.get("/admin/bulkpool/run/").content.decode()
    assert '<td class="field-state">Stale</td>' in listing
    out = StringIO()
    call_command("bulkpool", "show", "died", stdout=out)
    assert "Run died: stale" in out.getvalue() and "held by:" in out.getvalue()
