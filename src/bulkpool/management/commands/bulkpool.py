"""``manage.py bulkpool``: run a function over the items of a file, or upsert its rows; list
and show journaled runs.

Thin: it parses the command line and hands each subcommand on -- ``run`` and ``upsert`` to
``bulkpool.management.running`` (which calls ``bulkpool.run`` or ``bulkpool.upsert`` and
maps the outcome to an exit status), the journal's ``runs``, ``show``, ``rejects`` and
``prune`` to ``bulkpool.management.journal_views``. The work lives in the library
(``bulkpool.run``, ``bulkpool.operations``, ``bulkpool.inputs``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import DEFAULT_DB_ALIAS

from bulkpool.inputs import FORMATS, STDIN
from bulkpool.management.exit_status import OK
from bulkpool.management.journal_views import JournalViews
from bulkpool.management.running import RunAndUpsert, command_line
from bulkpool.options import table

# The resume command line is built where the run is; the tests know it by this name.
_command_line = command_line

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


def names(text: str) -> list[str]:
    """A comma-separated list of field names."""
    found = [name.strip() for name in text.split(",") if name.strip()]
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names no field (give FIELD or FIELD,FIELD)")
    return found


class Command(BaseCommand):
    help = HELP

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(
            dest="subcommand", required=True, metavar="{run,upsert,runs,show,rejects,prune}"
        )
        for add in (_add_run, _add_upsert, _add_runs, _add_show, _add_rejects, _add_prune):
            _accept_base_options(add(commands))

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            self._handle(options)
        except BrokenPipeError:  # `bulkpool runs | head`: the reader has all it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that Python's exit-time flush does not fail too
            raise SystemExit(OK) from None

    def _handle(self, options: dict[str, Any]) -> None:
        with _library_log(options["verbosity"], self.stderr):
            self._subcommand(options["subcommand"])(options)

    def _subcommand(self, name: str) -> Callable[[dict[str, Any]], None]:
        running, views = RunAndUpsert(self), JournalViews(self)
        return {
            "run": running.run,
            "upsert": running.upsert,
            "runs": views.runs,
            "show": views.show,
            "rejects": views.rejects,
            "prune": views.prune,
        }[name]


# -- the parser ------------------------------------------------------------------------------

Subparsers = Any  # argparse's _SubParsersAction, which it does not export


def _add_run(commands: Subparsers) -> CommandParser:
    run: CommandParser = commands.add_parser(
        "run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="Call a function for every item of a file.",
        description=RUN_HELP,
    )
    run.add_argument("func", metavar="FUNC", help="Dotted path of the function, e.g. myapp.jobs.import_user.")
    _add_input_arguments(run)
    _add_option_flags(run)
    run.add_argument(
        "--queue",
        metavar="NAME",
        help="With --backend celery: the Celery queue the chunks go to (default: where the app "
        "routes bulkpool.run_chunk, else its default queue). Start the workers with -Q NAME.",
    )
    return run


def _add_upsert(commands: Subparsers) -> CommandParser:
    upsert: CommandParser = commands.add_parser(
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
    return upsert


def _add_runs(commands: Subparsers) -> CommandParser:
    runs: CommandParser = commands.add_parser("runs", help="List journaled runs, newest first.")
    runs.add_argument("--unfinished", action="store_true", help="Only runs that did not finish.")
    _add_database_argument(runs)
    return runs


def _add_show(commands: Subparsers) -> CommandParser:
    show: CommandParser = commands.add_parser("show", help="Show one journaled run, with its failures.")
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument(
        "--limit", type=non_negative_int, default=20, metavar="N", help="Failures to show (0: all)."
    )
    _add_database_argument(show)
    return show


def _add_rejects(commands: Subparsers) -> CommandParser:
    rejects: CommandParser = commands.add_parser(
        "rejects", help="Write every failure a journaled run recorded, as a rejects file (JSON Lines)."
    )
    rejects.add_argument("run_id", metavar="RUN_ID")
    rejects.add_argument(
        "--output", "-o", default="-", metavar="PATH", help="Where to write them (default: stdout)."
    )
    _add_database_argument(rejects)
    return rejects


def _add_prune(commands: Subparsers) -> CommandParser:
    prune: CommandParser = commands.add_parser(
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
    _add_database_argument(prune)
    return prune


def _add_database_argument(parser: CommandParser) -> None:
    parser.add_argument("--database", default=DEFAULT_DB_ALIAS, metavar="ALIAS", help="Where the journal is.")


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


# -- output ----------------------------------------------------------------------------------


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
