"""The per-row callables of ``create``, ``update``, ``delete`` and ``upsert`` (``operations.py``).

Each is a small frozen dataclass that holds the model's ``"app_label.ModelName"`` label,
never the class, so every backend can ship it (pickled, or as its class path and JSON
fields); it looks the class up where it runs. ``fast.py`` subclasses them with a
``batch`` for ``fast=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import IntegrityError, connections, transaction
from django.db.models import Field, Model

from bulkpool.journal import func_name


@dataclass(frozen=True)
class CreateRow:
    model: str
    validate: bool
    database: str

    def __call__(self, row: Mapping[str, Any], *state: Any) -> Any:
        obj, m2m = new_object(apps.get_model(self.model), row, validate=self.validate)
        obj.save(force_insert=True, using=self.database)
        for name, value in m2m.items():
            getattr(obj, name).set(value)
        return obj.pk

    def journal_identity(self) -> str:
        return f"create({self.model}, validate={self.validate})"


@dataclass(frozen=True)
class UpdateRow:
    model: str
    func: Callable[..., Any] | None
    values: dict[str, Any]
    m2m: dict[str, Any]
    update_fields: tuple[str, ...] | None
    database: str

    def __call__(self, obj: Model, *state: Any) -> None:
        for name, value in self.values.items():
            setattr(obj, name, value)
        if self.func is not None:
            self.func(obj, *state)
        obj.save(update_fields=self.update_fields, using=self.database)
        for name, value in self.m2m.items():
            getattr(obj, name).set(value)

    def __repr__(self) -> str:  # names the user's function in "cannot be sent to workers" errors
        return f"update({getattr(self.func, '__qualname__', self.func)!r})"

    def journal_identity(self) -> str:
        # The values by fingerprint: an update that sets other values is another job.
        arguments = json.dumps([sorted(self.values.items()), sorted(self.m2m.items())], default=repr)
        values = hashlib.sha256(arguments.encode()).hexdigest()[:16]
        func = func_name(self.func) if self.func is not None else None
        fields = self.update_fields
        return f"update({self.model}, func={func}, values=sha256:{values}, update_fields={fields})"


@dataclass(frozen=True)
class DeleteRow:
    model: str
    database: str

    def journal_identity(self) -> str:
        return f"delete({self.model})"

    def __call__(self, obj: Model | None, *state: Any) -> None:
        if obj is not None:  # None: already deleted, by an earlier row's cascade
            obj.delete(using=self.database)


def new_object(model: type[Model], row: Any, *, validate: bool) -> tuple[Model, dict[str, Any]]:
    """The unsaved object a row of ``create`` makes (``full_clean()``-ed with ``validate``),
    and the many-to-many values to set once it is saved."""
    plain, m2m = row_values(model, row)
    obj = model(**plain)
    if validate:
        obj.full_clean()
    return obj, m2m


def row_values(model: type[Model], row: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A row of ``create`` or ``upsert`` -- a dict -- as ``split_values`` splits it."""
    if not isinstance(row, Mapping):
        raise TypeError(f"a row must be a dict of field values, not {type(row).__name__}")
    return split_values(model, row)


