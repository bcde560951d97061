"""The options of a run: one frozen value, validated when built, so bad input fails before item one.

The dataclass is the one table of options: each field's metadata (``help``, and ``cli``
for how ``manage.py bulkpool run`` takes it) feeds the keyword arguments, the command's
flags and the command line that resumes a run. Add an option here and it is in all three.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from django.db import DEFAULT_DB_ALIAS, connections

from bulkpool.errors import ConfigurationError
from bulkpool.sizing import CEILING, TARGET_SECONDS

EARLY_STOP_AFTER = 100  # items that all fail alike before early_stop stops the run

Atomic = Literal["chunk", "item", False]
OnError = Literal["collect", "raise"]

BACKEND_NAMES = ("serial", "thread", "process", "celery", "tasks")
Size = int | Literal["auto"]


def _meta(help: str, cli: str | None = "value", **extra: Any) -> dict[str, Any]:
    """A row of the table. ``cli``: how the command takes it -- "value" (``--name X``),
    "flag" (``--name``), "switch" (``--name`` / ``--no-name``), "path" (a dotted path to
    import) or None (not on the command line). ``kind="count"``: a whole number, 1 or more
    ("count0": 0 or more). ``resume=False``: left out of the command line that resumes."""
    return {"help": help, "cli": cli, **extra}


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything that shapes a run except the function and the items."""

    backend: Any = field(
        default="process",
        metadata=_meta(
            "Where calls run: serial, thread, process, celery or tasks.",
            choices=BACKEND_NAMES,
            metavar="NAME",
        ),
    )
    workers: Size = field(
        default="auto",
        metadata=_meta(
            "Pool size, or auto (the default): measure the first chunks on one worker (never in "
            "the caller), then stay on it when concurrency would not pay, or grow the pool as wide "
            "as the work can use.",
            kind="size",
            metavar="N|auto",
        ),
    )
    chunk_size: Size = field(
        default="auto",
        metadata=_meta(
            "Items per unit of work, or auto (the default): sized from the pace measured, so that "
            f"a chunk takes about {TARGET_SECONDS:g} s, up to {CEILING:,} items.",
            kind="size",
            metavar="N|auto",
        ),
    )
    atomic: Atomic = field(
        default="chunk",
        metadata=_meta(
            "A transaction per chunk (default), per item, or none.",
            choices=("chunk", "item", "none"),
            metavar="MODE",
        ),
    )
    setup: Callable[[], Any] | None = field(
        default=None,
        metadata=_meta(
            "Run once per worker; its return value is FUNC's state.", cli="path", metavar="DOTTED_PATH"
        ),
    )
    prepare: Callable[..., Any] | None = field(
        default=None,
        metadata=_meta(
            "Run on the worker for each item, outside any transaction, before FUNC; FUNC gets "
            "what it returns (PREPARE(item), or PREPARE(item, state) with --setup).",
            cli="path",
            metavar="DOTTED_PATH",
        ),
    )
    on_error: OnError = field(
        default="collect",
        metadata=_meta(
            "Report failures and go on (collect, the default), or stop at the first (raise).",
            choices=("collect", "raise"),
            metavar="WHAT",
        ),
    )
    max_failures: int | None = field(
        default=None, metadata=_meta("Stop once N items failed.", kind="count", metavar="N")
    )
    retries: int = field(
        default=3,
        metadata=_meta(
            "Attempts for transient database errors and worker deaths (default: 3).",
            kind="count0",
            metavar="N",
        ),
    )
    progress: bool | None = field(
        default=None,
        metadata=_meta("Show a progress bar (default: when stderr is a terminal).", cli="switch"),
    )
    rejects: str | os.PathLike[str] | None = field(
        default=None,
        metadata=_meta("Write each failed item, with its error, as a JSON line.", metavar="PATH"),
    )
    database: str = field(
        default=DEFAULT_DB_ALIAS,
        metadata=_meta("The database whose transactions are managed.", metavar="ALIAS"),
    )
    run_id: str | None = field(
        default=None,
        metadata=_meta("Journal the run under this name: running it again resumes it.", metavar="ID"),
    )
    restart: bool = field(
        default=False,
        metadata=_meta("With run_id: forget what an earlier run of that name did.", cli="flag", resume=False),
    )
    retry_failed: bool = field(
        default=False,
        metadata=_meta(
            "With run_id: run again only the items it recorded as failed (after fixing the code "
            "or the data); their new outcome replaces the failure.",
            cli="flag",
            resume=False,
        ),
    )
    early_stop: bool = field(
        default=True,
        metadata=_meta(
            f"Stop when the first {EARLY_STOP_AFTER} items all fail with the same error: a mistake in the "
            "function or the columns, not in the data (--no-early-stop: run every item anyway).",
            cli="switch",
        ),
    )
    dry_run: bool = field(
        default=False, metadata=_meta("Do everything, then roll every transaction back.", cli="flag")
    )

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        _require(
            (isinstance(self.backend, str) and self.backend in BACKEND_NAMES)
            or hasattr(self.backend, "start"),
            f"backend={self.backend!r} is not a backend: use one of {', '.join(BACKEND_NAMES)}, "
            "or an executor instance such as ProcessExecutor(start_method='spawn').",
        )
        _require_size("workers", self.workers)
        _require_size("chunk_size", self.chunk_size)
        _require(
            self.atomic in ("chunk", "item", False),
            f"atomic={self.atomic!r}: use 'chunk' (one transaction per chunk), 'item' "
            "(one per item) or False (no transaction).",
        )
        _require(self.setup is None or callable(self.setup), "setup must be a callable or None.")
        _require(self.prepare is None or callable(self.prepare), "prepare must be a callable or None.")
        _require(
            self.on_error in ("collect", "raise"),
            f"on_error={self.on_error!r}: use 'collect' (report failures and go on) or 'raise'.",
        )
        if self.max_failures is not None:
            _require_positive_int("max_failures", self.max_failures)
        _require(
            isinstance(self.retries, int) and not isinstance(self.retries, bool) and self.retries >= 0,
            f"retries={self.retries!r} must be a whole number, 0 or more.",
        )
        _require(self.progress in (True, False, None), "progress must be True, False or None.")
        _require(
            self.database in connections,
            f"database={self.database!r} is not in settings.DATABASES "
            f"(known aliases: {', '.join(connections)}).",
        )
        _require(
            self.run_id is None or (isinstance(self.run_id, str) and 0 < len(self.run_id) <= 200),
            f"run_id={self.run_id!r} must be a non-empty string of at most 200 characters.",
        )
        _require(not self.restart or bool(self.run_id), "restart=True needs a run_id.")
        _require(self.retry_failed in (True, False), "retry_failed must be True or False.")
        _require(
            not self.retry_failed or bool(self.run_id),
            "retry_failed=True needs the run_id whose failed items to run again.",
        )
        _require(
            not (self.retry_failed and self.restart),
            "retry_failed=True runs again what a run recorded as failed; restart=True forgets "
            "what it recorded: pass one of them.",
        )
        _require(self.dry_run in (True, False), "dry_run must be True or False.")
        _require(self.early_stop in (True, False), "early_stop must be True or False.")
        if self.rejects is not None:
            parent = Path(self.rejects).resolve().parent
            _require(parent.is_dir(), f"rejects={str(self.rejects)!r}: folder {parent} does not exist.")

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default
        ]
        return f"Options({', '.join(changed)})"


def table() -> tuple[Field[Any], ...]:
    """The options, in order, each with its ``help`` and ``cli`` metadata."""
    return fields(Options)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def _require_size(name: str, value: object) -> None:
    _require(
        value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
        f'{name}={value!r}: use "auto" (the default) or a whole number, 1 or more.',
    )


def _require_positive_int(name: str, value: object) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name}={value!r} must be a whole number, 1 or more.",
    )
