"""``bulkpool runs``, ``show``, ``rejects`` and ``prune``: the run journal, read (and pruned)
from the command line.

The journal's models (``bulkpool.models``) and what it says about a run
(``bulkpool.display``) are the library's; this module lays them out as lines, and turns a
journal that is missing from the database into a usage error that says to migrate.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, transaction
from django.utils import timezone

from bulkpool import display
from bulkpool.journal import recorded_failures
from bulkpool.management.exit_status import USAGE
from bulkpool.reporting import reject_line


class JournalViews:
    """The journal's subcommands, writing to the command's stdout and stderr in its style."""

    def __init__(self, command: BaseCommand) -> None:
        self.stdout, self.stderr, self.style = command.stdout, command.stderr, command.style

    def rejects(self, options: dict[str, Any]) -> None:
        alias = options["database"]
        run = _one_run(options["run_id"], alias)
        lines = _reject_lines(run, alias)
        if options["output"] == "-":
            for line in lines:
                self.stdout.write(line, ending="")
            return
        with open(options["output"], "w", encoding="utf-8") as file:
            written = sum(file.write(line) > 0 for line in lines)
        self.stderr.write(
            f"Wrote {written:,} failures of {run.run_id} to {options['output']}: fix the cause, then run "
            f"them again with --input {shlex.quote(options['output'])}."
        )

    def runs(self, options: dict[str, Any]) -> None:
        from bulkpool.models import Run

        runs = Run.objects.using(options["database"]).with_totals().order_by("-started_at")
        if options["unfinished"]:
            runs = runs.unfinished()
        rows = [
            [
                run.run_id,
                run.state,
                display.count(run.done_items),
                display.count(run.done_ok),
                display.count(run.done_failed),
                f"#{run.attempts}: {run.ok:,} ok, {run.failed:,} failed, {run.skipped:,} skipped",
                _when(run.started_at),
                run.func,
            ]
            for run in _journal(runs, options["database"])
        ]
        if not rows:
            self.stdout.write("No unfinished runs." if options["unfinished"] else "No journaled runs.")
            return
        # DONE / OK / FAILED: what every attempt together committed; then the last attempt.
        header = ["RUN ID", "STATUS", "DONE", "OK", "FAILED", "LAST ATTEMPT", "STARTED", "FUNCTION"]
        for line in _table(header, rows, right={2, 3, 4}):
            self.stdout.write(line)

    def show(self, options: dict[str, Any]) -> None:
        from bulkpool.models import Run, RunFailure

        alias = options["database"]
        run = _one_run(options["run_id"], alias)
        totals = Run.objects.using(alias).with_totals().get(pk=run.pk)
        failures = RunFailure.objects.using(alias).filter(chunk__run=run).order_by("index")
        failure_count = failures.count()
        self._show_run(run, totals)
        self._show_failures(failures, failure_count, options["limit"])

    def _show_run(self, run: Any, totals: Any) -> None:
        """The run's state, what every attempt did and what the last one did, how to resume it."""
        from bulkpool.models import Run

        status_style = self.style.SUCCESS if run.status == Run.Status.FINISHED else self.style.WARNING
        self.stdout.write(f"Run {run.run_id}: {run.state}", status_style)
        count = display.count
        for label, value in [
            ("function", run.func),
            *([("held by", holder)] if (holder := display.holder(run)) else []),
            ("attempts", count(run.attempts)),
            (
                "all attempts",
                f"{count(totals.done_items)} items done: {count(totals.done_ok)} ok, "
                f"{count(totals.done_failed)} failed",
            ),
            (
                "last attempt",
                f"{count(run.total)} items: {count(run.ok)} ok, {count(run.failed)} failed, "
                f"{count(run.skipped)} skipped",
            ),
            ("chunks done", f"{display.chunks_held(run)} ({count(totals.done_items)} items in all)"),
            ("started", _when(run.started_at)),
            ("updated", _when(run.updated_at)),
            ("finished", _when(run.finished_at)),
        ]:
            self.stdout.write(f"  {label + ':':<14}{value}")
        resume = display.resume_command(run)
        if resume is not None:
            self.stdout.write(f"  {'resume:':<14}{resume}")

    def _show_failures(self, failures: Any, failure_count: int, limit: int) -> None:
        """The first ``limit`` of the run's failures (0: all), in input order."""
        count = display.count
        if not failure_count:
            self.stdout.write("No failures.")
            return
        self.stdout.write(f"Failures ({count(failure_count)}):", self.style.WARNING)
        shown = failures if not limit else failures[:limit]
        for failure in shown:
            self.stdout.write(f"  item {failure.index}: {failure.exc_type}: {failure.message}")
            self.stdout.write(f"      {_cut(failure.item)}")
        hidden = failure_count - len(shown)
        if hidden > 0:
            self.stdout.write(f"  ... and {count(hidden)} more (--limit 0 shows all)")

    def prune(self, options: dict[str, Any]) -> None:
        from bulkpool.models import Run, RunChunk, RunFailure

        alias, days = options["database"], options["older_than"]
        old = Run.objects.using(alias).filter(updated_at__lt=timezone.now() - timedelta(days=days))
        runs = old if options["include_unfinished"] else old.finished()
        chunks = RunChunk.objects.using(alias).filter(run__in=runs)
        failures = RunFailure.objects.using(alias).filter(chunk__in=chunks)
        try:
            with transaction.atomic(using=alias):
                counts = runs.count(), chunks.count(), failures.count()
                kept = 0 if options["include_unfinished"] else old.unfinished().count()
                if not options["dry_run"]:
                    # Leaves first: a cascade from the runs would load every chunk into memory.
                    failures.delete()
                    chunks.delete()
                    runs.delete()
        except DatabaseError as error:
            raise CommandError(_migrate_hint(alias, str(error).strip()), returncode=USAGE) from None
        verb = "Would delete" if options["dry_run"] else "Deleted"
        which = "runs" if options["include_unfinished"] else "finished runs"
        self.stdout.write(
            f"{verb} {counts[0]:,} {which} not updated for {days} days "
            f"({counts[1]:,} chunks, {counts[2]:,} failed items)."
        )
        if kept:
            self.stdout.write(
                f"Kept {kept:,} unfinished runs as old, which can still be resumed: "
                "--include-unfinished deletes them too."
            )


