"""The options of a run: one frozen value, validated when built, so bad input fails before item one."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from django.db import DEFAULT_DB_ALIAS, connections

from bulkpool.errors import ConfigurationError

Atomic = Literal["chunk", "item", False]
OnError = Literal["collect", "raise"]

DEFAULT_CHUNK_SIZE = 100
BACKEND_NAMES = ("serial", "thread", "process")


def default_workers() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything that shapes a run except the function and the items."""

    backend: Any = "process"
    workers: int = None  # type: ignore[assignment]  # None: one per CPU
    chunk_size: int = DEFAULT_CHUNK_SIZE
    atomic: Atomic = "chunk"
    setup: Callable[[], Any] | None = None
    on_error: OnError = "collect"
    max_failures: int | None = None
    retries: int = 3
    progress: bool | None = None
    rejects: str | os.PathLike[str] | None = None
    database: str = DEFAULT_DB_ALIAS
    run_id: str | None = None
    restart: bool = False  # with run_id: forget what a previous run of that name did
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.workers is None:
            object.__setattr__(self, "workers", default_workers())
        self._check()

    def _check(self) -> None:
        _require(
            (isinstance(self.backend, str) and self.backend in BACKEND_NAMES)
            or hasattr(self.backend, "start"),
            f"backend={self.backend!r} is not a backend: use one of {', '.join(BACKEND_NAMES)}, "
            "or an executor instance such as ProcessExecutor(start_method='spawn').",
        )
        _require_positive_int("workers", self.workers)
        _require_positive_int("chunk_size", self.chunk_size)
        _require(
            self.atomic in ("chunk", "item", False),
            f"atomic={self.atomic!r}: use 'chunk' (one transaction per chunk), 'item' "
            "(one per item) or False (no transaction).",
        )
        _require(self.setup is None or callable(self.setup), "setup must be a callable or None.")
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
        _require(self.dry_run in (True, False), "dry_run must be True or False.")
        if self.rejects is not None:
            parent = Path(self.rejects).resolve().parent
            _require(parent.is_dir(), f"rejects={str(self.rejects)!r}: folder {parent} does not exist.")

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default
        ]
        return f"Options({', '.join(changed)})"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def _require_positive_int(name: str, value: object) -> None:
    if value == "auto":
        raise ConfigurationError(f'{name}="auto" is not available yet; give a whole number (1 or more).')
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name}={value!r} must be a whole number, 1 or more.",
    )