def split_values(model: type[Model], values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``values`` as (what to assign before the save, many-to-many values to set after it)."""
    plain: dict[str, Any] = {}
    m2m: dict[str, Any] = {}
    for name, value in values.items():
        try:
            field = model._meta.get_field(name)
        except FieldDoesNotExist:
            if isinstance(getattr(model, name, None), property):
                plain[name] = value
                continue
            raise FieldDoesNotExist(
                f"{model.__name__} has no field named {name!r}; its fields are: {field_names(model)}"
            ) from None
        if field.many_to_many:
            m2m[name] = value
        elif field.auto_created and not field.concrete:
            raise ValueError(
                f"{name!r} is the reverse side of a foreign key from {field.related_model!r}: "
                "set that foreign key on those rows instead"
            )
        else:
            plain[name] = value
    return plain, m2m


def field_names(model: type[Model]) -> str:
    return ", ".join(
        f.name for f in model._meta.get_fields() if f.concrete or f.many_to_many or not f.auto_created
    )


@dataclass(frozen=True)
class UpsertRow:
    """One row of ``upsert``: the object with the row's key gets the row's values and
    ``save()``; none is created with them. The steps and signals of ``update_or_create``
    (the row locked, a lost race to create it turned into an update), with fewer round
    trips: it runs inside the chunk's transaction, so only the INSERT of a new object needs
    a savepoint (where a lost race would abort the transaction: not on SQLite, whose writer
    is alone). Many-to-many values are set after the save. Returns ``(pk, created)``."""

    model: str
    unique_fields: tuple[str, ...]
    update_fields: tuple[str, ...] | None  # what an existing object gets; None: what the row gives
    database: str

    def __call__(self, row: Mapping[str, Any], *state: Any) -> tuple[Any, bool]:
        model = apps.get_model(self.model)
        plain, m2m = row_values(model, row)
        key = self.key_of(plain)
        values = {name: value for name, value in plain.items() if name not in key}
        with transaction.atomic(using=self.database, savepoint=False):  # atomic=False: its own
            obj, created = self._save(model, key, values)
        for name, value in m2m.items():
            if created or self.update_fields is None or name in self.update_fields:
                getattr(obj, name).set(value)
        return obj.pk, created

    def _save(self, model: type[Model], key: dict[str, Any], values: dict[str, Any]) -> tuple[Model, bool]:
        objects = model._base_manager.db_manager(self.database).select_for_update()
        obj = objects.filter(**key).first()
        if obj is None:
            obj = model(**key, **values)
            try:
                with _savepoint_for_a_race(self.database):
                    obj.save(force_insert=True, using=self.database)
                return obj, True
            except IntegrityError:
                obj = objects.filter(**key).first()  # the object whose creation won the race
                if obj is None:
                    raise  # another constraint refused the row
        names = self.updated(values)
        for name in names:
            setattr(obj, name, values[name])
        update_fields = update_fields_for(obj, names)
        obj.save(using=self.database, update_fields=update_fields)
        return obj, False

    def key_of(self, plain: Mapping[str, Any]) -> dict[str, Any]:
        missing = [name for name in self.unique_fields if name not in plain]
        if missing:
            raise KeyError(
                f"the row has no value for {', '.join(missing)}, which unique_fields "
                f"({', '.join(self.unique_fields)}) needs to find its object"
            )
        return {name: plain[name] for name in self.unique_fields}

    def updated(self, values: Mapping[str, Any]) -> list[str]:
        """The names an existing object gets: the row's, or those of update_fields it gives."""
        if self.update_fields is None:
            return list(values)
        return [name for name in self.update_fields if name in values]

    def journal_identity(self) -> str:
        return f"upsert({self.model}, unique_fields={self.unique_fields}, update_fields={self.update_fields})"


def update_fields_for(obj: Model, names: list[str]) -> frozenset[str] | None:
    """What ``update_or_create`` saves an existing object with: the names given and the
    fields whose ``pre_save`` sets them (auto_now); None (every field) when a name is not a
    column (a property). An empty set saves nothing and sends nothing, as in Django."""
    columns = {n for f in obj._meta.concrete_fields if not f.primary_key for n in (f.name, f.attname)}
    if not set(names) <= columns:
        return None
    fields = set(names)
    for field in obj._meta.local_concrete_fields:
        if not (field.primary_key or type(field).pre_save is Field.pre_save):
            fields |= {field.name, field.attname}
    return frozenset(fields)


def _savepoint_for_a_race(database: str) -> Any:
    """A savepoint around an INSERT that may lose a race, where the failure would abort the
    transaction; SQLite's single writer has no such race."""
    if connections[database].vendor == "sqlite":
        return contextlib.nullcontext()
    return transaction.atomic(using=database)
