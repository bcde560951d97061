"""The entry points: turn arguments into an ``Engine`` and hand it on.

``create`` / ``update`` / ``delete`` live in ``operations``; a QuerySet given as ``items``
is split by ``querysets``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import fields
from typing import Any

from django.db.models import QuerySet

from bulkpool import querysets
from bulkpool.engine import Engine
from bulkpool.errors import ConfigurationError
from bulkpool.options import Options
from bulkpool.outcomes import Failure, Outcome, Report
from bulkpool.rows import UpdateRow


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
        options = make_options(given)
        check_signatures(func, options)
        return Engine(func, items, options, keep_values=keep_values, resume_hint=resume_hint)
    options = make_options({"database": querysets.database_of(items), **given})
    check_signatures(func, options)
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


def check_signatures(func: Callable[..., Any], options: Options) -> None:
    """Refuse, before anything runs, a ``func`` or ``prepare`` that cannot take the call it
    will get: ``f(item)``, or ``f(item, state)`` with ``setup``. ``update``'s own per-row
    callable is not checked, the user's function it calls with the object is."""
    with_state = options.setup is not None
    if options.prepare is not None:
        _check_call("prepare", options.prepare, "the item", with_state)
    if isinstance(func, UpdateRow):
        if func.func is not None:
            _check_call("update's func", func.func, "the object", with_state)
        return
    _check_call("func", func, "the item", with_state)


def _check_call(role: str, func: Callable[..., Any], first: str, with_state: bool) -> None:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return  # a builtin or a C function without a readable signature: its errors come per item
    given = ("item", "state") if with_state else ("item",)
    if not _binds(signature, given):
        raise ConfigurationError(f"{role}: {_explain(role, func, signature, given, first)}.")


def _explain(
    role: str, func: Callable[..., Any], signature: inspect.Signature, given: tuple[str, ...], first: str
) -> str:
    """What is wrong with ``func``'s parameters for the call ``given``, and how to fix it."""
    shown = f"{getattr(func, '__name__', None) or repr(func)}{_parameters(signature)}"
    required = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    with_state = len(given) == 2
    calls = f"{first}, and the state setup= returned" if with_state else first
    plural = "s" if len(required) != 1 else ""
    what = f"{shown} takes {len(required)} argument{plural} but bulkpool calls it with {len(given)} ({calls})"
    if not with_state and _binds(signature, ("item", "state")):
        return (
            f"{what}: pass setup=... (--setup) to give it a state as its second argument, or use "
            "functools.partial to fill in the others"
        )
    if with_state and _binds(signature, ("item",)):
        return f"{what}: give it a parameter for the state (def f(item, state)), or leave out setup="
    if len(required) != len(given):
        return f"{what}: give it a parameter for {first}" + (" and one for the state" if with_state else "")
    try:
        signature.bind(*given)
    except TypeError as error:  # the count is right: a keyword-only parameter without a default
        problem = str(error)
    return (
        f"{shown} cannot be called as {role.split()[-1]}({', '.join(given)}): {problem}: give the "
        "other parameters defaults, or use functools.partial to fill them in"
    )


def _binds(signature: inspect.Signature, arguments: tuple[str, ...]) -> bool:
    try:
        signature.bind(*arguments)
    except TypeError:
        return False
    return True


def _parameters(signature: inspect.Signature) -> str:
    """``(row, category)``: the parameters without annotations, which only make noise here."""
    return str(
        signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
    )


def make_options(given: dict[str, Any]) -> Options:
    """``Options`` from keyword arguments, naming any unknown one."""
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigurationError(
            f"Unknown option(s): {', '.join(unknown)}. Options are: {', '.join(sorted(known))}."
        )
    return Options(**given)
