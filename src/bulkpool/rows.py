"""The per-row callables of ``create``, ``update`` and ``delete`` (``operations.py``).

Each is a small frozen dataclass that holds the model's ``"app_label.ModelName"`` label,
never the class, so every backend can ship it (pickled, or as its class path and JSON
fields); it looks the class up where it runs. ``fast.py`` subclasses them with a
``batch`` for ``fast=True``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db.models import Model

from bulkpool.journal import func_name


@dataclass(frozen=True)
class CreateRow:
    model: str
    validate: bool
    database: str

    def __call__(self, row: Mapping[str, Any], *state: Any) -> Any:
        model = apps.get_model(self.model)
        if not isinstance(row, Mapping):
            raise TypeError(f"a row must be a dict of field values, not {type(row).__name__}")
        plain, m2m = split_values(model, row)
        obj = model(**plain)
        if self.validate:
            obj.full_clean()
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