def _reject_lines(run: Any, alias: str) -> Iterator[str]:
    """The run's recorded failures as rejects-file lines, in input order."""
    for run_id, failure in recorded_failures(alias, [run.pk]):
        yield reject_line(failure, run_id=run_id)


def _one_run(run_id: str, alias: str) -> Any:
    """The journaled run named ``run_id``, or a usage error that says how to find one."""
    from bulkpool.models import Run

    run = next(_journal(Run.objects.using(alias).filter(run_id=run_id), alias), None)
    if run is None:
        raise CommandError(
            f"No journaled run {run_id!r} in database {alias!r}: `bulkpool runs` lists the runs there are.",
            returncode=USAGE,
        )
    return run


def _journal(queryset: Any, alias: str) -> Iterator[Any]:
    """Iterate a journal query; a missing table becomes a usage error that says to migrate."""
    try:
        rows = list(queryset)
    except DatabaseError as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CommandError(_migrate_hint(alias, why), returncode=USAGE) from None
    return iter(rows)


def _migrate_hint(alias: str, why: str) -> str:
    return (
        f"Cannot read the run journal in database {alias!r} ({why}): "
        f"run `python manage.py migrate bulkpool --database {alias}`."
    )


def _when(value: Any) -> str:
    if value is None:
        return "-"
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    return str(value.strftime("%Y-%m-%d %H:%M:%S"))


def _cut(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> Iterator[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        yield "  ".join(cells).rstrip()
