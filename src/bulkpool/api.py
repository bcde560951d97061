"""The entry points: turn arguments into an ``Engine`` and hand it on.

``create`` / ``update`` / ``delete`` live in ``operations``; a QuerySet given as ``items``
is split by ``querysets``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import fields
from typing import Any

from django.db.models import QuerySet

from bulkpool import querysets
from bulkpool.engine import Engine
from bulkpool.errors import ConfigurationError
from bulkpool.options import Options
from bulkpool.outcomes import Failure, Outcome, Report


def run(func: Callable[..., Any], items: Iterable[Any], **options: Any) -> Report:
    """Call ``func(item)`` -- or ``func(item, state)`` with ``setup`` -- for every item.

    Runs on a pool of workers whose Django ORM is ready and returns a ``Report`` once all
    items are done. A failing item is reported, not raised (unless ``on_error="raise"``).
    """
    return build_engine(func, items, options).run()


def imap(func: Callable[..., Any], items: Iterable[Any], *, ordered: bool = True, **options: Any) -> Outcomes:
    """Like ``run``, but yield an ``Outcome`` per item as work completes.

    With ``ordered`` (the default) outcomes come in input order. Options are checked now;
    the workers start at the first ``next()``. Stopping early (``break``, then ``close()``
    or the end of a ``with`` block) lets the chunks in flight finish and ends the run.
    """
    return Outcomes(build_engine(func, items, options, keep_values=True), ordered)


class Outcomes(Iterator[Outcome]):
    """The outcomes of an ``imap`` run; ``report`` is its ``Report``, final once they are all read."""

    def __init__(self, engine: Engine, ordered: bool) -> None:
        self.report = engine.report
        self._outcomes = _outcomes(engine, ordered)

    def __next__(self) -> Outcome:
        return next(self._outcomes)

    def close(self) -> None:
        """Stop the run: the chunks in flight finish and are counted; nothing more is sent."""
        self._outcomes.close()

    def __enter__(self) -> Outcomes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_engine(
    func: Callable[..., Any],
    items: Iterable[Any],
    given: dict[str, Any],
    *,
    keep_values: bool = False,
    missing_ok: bool = False,
    resume_hint: str | None = None,
) -> Engine:
    """An ``Engine`` for ``func`` over ``items``. A QuerySet becomes its primary keys, and
    a loader with which each worker turns them into rows (see ``querysets``)."""
    if not isinstance(items, QuerySet):
        if not isinstance(items, Iterable):
            raise ConfigurationError(
                f"items must be iterable (a list, a generator, a QuerySet...), not {type(items).__name__}."
            )
        return Engine(func, items, make_options(given), keep_values=keep_values, resume_hint=resume_hint)
    options = make_options({"database": querysets.database_of(items), **given})
    if options.prepare is not None:
        raise ConfigurationError(
            "prepare= cannot be used with a QuerySet: its rows are loaded inside each chunk's "
            "transaction, so that func sees them as they are when it writes them, and a value "
            "prepared from a row read earlier, outside it, could write stale data back. Do the "
            "work in func, or pass the values prepare needs as items (e.g. "
            "queryset.values_list('pk', 'path')) and load the row in func."
        )
    keys, load = querysets.split(items, options.database, missing_ok=missing_ok)
    return Engine(func, keys, options, keep_values=keep_values, load=load, resume_hint=resume_hint)


def _outcomes(engine: Engine, ordered: bool) -> Generator[Outcome, None, None]:
    for chunk, result in engine.chunks(ordered=ordered):
        values = result.values or [None] * len(chunk)
        for offset, (index, item) in enumerate(chunk.indexed()):
            error = result.errors.get(offset)
            if result.skipped and error is None:
                continue  # written in an earlier attempt of this run_id
            failure = Failure.of(index, item, error) if error is not None else None
            yield Outcome(index, item, values[offset], failure)


def make_options(given: dict[str, Any]) -> Options:
    """``Options`` from keyword arguments, naming any unknown one."""
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigurationError(
            f"Unknown option(s): {', '.join(unknown)}. Options are: {', '.join(sorted(known))}."
        )
    return Options(**given)
