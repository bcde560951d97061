"""``manage.py bulkpool``: run a function over the items of a file, or upsert its rows; list
and show journaled runs.

Thin: it parses the command line, calls ``bulkpool.run`` (or ``bulkpool.upsert``) and maps
the outcome to an exit status. The work lives in the library (``bulkpool.run``,
``bulkpool.operations``, ``bulkpool.inputs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, DatabaseError, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

import bulkpool
from bulkpool import display
from bulkpool.api import build_engine
from bulkpool.errors import (
    ConfigurationError,
    InputError,
    InputFailed,
    ResumeRefused,
    RunAborted,
    RunInterrupted,
    WorkerStartupError,
)
from bulkpool.inputs import FORMATS, STDIN, open_input
from bulkpool.operations import run_upsert
from bulkpool.options import table

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130

HELP = """\
Run a function over the items of a file, concurrently, and look at journaled runs.

  bulkpool run myapp.jobs.import_user --input users.csv --workers 4 --run-id users-2024
  bulkpool upsert myapp.Customer --key email --input customers.csv [--update-fields name,phone]
  bulkpool runs [--unfinished]
  bulkpool show RUN_ID
  bulkpool prune --older-than DAYS [--include-unfinished] [--dry-run]

Exit status: 0 all done, 1 some items failed, 2 usage error (bad flags, bad input,
unknown function), 130 interrupted. Needs "bulkpool" in INSTALLED_APPS (that is how Django
finds this command), and its migration for --run-id, runs and show.
"""

UPSERT_HELP = """\
Create or update one MODEL object per row of --input (each row a dict of field values),
keyed on --key, with save(), signals (created right for each row) and many-to-many values:
bulkpool.upsert. An existing object gets the row's values (only --update-fields, if given).
"""

RUN_HELP = """\
Call FUNC(item) -- FUNC(item, state) with --setup -- for every item of --input,
concurrently, and print the report. CSV rows come as dicts of strings; JSON Lines and
JSON arrays as their values. A rejects file (--rejects) given back as --input runs just
the items that failed.
"""


def positive_int(text: str) -> int:
    return _whole_number(text, minimum=1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, minimum=0)


def size(text: str) -> int | str:
    """A whole number, 1 or more, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return _whole_number(text, minimum=1)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a whole number, 1 or more") from None


def delimiter(text: str) -> str:
    """One character; ``tab`` or ``\\t`` for a tab (a shell passes neither easily as it is)."""
    value = "\t" if text in ("tab", "\\t") else text
    if len(value) != 1 or value in '"\r\n':
        raise argparse.ArgumentTypeError(f"{text!r} is not one character (tab: --delimiter tab)")
    return value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number, {minimum} or more")
    return value


