"""Calling the user's code: what a worker binds once, and one call of ``func`` on one item.

``Calls`` is set up once per ``Worker`` (with the user's ``setup`` state, if any) and only
read after, so the threads that share a Worker share it safely. ``ItemCaller`` calls
``func`` on one item inside a scope (its savepoint, its transaction, or none) and turns
whatever it raises into that item's failure, except a transient database error (the
caller retries) and Ctrl-C in the caller's own thread (the caller's).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from django.db import transaction

from bulkpool.protocol import ChunkResult, ErrorInfo, Task
from bulkpool.retrying import Transient, is_transient
from bulkpool.transactions import CommitRefused
from bulkpool.work.timing import Stopwatch


@dataclass(frozen=True)
class Calls:
    """The callables a worker runs, bound to the user's ``setup`` state when there is one."""

    task: Task
    call: Callable[[Any], Any]
    prepare: Callable[[Any], Any] | None
    batch: Callable[[list[Any]], list[Any]] | None  # the bulk path of fast=True (Task.batch)
    in_caller_thread: bool  # Ctrl-C -- a KeyboardInterrupt -- is the caller's, not an item's

    @classmethod
    def bind(cls, task: Task, *, in_caller_thread: bool, state: tuple[Any, ...] = ()) -> Calls:
        """``state``: ``(setup's return value,)`` once ``setup`` ran, passed after the item."""
        return cls(
            task=task,
            call=_with_state(task.func, state),
            prepare=None if task.prepare is None else _with_state(task.prepare, state),
            batch=None if task.batch is None else _with_state(task.batch, state),
            in_caller_thread=in_caller_thread,
        )


def _with_state(function: Callable[..., Any], state: tuple[Any, ...]) -> Callable[[Any], Any]:
    if not state:
        return function
    return lambda argument: function(argument, *state)


class Unsendable(Exception):
    """The item's return value cannot be sent back by the executor (``Task.check_value``)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ItemCaller:
    """Calls ``func`` on single items for one chunk run, timing the calls."""

    def __init__(self, calls: Calls, clock: Stopwatch) -> None:
        self._calls = calls
        self._task = calls.task
        self._clock = clock

    def run_item(
        self, result: ChunkResult, offset: int, item: Any, scope: AbstractContextManager[Any], *, atomic: bool
    ) -> tuple[bool, Any]:
        """Call func on one item inside ``scope`` (its savepoint, its transaction, or none).

        Returns whether it went well, and what ``scope`` gave (its Transaction, if any).
        Raises only ``Transient`` (and Ctrl-C in the caller's thread): every other error,
        ``BaseException``s included, is the item's failure, after ``scope`` rolled back.
        """
        database = self._task.database
        entered: Any = None
        try:
            started = self._clock.start_item()
            try:
                with scope as entered:
                    value = self._calls.call(item)
                    if self._task.check_value is not None and self._task.keep_values:
                        self._check_value(value)
                    if atomic and transaction.get_rollback(using=database):
                        raise RuntimeError(
                            "a database error was caught inside the item, so its work was rolled "
                            "back; let the error propagate, or wrap the failing query in "
                            "transaction.atomic()"
                        )
            finally:
                self._clock.end_item(started)
        except Transient:
            raise
        except KeyboardInterrupt as error:
            if self._calls.in_caller_thread:
                raise
            result.errors[offset] = ErrorInfo.from_exception(error)
            return False, entered
        except BaseException as error:
            if is_transient(error):
                raise Transient(error) from error
            result.errors[offset] = self._error_info(error)
            return False, entered
        result.errors.pop(offset, None)
        if result.values is not None:
            result.values[offset] = value
        return True, entered

    def _check_value(self, value: Any) -> None:
        assert self._task.check_value is not None
        try:
            self._task.check_value(value)
        except Exception as error:
            raise Unsendable(error) from error

    def _error_info(self, error: BaseException) -> ErrorInfo:
        if isinstance(error, CommitRefused):  # atomic="item": COMMIT refused the item
            return ErrorInfo.from_exception(error.error)
        if isinstance(error, Unsendable):
            info = ErrorInfo.from_exception(error.error)
            autocommit = self._task.atomic is False
            written = " (it ran in autocommit, so its work stays written)" if autocommit else ""
            return ErrorInfo(
                info.exc_type,
                f"its return value cannot be sent back: {info.message}{written}",
                info.traceback,
                unsafe=autocommit,
            )
        return ErrorInfo.from_exception(error)
