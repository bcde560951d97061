"""``create``, ``update`` and ``delete``: per-object ORM work with every model behaviour kept.

Data flow (the engine, executors and transactions are those of ``run``):

    caller                                         worker
    ------                                         ------
    create(model, rows)  rows are the items   -->  CreateRow(row): model(**fields), full_clean()
                                                   if validate, save(force_insert=True),
                                                   many-to-many .set()  --> the new pk
         report.results: pks in input order   <--  (chunks are read back in input order)
    update(queryset, ...) / delete(queryset)
         queryset -> primary keys (querysets) -->  LoadRows: pks -> instances, one query a chunk
                                                   UpdateRow(obj): values, func(obj),
                                                   save(update_fields=...), many-to-many .set()
                                                   DeleteRow(obj): obj.delete()

The per-row callables (``rows.py``) are small frozen dataclasses, so every backend can
ship them; they hold the model's ``"app_label.ModelName"`` label, never the class, and
look the class up in the worker. ``fast.py`` gives them a ``batch`` for ``fast=True``.

Decisions, where the contract is silent:

- ``create`` saves with ``save(force_insert=True)``, as ``QuerySet.create`` does: a row
  that names an existing primary key fails (an ``IntegrityError``) instead of silently
  overwriting that row.
- A row's keys are field names or attnames (``author`` or ``author_id``), many-to-many
  names (forward or reverse; the value is a list of pks or instances, set with ``.set()``
  after the save, in the same savepoint, so ``m2m_changed`` is sent), or properties with
  a setter, which the model's constructor accepts. Anything else fails that row with a
  message listing the model's fields. Reverse foreign keys cannot be given: set the
  foreign key on the other side.
- ``validate=True`` runs ``full_clean()`` (fields, uniqueness, constraints) before the
  save; many-to-many values are not validated, as in Django. A ``ValidationError`` is that
  row's failure; its message is Django's, keyed by field.
- ``update`` assigns ``values`` first, then calls ``func(obj)`` (``func(obj, state)`` with
  ``setup``), then ``save(update_fields=update_fields)``. ``update_fields=None`` saves
  every field, or only the loaded ones for an ``only()``/``defer()`` queryset, as Django
  does. Names in ``values`` and ``update_fields`` are checked before item one.
- ``update`` and ``delete`` default the ``database`` option to the queryset's (its
  ``using()``, else the router's write database). ``create`` defaults it to the router's
  write database for the model.
- ``delete`` counts a row deleted before its turn (typically by the cascade of an earlier
  row) as done; its signals were sent by that cascade.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import router
from django.db.models import Model, QuerySet
from django.db.models.query import ModelIterable

from bulkpool import fast as bulk
from bulkpool import querysets
from bulkpool.api import build_engine
from bulkpool.engine import Engine
from bulkpool.errors import ConfigurationError
from bulkpool.outcomes import Report
from bulkpool.rows import CreateRow, DeleteRow, UpdateRow, UpsertRow, field_names, split_values

logger = logging.getLogger("bulkpool")


def create(
    model: type[Model] | str,
    rows: Iterable[Any],
    *,
    validate: bool = False,
    fast: bool = False,
    **options: Any,
) -> Report:
    """Create one object per row (a dict of field values) with ``save()``, signals and M2M.

    With ``prepare``, ``rows`` are any items, and ``prepare(item)`` returns each row.

    ``report.results`` holds the new primary keys in input order (None for a failed row).
    """
    model = _concrete_model(model)
    options.setdefault("database", router.db_for_write(model))
    func = CreateRow(model._meta.label, bool(validate), options["database"])
    if _checked_fast(fast):
        reason = bulk.why_not(model, options["database"])
        if reason is None:
            func = bulk.FastCreateRow(model._meta.label, bool(validate), options["database"])
        else:
            _say_exact("create", model, reason)
    return _run_with_results(build_engine(func, rows, options, keep_values=True))


def upsert(
    model: type[Model] | str,
    rows: Iterable[Any],
    *,
    unique_fields: Iterable[str],
    update_fields: Iterable[str] | None = None,
    fast: bool = False,
    **options: Any,
) -> Report:
    """Create or update one object per row (a dict of field values), keyed on ``unique_fields``,
    with ``save()``, signals (``created`` right for each row) and M2M.

    ``report.results`` holds ``(pk, created)`` per row in input order (None for a failed
    row); ``report.created`` and ``report.updated`` count them.
    """
    return run_upsert(model, rows, unique_fields, update_fields, fast=fast, given=options)


def run_upsert(
    model: type[Model] | str,
    rows: Iterable[Any],
    unique_fields: Iterable[str],
    update_fields: Iterable[str] | None,
    *,
    fast: bool,
    given: dict[str, Any],
    resume_hint: str | None = None,
) -> Report:
    """``upsert``, with the hint a resume needs (the command's own line)."""
    options = given
    model = _concrete_model(model)
    keys = _checked_unique_fields(model, unique_fields)
    fields = None if update_fields is None else _checked_update_fields(model, update_fields)
    options.setdefault("database", router.db_for_write(model))
    row = UpsertRow(model._meta.label, keys, fields, options["database"])
    if _checked_fast(fast):
        reason = bulk.why_not_upsert(model, keys, options["database"])
        if reason is None:
            row = bulk.FastUpsertRow(model._meta.label, keys, fields, options["database"])
        else:
            _say_exact("upsert", model, reason)
    report = _run_with_results(build_engine(row, rows, options, keep_values=True, resume_hint=resume_hint))
    done = [result for result in report.results or [] if result is not None]
    report.created = sum(1 for _, created in done if created)
    report.updated = len(done) - report.created
    return report


def update(
    queryset: QuerySet[Any],
    func: Callable[..., Any] | None = None,
    *,
    values: Mapping[str, Any] | None = None,
    update_fields: Iterable[str] | None = None,
    fast: bool = False,
    **options: Any,
) -> Report:
    """For every object of ``queryset``: assign ``values``, call ``func(obj)``, then
    ``obj.save(update_fields=...)``, so ``save()`` overrides run and signals are sent."""
    model = _model_of(queryset, "update")
    if func is not None and not callable(func):
        raise ConfigurationError(f"func must be callable or None, not {type(func).__name__}.")
    if values is not None and not isinstance(values, Mapping):
        raise ConfigurationError(f"values must be a dict of field values, not {type(values).__name__}.")
    try:
        plain, m2m = split_values(model, values or {})
    except (FieldDoesNotExist, ValueError) as error:
        raise ConfigurationError(f"values: {error}") from error
    fields = None if update_fields is None else _checked_update_fields(model, update_fields)
    options.setdefault("database", querysets.database_of(queryset))
    row = UpdateRow(model._meta.label, func, plain, m2m, fields, options["database"])
    if _checked_fast(fast):
        reason = bulk.why_not_update(model, m2m)
        if reason is None:
            row = bulk.FastUpdateRow(model._meta.label, func, plain, m2m, fields, options["database"])
        else:
            _say_exact("update", model, reason)
    return build_engine(row, queryset, options).run()


def delete(queryset: QuerySet[Any], *, fast: bool = False, **options: Any) -> Report:
    """Call every object's own ``delete()``: overrides, ``pre_delete`` / ``post_delete``, cascades."""
    model = _model_of(queryset, "delete")
    options.setdefault("database", querysets.database_of(queryset))
    row = DeleteRow(model._meta.label, options["database"])
    if _checked_fast(fast):
        reason = bulk.why_not_delete(model)
        if reason is None:
            row = bulk.FastDeleteRow(model._meta.label, options["database"])
        else:
            _say_exact("delete", model, reason)
    return build_engine(row, queryset, options, missing_ok=True).run()


def _checked_fast(fast: object) -> bool:
    if fast not in (True, False):
        raise ConfigurationError(f"fast must be True or False, not {fast!r}.")
    return bool(fast)


def _say_exact(operation: str, model: type[Model], reason: str) -> None:
    method = "save()" if operation != "delete" else "delete()"
    logger.info(
        "%s(%s, fast=True) uses the exact path (%s per row): %s.",
        operation,
        model._meta.label,
        method,
        reason,
    )


def _run_with_results(engine: Engine) -> Report:
    """Run, putting each item's value in ``report.results`` in input order (None if it failed)."""
    results: list[Any] = []
    engine.report.results = results  # partial results stay visible if the run stops early
    for chunk, result in engine.chunks(ordered=True):
        results.extend(result.values if result.values is not None else [None] * len(chunk))
    return engine.report


def _concrete_model(model: type[Model] | str) -> type[Model]:
    if isinstance(model, str):
        try:
            model = apps.get_model(model)
        except (LookupError, ValueError) as error:
            raise ConfigurationError(f"model={model!r}: {error}") from error
    if not (isinstance(model, type) and issubclass(model, Model)):
        raise ConfigurationError(
            f"model must be a model class or an 'app_label.ModelName' label, not {model!r}."
        )
    if model._meta.abstract or model._meta.swapped:
        raise ConfigurationError(
            f"{model.__name__} is abstract or swapped out: objects of it cannot be created."
        )
    return model


def _model_of(queryset: Any, operation: str) -> type[Model]:
    if not isinstance(queryset, QuerySet):
        raise ConfigurationError(
            f"{operation}() takes a QuerySet (e.g. Model.objects.filter(...)), not {type(queryset).__name__}."
        )
    if not issubclass(queryset._iterable_class, ModelIterable):
        raise ConfigurationError(
            f"{operation}() needs model instances: pass the queryset without values() / values_list()."
        )
    return queryset.model


def _checked_update_fields(model: type[Model], names: Iterable[str]) -> tuple[str, ...]:
    fields = _named_fields(model, names, "update_fields")
    for name, field in fields:
        if not field.concrete or field.primary_key:
            raise ConfigurationError(
                f"update_fields: {name!r} is not a column save() can update "
                "(many-to-many values go in values=, and are set after the save)."
            )
    return tuple(name for name, _ in fields)


def _checked_unique_fields(model: type[Model], names: Iterable[str]) -> tuple[str, ...]:
    """The key of ``upsert``: field names that a unique constraint (or the primary key) covers
    exactly, so that a row's key matches at most one object."""
    fields = _named_fields(model, names, "unique_fields")
    given = tuple(name for name, _ in fields)
    if not given:
        raise ConfigurationError("unique_fields must name the fields that find a row's object.")
    for name, field in fields:
        if not field.concrete:
            raise ConfigurationError(f"unique_fields: {name!r} is not a column of {model.__name__}.")
    keys = unique_keys(model)
    if frozenset(field.name for _, field in fields) not in keys:
        known = "; ".join(", ".join(sorted(key)) for key in sorted(keys, key=sorted))
        raise ConfigurationError(
            f"unique_fields={list(given)}: no unique constraint of {model.__name__} covers exactly "
            f"these fields, so a row's key could match several objects. Its unique keys are: {known}."
        )
    return given


def _named_fields(model: type[Model], names: Iterable[str], option: str) -> list[tuple[str, Any]]:
    """Each name an option (``update_fields``, ``unique_fields``) gives, in its order, with
    its field: the option must be a list of names, each of a field of ``model``."""
    if isinstance(names, str):
        raise ConfigurationError(f"{option} must be a list of field names, not the string {names!r}.")
    fields = []
    for name in names:
        try:
            fields.append((name, model._meta.get_field(name)))
        except FieldDoesNotExist:
            raise ConfigurationError(
                f"{option}: {model.__name__} has no field named {name!r}; its fields are: "
                f"{field_names(model)}"
            ) from None
    return fields


def unique_keys(model: type[Model]) -> set[frozenset[str]]:
    """The sets of field names that identify one object of ``model``: its primary key,
    unique fields, unique_together and unconditional UniqueConstraints (its parents' too)."""
    keys: set[frozenset[str]] = set()
    for cls in [model, *model._meta.get_parent_list()]:
        meta = cls._meta
        keys.update(frozenset([f.name]) for f in meta.local_concrete_fields if f.unique)
        keys.update(frozenset(together) for together in meta.unique_together)
        for constraint in meta.total_unique_constraints:
            if constraint.fields:
                keys.add(frozenset(constraint.fields))
    return keys
