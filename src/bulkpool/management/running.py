"""``bulkpool run`` and ``bulkpool upsert``: open --input, run, write the report, and map
every way a run ends to the command's exit status (``exit_status.py``).

The work lives in the library (``bulkpool.api``, ``bulkpool.operations``,
``bulkpool.inputs``); this module only turns the parsed flags into its arguments, and its
outcomes and exceptions into lines and exit statuses.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.module_loading import import_string

import bulkpool
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
from bulkpool.inputs import STDIN, Input, open_input
from bulkpool.management.exit_status import FAILED, INTERRUPTED, USAGE
from bulkpool.operations import run_upsert
from bulkpool.options import table

Start = Callable[[Input, dict[str, Any]], bulkpool.Report]


class RunAndUpsert:
    """The ``run`` and ``upsert`` subcommands, writing to the command's stdout in its style."""

    def __init__(self, command: BaseCommand) -> None:
        self.stdout, self.style = command.stdout, command.style

    def run(self, options: dict[str, Any]) -> None:
        func = _import("FUNC", options["func"])

        def start(source: Input, given: dict[str, Any]) -> bulkpool.Report:
            return build_engine(func, source, given, resume_hint=_resume_hint(options)).run()

        self._run(options, start)

    def upsert(self, options: dict[str, Any]) -> None:
        def start(source: Input, given: dict[str, Any]) -> bulkpool.Report:
            return run_upsert(
                options["model"], source, options["key"], options["update_fields"],
                fast=options["fast"], given=given, resume_hint=_resume_hint(options),
            )  # fmt: skip

        self._run(options, start)

    def _run(self, options: dict[str, Any], start: Start) -> None:
        """Open --input, run, write the report; every outcome mapped to its exit status."""
        given = _run_options(options)
        _choose_backend(given, options)
        _check_rejects_path(options["input"], options["rejects"])
        source = _open(options)
        with source:
            report = self._report_or_exit(start, source, given, options)
        self._write_report(report, options)
        self._warn_skipped(source, options)
        if report.failed:
            raise SystemExit(FAILED)

    def _report_or_exit(
        self, start: Start, source: Input, given: dict[str, Any], options: dict[str, Any]
    ) -> bulkpool.Report:
        """Run; a run the library stopped becomes its exit status, after the report of what ran."""
        try:
            return start(source, given)
        except ConfigurationError as error:  # ResumeRefused too: the input is not the one recorded
            if isinstance(error, ResumeRefused):
                self._write_report(error.report, options)
            raise CommandError(str(error).split("\n\n")[0], returncode=USAGE) from None
        except WorkerStartupError as error:
            raise CommandError(_startup_message(error, options), returncode=USAGE) from None
        except InputFailed as failed:  # a bad line mid-run: what came before it ran
            self._write_report(failed.report, options)
            cause = failed.__cause__
            if isinstance(cause, InputError):
                raise CommandError(_input_stopped(cause, failed.report, options), returncode=USAGE) from None
            raise CommandError(str(failed).split("\n\n")[0], returncode=USAGE) from None
        except RunAborted as aborted:  # on_error="raise" or max_failures: the report says what ran
            self._write_report(aborted.report, options)
            raise SystemExit(FAILED) from None
        except RunInterrupted:  # the library has logged the report and how to resume
            raise SystemExit(INTERRUPTED) from None

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

    def _warn_skipped(self, source: Input, options: dict[str, Any]) -> None:
        """Say which lines of a rejects file given as --input were not run, and what to do."""
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


def _choose_backend(given: dict[str, Any], options: dict[str, Any]) -> None:
    """The executor that --queue and --dry-run imply, where --backend leaves it open."""
    queue = options.get("queue")  # a flag of run's only: upsert has none
    if queue is not None:
        if options["backend"] != "celery":
            raise CommandError("--queue is the Celery queue: pass --backend celery too.", returncode=USAGE)
        given["backend"] = bulkpool.CeleryExecutor(queue=queue)
    if options["dry_run"] and options["backend"] is None:
        given["backend"] = "serial"  # one transaction: it sees what chunks do to each other


def _open(options: dict[str, Any]) -> Input:
    """--input, read as the flags say; a file that cannot be opened is a usage error."""
    try:
        return open_input(
            options["input"],
            options["format"],
            include_unsafe=options["include_unsafe"],
            on_bad_line=options["on_bad_line"],
            delimiter=options["delimiter"],
            field_size_limit=options["field_size_limit"],
        )
    except InputError as error:
        raise CommandError(str(error), returncode=USAGE) from None


def _startup_message(error: WorkerStartupError, options: dict[str, Any]) -> str:
    if options["verbosity"] >= 2:
        return str(error)
    return f"{str(error).splitlines()[0]} (run with -v 2 to see the worker's traceback)"


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
    return f"To resume, run:\n  {command_line(options)}"


def _what_runs(options: dict[str, Any]) -> list[str]:
    """The subcommand and its own arguments: ``run FUNC`` or ``upsert MODEL --key ...``."""
    if options.get("subcommand", "run") == "run":
        return ["run", options["func"]]
    words = ["upsert", options["model"], "--key", ",".join(options["key"])]
    if options["update_fields"] is not None:
        words += ["--update-fields", ",".join(options["update_fields"])]
    return [*words, "--fast"] if options["fast"] else words


def command_line(options: dict[str, Any]) -> str:
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