class Command(BaseCommand):
    help = HELP

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(
            dest="subcommand", required=True, metavar="{run,upsert,runs,show,rejects,prune}"
        )
        run = commands.add_parser(
            "run",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            help="Call a function for every item of a file.",
            description=RUN_HELP,
        )
        run.add_argument(
            "func", metavar="FUNC", help="Dotted path of the function, e.g. myapp.jobs.import_user."
        )
        _add_input_arguments(run)
        _add_option_flags(run)
        run.add_argument(
            "--queue",
            metavar="NAME",
            help="With --backend celery: the Celery queue the chunks go to (default: where the app "
            "routes bulkpool.run_chunk, else its default queue). Start the workers with -Q NAME.",
        )

        upsert = commands.add_parser(
            "upsert",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            help="Create or update one object per row of a file, keyed on --key.",
            description=UPSERT_HELP,
        )
        upsert.add_argument("model", metavar="MODEL", help="The model, as app_label.ModelName.")
        upsert.add_argument(
            "--key",
            required=True,
            type=names,
            metavar="FIELD[,FIELD]",
            help="The fields that find a row's object: a unique key of the model.",
        )
        upsert.add_argument(
            "--update-fields",
            type=names,
            metavar="FIELD[,FIELD]",
            help="What an existing object gets (default: every field the row gives).",
        )
        upsert.add_argument(
            "--fast", action="store_true", help="Bulk statements per chunk, every signal kept (fast=True)."
        )
        _add_input_arguments(upsert)
        _add_option_flags(upsert)

        runs = commands.add_parser("runs", help="List journaled runs, newest first.")
        runs.add_argument("--unfinished", action="store_true", help="Only runs that did not finish.")
        runs.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, metavar="ALIAS", help="Where the journal is."
        )

        show = commands.add_parser("show", help="Show one journaled run, with its failures.")
        show.add_argument("run_id", metavar="RUN_ID")
        show.add_argument(
            "--limit", type=non_negative_int, default=20, metavar="N", help="Failures to show (0: all)."
        )
        show.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, metavar="ALIAS", help="Where the journal is."
        )

        rejects = commands.add_parser(
            "rejects", help="Write every failure a journaled run recorded, as a rejects file (JSON Lines)."
        )
        rejects.add_argument("run_id", metavar="RUN_ID")
        rejects.add_argument(
            "--output", "-o", default="-", metavar="PATH", help="Where to write them (default: stdout)."
        )
        rejects.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, metavar="ALIAS", help="Where the journal is."
        )

        prune = commands.add_parser(
            "prune",
            help="Delete journaled runs not updated for DAYS days, with their chunks and failures.",
        )
        prune.add_argument(
            "--older-than", type=non_negative_int, required=True, metavar="DAYS", help="Age in days."
        )
        prune.add_argument(
            "--include-unfinished",
            action="store_true",
            help="Delete unfinished runs too (they can no longer be resumed).",
        )
        prune.add_argument("--dry-run", action="store_true", help="Only say how many runs would go.")
        prune.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, metavar="ALIAS", help="Where the journal is."
        )

        for sub in (run, upsert, runs, show, rejects, prune):
            _accept_base_options(sub)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            self._handle(options)
        except BrokenPipeError:  # `bulkpool runs | head`: the reader has all it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that Python's exit-time flush does not fail too
            raise SystemExit(OK) from None

    def _handle(self, options: dict[str, Any]) -> None:
        with _library_log(options["verbosity"], self.stderr):
            subcommand = options["subcommand"]
            if subcommand == "run":
                self.run(options)
            elif subcommand == "upsert":
                self.upsert(options)
            elif subcommand == "runs":
                self.runs(options)
            elif subcommand == "rejects":
                self.rejects(options)
            elif subcommand == "prune":
                self.prune(options)
            else:
                self.show(options)

    # -- run -------------------------------------------------------------------------------

    def run(self, options: dict[str, Any]) -> None:
        func = _import("FUNC", options["func"])

        def start(source: Any, given: dict[str, Any]) -> bulkpool.Report:
            return build_engine(func, source, given, resume_hint=_resume_hint(options)).run()

        self._run(options, start)

    def upsert(self, options: dict[str, Any]) -> None:
        def start(source: Any, given: dict[str, Any]) -> bulkpool.Report:
            return run_upsert(
                options["model"], source, options["key"], options["update_fields"],
                fast=options["fast"], given=given, resume_hint=_resume_hint(options),
            )  # fmt: skip

        self._run(options, start)

    def _run(self, options: dict[str, Any], start: Callable[[Any, dict[str, Any]], bulkpool.Report]) -> None:
        """Open --input, run, write the report; every outcome mapped to its exit status."""
        given = _run_options(options)
        if options["queue"] is not None:
            if options["backend"] != "celery":
                raise CommandError(
                    "--queue is the Celery queue: pass --backend celery too.", returncode=USAGE
                )
            given["backend"] = bulkpool.CeleryExecutor(queue=options["queue"])
        if options["dry_run"] and options["backend"] is None:
            given["backend"] = "serial"  # one transaction: it sees what chunks do to each other
        _check_rejects_path(options["input"], options["rejects"])
        try:
            source = open_input(
                options["input"],
                options["format"],
                include_unsafe=options["include_unsafe"],
                on_bad_line=options["on_bad_line"],
                delimiter=options["delimiter"],
                field_size_limit=options["field_size_limit"],
            )
        except InputError as error:
            raise CommandError(str(error), returncode=USAGE) from None
        with source:
            try:
                report = start(source, given)
            except ConfigurationError as error:  # ResumeRefused too: the input is not the one recorded
                if isinstance(error, ResumeRefused):
                    self._write_report(error.report, options)
                raise CommandError(str(error).split("\n\n")[0], returncode=USAGE) from None
            except WorkerStartupError as error:
                raise CommandError(self._startup_message(error, options), returncode=USAGE) from None
            except InputFailed as failed:  # a bad line mid-run: what came before it ran
                self._write_report(failed.report, options)
                cause = failed.__cause__
                if isinstance(cause, InputError):
                    raise CommandError(
                        _input_stopped(cause, failed.report, options), returncode=USAGE
                    ) from None
                raise CommandError(str(failed).split("\n\n")[0], returncode=USAGE) from None
            except RunAborted as aborted:  # on_error="raise" or max_failures: the report says what ran
                self._write_report(aborted.report, options)
                raise SystemExit(FAILED) from None
            except RunInterrupted:  # the library has logged the report and how to resume
                raise SystemExit(INTERRUPTED) from None
        self._write_report(report, options)
        if source.unsafe_skipped:
            self.stdout.write(
                f"{source.unsafe_skipped:,} items of {options['input']} are marked unsafe: they may have "
                "been written (their COMMIT's outcome is unknown), so they were not run again. Check "
                "them, then pass --include-unsafe to run them anyway.",
                self.style.WARNING,
            )
        if source.unreadable_skipped:
            self.stdout.write(
                f"{source.unreadable_skipped:,} lines of {options['input']} are lines the input could not "
                "read: they hold no item to run again. Fix them in the original file.",
                self.style.WARNING,
            )
        if report.failed:
            raise SystemExit(FAILED)

    def _write_report(self, report: bulkpool.Report, options: dict[str, Any]) -> None:
        style = self.style.SUCCESS if not report.failed and not report.stopped_early else self.style.WARNING
        self.stdout.write(str(report), style)
        if options["dry_run"]:
            self.stdout.write("Dry run: every transaction was rolled back; nothing was written.")
        if report.failed and options["rejects"]:
            self.stdout.write(
                f"The failed items are in {options['rejects']}: fix the cause, then run them again "
                f"with --input {shlex.quote(options['rejects'])}."
            )

    def _startup_message(self, error: WorkerStartupError, options: dict[str, Any]) -> str:
        if options["verbosity"] >= 2:
            return str(error)
        return f"{str(error).splitlines()[0]} (run with -v 2 to see the worker's traceback)"

    # -- runs, show and rejects ----------------------------------------------------------------

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
        if not failure_count:
            self.stdout.write("No failures.")
            return
        self.stdout.write(f"Failures ({count(failure_count)}):", self.style.WARNING)
        shown = failures if not options["limit"] else failures[: options["limit"]]
        for failure in shown:
            self.stdout.write(f"  item {failure.index}: {failure.exc_type}: {failure.message}")
            self.stdout.write(f"      {_cut(failure.item)}")
        hidden = failure_count - len(shown)
        if hidden > 0:
            self.stdout.write(f"  ... and {count(hidden)} more (--limit 0 shows all)")

    # -- prune -------------------------------------------------------------------------------

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
            raise CommandError(
                f"Cannot read the run journal in database {alias!r} ({str(error).strip()}): "
                f"run `python manage.py migrate bulkpool --database {alias}`.",
                returncode=USAGE,
            ) from None
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


