"""The run journal in the Django admin: a read-only list of runs and a page per run.

- The list: run id, status, what every attempt together has done (from the committed
  chunks), the last attempt's counts, the rate and the times; filtered by status, searched
  by ``run_id``. The action "Download failures" gives the selected runs' failed items as
  JSON Lines, with the keys of a rejects file (``index``, ``item``, ``exc_type``,
  ``message``) plus ``run_id``.
- The page of a run: its fields, the sizes its chunks held, its failed items (paginated,
  with tracebacks; the item column wraps) and the command that resumes it (none once it
  finished). Counts read ``1,234`` throughout, as ``bulkpool show`` writes them
  (``bulkpool.display``).

Journal rows are written by runs only: nobody adds, edits or deletes them here (``bulkpool
prune`` removes old runs). Staff with the "view run" permission see the pages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from django.contrib import admin
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from bulkpool import display
from bulkpool.journal import recorded_failures
from bulkpool.models import Run, RunFailure, RunQuerySet
from bulkpool.reporting import reject_line
from bulkpool.status import STALE

FAILURES_PER_PAGE = 50
FAILURES_PAGE_VAR = "failures"  # not "p", which the changelist uses


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = [
        "run_id",
        "state",
        "items_done",
        "ok_done",
        "failed_done",
        "last_attempt",
        "rate",
        "started_at",
        "updated_at",
        "finished_at",
    ]
    list_filter = ["status"]
    search_fields = ["run_id"]
    actions = ["download_failures"]
    fieldsets = [
        (None, {"fields": ["run_id", "state", "held_by", "func", "chunks", "attempt_count"]}),
        ("All attempts (committed chunks)", {"fields": ["items_done", "ok_done", "failed_done"]}),
        ("Last attempt", {"fields": ["read_last", "ok_last", "failed_last", "skipped_last"]}),
        ("Times", {"fields": ["started_at", "updated_at", "finished_at", "rate"]}),
        ("Resume", {"fields": ["resume_command"]}),
    ]
    readonly_fields = [
        "state",
        "held_by",
        "chunks",
        "attempt_count",
        "items_done",
        "ok_done",
        "failed_done",
        "read_last",
        "ok_last",
        "failed_last",
        "skipped_last",
        "rate",
        "resume_command",
    ]
    change_form_template = "admin/bulkpool/run/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        return cast(RunQuerySet, super().get_queryset(request)).with_totals()

    # -- read-only ---------------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # -- columns -----------------------------------------------------------------------------

    @admin.display(description="items done", ordering="done_items")
    def items_done(self, run: Any) -> str:
        return display.count(run.done_items)

    @admin.display(description="ok", ordering="done_ok")
    def ok_done(self, run: Any) -> str:
        return display.count(run.done_ok)

    @admin.display(description="failed", ordering="done_failed")
    def failed_done(self, run: Any) -> str:
        return display.count(run.done_failed)

    @admin.display(description="status", ordering="status")
    def state(self, run: Run) -> str:
        """The status, or "Stale" for a run whose caller stopped renewing its lease."""
        return "Stale" if run.state == STALE else run.get_status_display()

    @admin.display(description="held by")
    def held_by(self, run: Run) -> str:
        return display.holder(run) or "-"

    @admin.display(description="chunks done")
    def chunks(self, run: Run) -> str:
        return display.chunks_held(run)

    @admin.display(description="attempts")
    def attempt_count(self, run: Run) -> str:
        return display.count(run.attempts)

    @admin.display(description="items read")
    def read_last(self, run: Run) -> str:
        return display.count(run.total)

    @admin.display(description="ok")
    def ok_last(self, run: Run) -> str:
        return display.count(run.ok)

    @admin.display(description="failed")
    def failed_last(self, run: Run) -> str:
        return display.count(run.failed)

    @admin.display(description="skipped (done before)")
    def skipped_last(self, run: Run) -> str:
        return display.count(run.skipped)

    @admin.display(description="last attempt")
    def last_attempt(self, run: Run) -> str:
        return (
            f"#{run.attempts}: {run.total:,} read, {run.ok:,} ok, "
            f"{run.failed:,} failed, {run.skipped:,} skipped"
        )

    @admin.display(description="items/s")
    def rate(self, run: Any) -> str:
        """Items done per second from the first start to the last update (pauses included)."""
        end = run.finished_at or run.updated_at
        seconds = (end - run.started_at).total_seconds() if end and run.started_at else 0.0
        if seconds <= 0 or not run.done_items:
            return "-"
        return f"{run.done_items / seconds:,.1f}"

    @admin.display(description="command that resumes it")
    def resume_command(self, run: Run) -> str:
        return display.resume_command(run) or "Finished: nothing to resume."

    # -- the page of a run: its failures ------------------------------------------------------

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> Any:
        if obj is not None:
            failures = RunFailure.objects.using(obj._state.db).filter(chunk__run=obj).order_by("index")
            paginator = Paginator(failures, FAILURES_PER_PAGE)
            page = paginator.get_page(request.GET.get(FAILURES_PAGE_VAR))
            context.update(
                failures_count=display.count(paginator.count),
                failures_first=display.count(page.start_index()),
                failures_last=display.count(page.end_index()),
                failures_page=page,
                failures_page_var=FAILURES_PAGE_VAR,
                failures_page_range=paginator.get_elided_page_range(page.number),
            )
        return super().render_change_form(request, context, add, change, form_url, obj)

    # -- the action ----------------------------------------------------------------------------

    @admin.action(description="Download failures (JSON Lines)", permissions=["view"])
    def download_failures(self, request: HttpRequest, queryset: QuerySet[Run]) -> StreamingHttpResponse:
        # The action's queryset is grouped (with_totals): take plain primary keys from it.
        pks = list(queryset.values_list("pk", flat=True))
        response = StreamingHttpResponse(
            failure_lines(queryset.db, pks), content_type="application/jsonl; charset=utf-8"
        )
        response["Content-Disposition"] = 'attachment; filename="bulkpool-failures.jsonl"'
        return response


def failure_lines(database: str, run_pks: list[Any]) -> Iterator[str]:
    """One JSON line per failed item of these runs, by run id and input index: the lines of a
    rejects file, with their run_id."""
    for run_id, failure in recorded_failures(database, run_pks):
        yield reject_line(failure, run_id=run_id)