# -- helpers ---------------------------------------------------------------------------------


def _reject_lines(run: Any, alias: str) -> Iterator[str]:
    """The run's recorded failures as rejects-file lines, in input order."""
    from bulkpool.models import RunFailure

    failures = RunFailure.objects.using(alias).filter(chunk__run=run).order_by("index")
    for failure in failures.iterator(chunk_size=2000):
        try:
            item = json.loads(failure.item)
        except ValueError:  # recorded as its repr: it was not JSON to begin with
            item = failure.item
        line = {
            "index": failure.index,
            "item": item,
            "exc_type": failure.exc_type,
            "message": failure.message,
            "run_id": run.run_id,
        }
        yield json.dumps(line, ensure_ascii=False) + "\n"


def _accept_base_options(parser: CommandParser) -> None:
    """Accept Django's common options after the subcommand too (``run f --input x -v 2``).

    argparse hands every argument after the subcommand's name to the subcommand's parser;
    SUPPRESS keeps the top-level values when they are not repeated there.
    """
    suppress = argparse.SUPPRESS
    parser.add_argument("-v", "--verbosity", type=int, choices=[0, 1, 2, 3], default=suppress, help=suppress)
    parser.add_argument("--settings", default=suppress, help=suppress)
    parser.add_argument("--pythonpath", default=suppress, help=suppress)
    for flag in ("--traceback", "--no-color", "--force-color", "--skip-checks"):
        parser.add_argument(flag, action="store_true", default=suppress, help=suppress)


def _import(what: str, path: str) -> Callable[..., Any]:
    try:
        value = import_string(path)
    except ImportError as error:
        raise CommandError(
            f"{what} {path!r} cannot be imported: {error}. Give a dotted path such as "
            "myapp.jobs.import_user, importable from this project.",
            returncode=USAGE,
        ) from None
    if not callable(value):
        raise CommandError(
            f"{what} {path!r} is not a function (its type is {type(value).__name__}).", returncode=USAGE
        )
    return value


def _add_option_flags(parser: CommandParser) -> None:
    """A flag per row of the options table (``bulkpool.options``)."""
    for option in table():
        meta = option.metadata
        flag = "--" + option.name.replace("_", "-")
        if meta["cli"] is None:
            continue
        if meta["cli"] == "flag":
            parser.add_argument(flag, action="store_true", help=meta["help"])
        elif meta["cli"] == "switch":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=meta["help"])
        else:
            kinds = {"count": positive_int, "count0": non_negative_int, "size": size}
            parser.add_argument(
                flag,
                type=kinds.get(meta.get("kind", ""), str),
                choices=meta.get("choices"),
                metavar=None if meta.get("choices") else meta.get("metavar"),
                help=meta["help"],
            )


def _run_options(options: dict[str, Any]) -> dict[str, Any]:
    """``bulkpool.run`` options from the flags given; the library's defaults for the rest."""
    given: dict[str, Any] = {}
    for option in table():
        cli, value = option.metadata["cli"], options.get(option.name)
        if cli is None or value is None or (cli == "flag" and not value):
            continue
        if cli == "path":
            value = _import("--" + option.name.replace("_", "-"), value)
        given[option.name] = False if (option.name == "atomic" and value == "none") else value
    return given


def _check_rejects_path(input_path: str, rejects: str | None) -> None:
    """The rejects file is truncated when the run starts: it must not be the input."""
    if rejects is None or input_path == STDIN:
        return
    same = Path(rejects).resolve() == Path(input_path).resolve()
    if not same and Path(rejects).exists() and Path(input_path).exists():
        same = Path(rejects).samefile(input_path)
    if same:
        raise CommandError(
            f"--rejects {rejects} is the --input file, which the run would overwrite as it reads "
            "it: write the rejects to another file (e.g. rejects-2.jsonl).",
            returncode=USAGE,
        )


def _input_stopped(error: InputError, report: bulkpool.Report, options: dict[str, Any]) -> str:
    ran = report.total
    if options["run_id"]:
        then = (
            "Once it is fixed, run the same command again: with the same --run-id, what is done is skipped."
        )
    else:
        then = (
            f"Once it is fixed, run only the items after the first {ran:,}, since this run was not "
            "journaled (with --run-id, running the same command again would skip what is done)."
        )
    return f"{error} The run stopped there, after the {ran:,} items before it (report above). {then}"


def _resume_hint(options: dict[str, Any]) -> str:
    if not options["run_id"]:
        return (
            "This run was not journaled, so it cannot be resumed. Next time pass --run-id NAME: "
            "an interrupted run then resumes by running the same command again."
        )
    return f"To resume, run:\n  {_command_line(options)}"


def _what_runs(options: dict[str, Any]) -> list[str]:
    """The subcommand and its own arguments: ``run FUNC`` or ``upsert MODEL --key ...``."""
    if options.get("subcommand", "run") == "run":
        return ["run", options["func"]]
    words = ["upsert", options["model"], "--key", ",".join(options["key"])]
    if options["update_fields"] is not None:
        words += ["--update-fields", ",".join(options["update_fields"])]
    return [*words, "--fast"] if options["fast"] else words


def _command_line(options: dict[str, Any]) -> str:
    """The command line for these options, less those a resume must not repeat (--restart)."""
    words = ["python", "manage.py", "bulkpool", *_what_runs(options), "--input", options["input"]]
    if options["format"] is not None:
        words += ["--format", options["format"]]
    if options.get("on_bad_line", "stop") != "stop":
        words += ["--on-bad-line", options["on_bad_line"]]
    if options.get("delimiter") is not None:
        words += ["--delimiter", "tab" if options["delimiter"] == "\t" else options["delimiter"]]
    if options.get("field_size_limit") is not None:
        words += ["--field-size-limit", str(options["field_size_limit"])]
    for option in table():
        meta, value = option.metadata, options.get(option.name)
        if meta["cli"] is None or value is None or not meta.get("resume", True):
            continue
        flag = "--" + option.name.replace("_", "-")
        if meta["cli"] == "flag":
            words += [flag] if value else []
        elif meta["cli"] == "switch":
            words.append(flag if value else f"--no-{option.name.replace('_', '-')}")
        else:
            words += [flag, str(value)]
    if options.get("queue") is not None:
        words += ["--queue", options["queue"]]
    if options.get("settings"):
        words.append(f"--settings={options['settings']}")
    return shlex.join(words)


def _add_input_arguments(parser: CommandParser) -> None:
    """--input and how to read it: what run and upsert share."""
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help=f"CSV, JSON Lines or JSON array file, or {STDIN} for standard input. Read lazily.",
    )
    parser.add_argument(
        "--format", choices=FORMATS, help="Format of --input (default: from its extension; needed for -)."
    )
    parser.add_argument(
        "--on-bad-line",
        choices=("stop", "skip"),
        default="stop",
        help="A line of --input that cannot be read (CSV, JSON Lines): stop the run there "
        "(default), or skip it: it fails in the report and the rejects file, with its line.",
    )
    parser.add_argument(
        "--delimiter",
        type=delimiter,
        metavar="CHAR",
        help="The separator of a CSV --input (default: a comma); tab for a tab.",
    )
    parser.add_argument(
        "--field-size-limit",
        type=positive_int,
        metavar="N",
        help="The most characters a CSV field may hold (default: 131,072, csv's own limit).",
    )
    parser.add_argument(
        "--include-unsafe",
        action="store_true",
        help="With a rejects file as --input: also feed the items marked unsafe (they may "
        "have been written: a COMMIT whose outcome is unknown).",
    )


def names(text: str) -> list[str]:
    """A comma-separated list of field names."""
    found = [name.strip() for name in text.split(",") if name.strip()]
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names no field (give FIELD or FIELD,FIELD)")
    return found


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
        raise CommandError(
            f"Cannot read the run journal in database {alias!r} ({why}): "
            f"run `python manage.py migrate bulkpool --database {alias}`.",
            returncode=USAGE,
        ) from None
    return iter(rows)


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


@contextmanager
def _library_log(verbosity: int, stream: Any) -> Iterator[None]:
    """The "bulkpool" logger's messages on the command's stderr, once (not also through the
    root logger): warnings always, with ``-v 2`` and up everything from DEBUG, time-stamped."""
    logger = logging.getLogger("bulkpool")
    handler = logging.StreamHandler(stream)
    saved = logger.level, logger.propagate
    if verbosity >= 2:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.setLevel(logging.DEBUG)
    else:
        handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
