"""The bulk path behind ``fast=True``: a chunk's rows in bulk statements, every object's signals kept.

Data flow of one chunk of ``create(model, rows, fast=True)`` (in the chunk's transaction,
which the worker opens as for any chunk):

    rows --> objects      model(**fields) per row; full_clean() with validate=True;
                          the related objects' keys synced, as save() does
         --> pre_save     per object: sender, instance, raw=False, using, update_fields=None
         --> INSERT       per concrete table, parents first (multi-table inheritance): one
                          multi-row INSERT per table (in batches the database accepts),
                          with the keys the database returns set on the objects, and each
                          child's parent link set from its parent's key
         --> post_save    per object: created=True, update_fields=None, raw=False, using
         --> many-to-many per relation: m2m_changed pre_add per object, one INSERT of the
                          through rows, post_add per object (what ``.set()`` sends for a
                          new object; nothing for an empty list, as in Django)
         <-- the new primary keys, in input order

If anything in the chunk raises, the worker rolls the chunk back and runs it again on the
exact path (``CreateRow``, a savepoint per row), so the row that fails fails alone and its
chunk-mates are written. A COMMIT refused by a deferred constraint is handled as for any
chunk (per-row checks on PostgreSQL, halving elsewhere).

Where the bulk path cannot be equivalent, ``create`` uses the exact path for that model
and logs why once (``why_not``): the model or a parent overrides ``save()`` or
``save_base()`` (Django's own ``AbstractBaseUser.save()`` excepted: what it adds, a
``password_changed()`` after ``set_password()``, the bulk path does too); the model has
``order_with_respect_to`` (``_order`` is computed per save); a composite primary key; or
the database cannot return rows from a bulk insert (MySQL, SQLite < 3.35) while the
model needs keys or other values back from it.

Documented differences from ``save()``: every ``pre_save`` of the chunk runs before its
INSERT, so a receiver that queries the table does not see its chunk-mates; every
``post_save`` runs after the INSERT of the whole chunk; the ``m2m_changed`` signals of the
chunk come after every ``post_save`` of the chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.db import DatabaseError, connections, router
from django.db.models import Model, Q
from django.db.models.signals import m2m_changed, post_save, pre_save

from bulkpool.protocol import BatchFunc
from bulkpool.rows import (
    CreateRow,
    DeleteRow,
    UpdateRow,
    UpsertRow,
    new_object,
    row_values,
    update_fields_for,
)


def why_not(model: type[Model], database: str) -> str | None:
    """Why ``model`` cannot take the bulk path on ``database``, or None if it can."""
    overridden = _overridden_save(model)
    if overridden:
        return overridden
    chain = concrete_chain(model)
    for cls in chain:
        meta = cls._meta
        if meta.order_with_respect_to is not None:
            return f"{cls.__qualname__} has order_with_respect_to (save() computes _order per object)"
        if len(getattr(meta, "pk_fields", [meta.pk])) > 1:
            return f"{cls.__qualname__} has a composite primary key"
    features = connections[database].features
    if not features.can_return_rows_from_bulk_insert:
        needs = [cls for cls in chain if cls._meta.db_returning_fields]
        if needs:
            return (
                f"the {connections[database].display_name} database cannot return the keys of "
                f"a multi-row INSERT, which {needs[0].__qualname__} needs"
            )
    return None


def _overridden_save(model: type[Model]) -> str | None:
    """Which class of ``model`` overrides ``save()`` or ``save_base()``, said as a reason."""
    for cls in model.__mro__:
        if cls is Model:
            break
        for name in ("save", "save_base"):
            if name in vars(cls) and not _is_users_save(cls, name):
                return f"{cls.__qualname__} overrides {name}()"
    return None


def _is_users_save(cls: type, name: str) -> bool:
    """Django's own ``AbstractBaseUser.save()``: it only adds ``password_changed()`` after
    a ``set_password()``, which ``batch`` does too, after ``post_save`` as it does."""
    if name != "save" or cls.__module__ != "django.contrib.auth.base_user":
        return False
    from django.contrib.auth.base_user import AbstractBaseUser

    return cls is AbstractBaseUser


def _password_changed(obj: Model) -> None:
    """The rest of ``AbstractBaseUser.save()``, for a user saved in bulk."""
    password = getattr(obj, "_password", None)
    if password is not None:
        from django.contrib.auth import password_validation

        password_validation.password_changed(password, obj)  # type: ignore[arg-type]
        obj._password = None  # type: ignore[attr-defined]


def concrete_chain(model: type[Model]) -> list[type[Model]]:
    """The concrete models whose tables an object of ``model`` has a row in, parents first."""
    chain: list[type[Model]] = []

    def visit(cls: type[Model]) -> None:
        for parent in cls._meta.parents:
            visit(parent)
        concrete = cls._meta.concrete_model
        assert concrete is not None  # a concrete model's own
        if concrete not in chain:
            chain.append(concrete)

    visit(model._meta.concrete_model or model)
    return chain


@dataclass(frozen=True)
class FastCreateRow(CreateRow, BatchFunc):
    """``CreateRow`` (the exact path, per row) with ``batch``: a whole piece of a chunk at once.
    Its journal identity is ``CreateRow``'s: a run may resume with or without ``fast``."""

    def batch(self, rows: list[Any], *state: Any) -> list[Any]:
        model = apps.get_model(self.model)
        using = self.database
        objects: list[Model] = []
        m2m_values: list[dict[str, Any]] = []
        for row in rows:
            obj: Any  # Django's private _prepare_related_fields_for_save, which the stubs lack
            obj, m2m = new_object(model, row, validate=self.validate)
            obj._prepare_related_fields_for_save(operation_name="save")
            objects.append(obj)
            m2m_values.append(m2m)
        for obj in objects:
            pre_save.send(sender=model, instance=obj, raw=False, using=using, update_fields=None)
        insert(model, objects, using)
        for obj in objects:
            obj._state.db = using
            obj._state.adding = False
            post_save.send(
                sender=model, instance=obj, created=True, update_fields=None, raw=False, using=using
            )
            _password_changed(obj)
        _add_many_to_many(objects, m2m_values)
        return [obj.pk for obj in objects]


def insert(model: type[Model], objects: list[Model], using: str) -> None:
    """INSERT the objects' rows, table by table, parents first, as ``save(force_insert=True)``
    would one object at a time (``Model._save_parents`` / ``_save_table``)."""
    chain = concrete_chain(model)
    for cls in chain:
        meta = cls._meta
        for obj in objects:
            # Each parent link gets its parent's key, which the INSERT before this one set.
            for parent, link in meta.parents.items():
                if link is not None:
                    setattr(obj, link.attname, obj._get_pk_val(parent._meta))
                    cache: Any = link  # a OneToOneField: it caches the related object
                    if cache.is_cached(obj):
                        cache.delete_cached_value(obj)
            if obj._get_pk_val(meta) is None:
                setattr(obj, meta.pk.attname, meta.pk.get_pk_value_on_save(obj))
        with_pk = [obj for obj in objects if obj._get_pk_val(meta) is not None]
        without_pk = [obj for obj in objects if obj._get_pk_val(meta) is None]
        for group, pk_set in ((with_pk, True), (without_pk, False)):
            if group:
                _insert_table(cls, group, using, pk_set=pk_set)


def _insert_table(cls: type[Model], objects: list[Model], using: str, *, pk_set: bool) -> None:
    meta = cls._meta
    fields = [
        f
        for f in meta.local_concrete_fields
        if not getattr(f, "generated", False) and (pk_set or f is not meta.auto_field)
    ]
    returning = list(meta.db_returning_fields)
    connection = connections[using]
    size = max(1, connection.ops.bulk_batch_size(fields or [meta.pk], objects))
    manager = cls._base_manager
    for start in range(0, len(objects), size):
        batch = objects[start : start + size]
        rows = manager._insert(batch, fields=fields, returning_fields=returning or None, using=using)
        if returning and rows:
            for obj, values in zip(batch, rows, strict=True):
                for field, value in zip(returning, values, strict=False):
                    setattr(obj, field.attname, value)


def _add_many_to_many(objects: list[Model], values: list[dict[str, Any]]) -> None:
    """What ``getattr(obj, name).set(value)`` does for each new object, one INSERT per relation."""
    names = sorted({name for m2m in values for name in m2m})
    for name in names:
        plans = []
        for obj, m2m in zip(objects, values, strict=True):
            if name not in m2m:
                continue
            manager = getattr(obj, name)
            targets = list(m2m[name])
            if not targets:  # .set([]) on a new object sends nothing
                continue
            ids = manager._get_target_ids(manager.target_field_name, targets)
            plans.append((obj, manager, ids))
        if not plans:
            continue
        manager = plans[0][1]
        db = router.db_for_write(manager.through, instance=plans[0][0])
        can_ignore_conflicts, must_send_signals, _ = manager._get_add_plan(db, manager.source_field_name)
        signal = {"sender": manager.through, "reverse": manager.reverse, "model": manager.model, "using": db}
        if must_send_signals:
            for obj, _, ids in plans:
                m2m_changed.send(action="pre_add", instance=obj, pk_set=ids, **signal)
        source, target = f"{manager.source_field_name}_id", f"{manager.target_field_name}_id"
        manager.through._default_manager.using(db).bulk_create(
            [
                manager.through(**{source: each.related_val[0], target: target_id})
                for _, each, ids in plans
                for target_id in ids
            ],
            ignore_conflicts=can_ignore_conflicts,
        )
        if must_send_signals:
            for obj, _, ids in plans:
                m2m_changed.send(action="post_add", instance=obj, pk_set=ids, **signal)


def why_not_update(model: type[Model], m2m: Mapping[str, Any]) -> str | None:
    """Why ``update(fast=True)`` cannot use ``bulk_update`` for ``model``, or None."""
    overridden = _overridden_save(model)
    if overridden:
        return overridden
    if m2m:
        return "many-to-many values are set per object with .set()"
    return None


def why_not_delete(model: type[Model]) -> str | None:
    """Why ``delete(fast=True)`` cannot use one queryset ``delete()`` per chunk, or None."""
    for cls in model.__mro__:
        if cls is Model:
            break
        if "delete" in vars(cls):
            return f"{cls.__qualname__} overrides delete()"
    return None


@dataclass(frozen=True)
class FastUpdateRow(UpdateRow, BatchFunc):
    """``UpdateRow`` with ``batch``: ``pre_save`` per object, one ``bulk_update`` of the
    chunk per set of fields, ``post_save(created=False)`` per object."""

    def batch(self, objects: list[Model], *state: Any) -> list[Any]:
        if not objects:
            return []
        model = type(objects[0])
        using = self.database
        groups: dict[frozenset[str] | None, list[Model]] = {}
        for obj in objects:
            for name, value in self.values.items():
                setattr(obj, name, value)
            if self.func is not None:
                self.func(obj, *state)
            groups.setdefault(_update_fields_of(obj, self.update_fields, using), []).append(obj)
        saved: list[tuple[Model, frozenset[str] | None]] = []
        for update_fields, group in groups.items():
            if update_fields == frozenset():  # save(update_fields=[]) does nothing, sends nothing
                continue
            fields = _columns(model, update_fields)
            for obj in group:
                pre_save.send(sender=model, instance=obj, raw=False, using=using, update_fields=update_fields)
                for field in fields:  # auto_now and the like, as _save_table does
                    setattr(obj, field.attname, field.pre_save(obj, False))
            if fields:
                changed = model._base_manager.using(using).bulk_update(group, [f.name for f in fields])
                if changed != len(group):
                    raise DatabaseError(f"bulk_update changed {changed} rows of {len(group)}: a row is gone")
            saved.extend((obj, update_fields) for obj in group)
        by_object = dict((id(obj), fields) for obj, fields in saved)
        for obj in objects:  # post_save in the chunk's order
            if id(obj) not in by_object:
                continue
            obj._state.db = using
            obj._state.adding = False
            post_save.send(
                sender=model,
                instance=obj,
                created=False,
                update_fields=by_object[id(obj)],
                raw=False,
                using=using,
            )
            _password_changed(obj)
        return [None] * len(objects)


def _update_fields_of(obj: Model, given: tuple[str, ...] | None, using: str) -> frozenset[str] | None:
    """The ``update_fields`` that ``obj.save(update_fields=given, using=using)`` sends and
    saves: the lines of Django's ``Model.save()`` that choose them, kept in step with it
    (an empty frozenset: save() returns at once, saving and sending nothing)."""
    if given is not None:
        return frozenset(given)
    deferred = {
        f.attname
        for f in obj._meta.concrete_fields
        if f.attname not in obj.__dict__ and not getattr(f, "generated", False)
    }
    if deferred and using == obj._state.db:  # save() then saves the loaded fields only
        names = {
            f.attname for f in obj._meta.concrete_fields if not f.primary_key and not hasattr(f, "through")
        }
        loaded = names - deferred
        if loaded:
            return frozenset(loaded)
    return None


def _columns(model: type[Model], update_fields: frozenset[str] | None) -> list[Any]:
    fields = [
        f for f in model._meta.concrete_fields if not f.primary_key and not getattr(f, "generated", False)
    ]
    if update_fields is not None:
        fields = [f for f in fields if f.name in update_fields or f.attname in update_fields]
    return fields


@dataclass(frozen=True)
class FastDeleteRow(DeleteRow, BatchFunc):
    """``DeleteRow`` with ``batch``: the chunk's objects deleted with one queryset ``delete()``
    (Django's collector sends ``pre_delete`` / ``post_delete`` per object, and cascades)."""

    def batch(self, objects: list[Model | None], *state: Any) -> list[Any]:
        present = [obj for obj in objects if obj is not None]  # None: gone in an earlier cascade
        if present:
            model = type(present[0])
            model._base_manager.using(self.database).filter(pk__in=[obj.pk for obj in present]).delete()
        return [None] * len(objects)


def why_not_upsert(model: type[Model], unique_fields: tuple[str, ...], database: str) -> str | None:
    """Why ``upsert(fast=True)`` cannot take the bulk path for ``model``, or None: as for
    ``create``, whose INSERT it shares."""
    return why_not(model, database)


@dataclass(frozen=True)
class FastUpsertRow(UpsertRow, BatchFunc):
    """``UpsertRow`` with ``batch``: the piece's existing objects read (and locked) with one
    keyed query, ``pre_save`` per object in input order, one INSERT of the new objects
    (parents first) and one ``bulk_update`` per set of fields of the existing ones,
    ``post_save`` per object with its ``created``, then many-to-many values. A key that
    appears twice waits for a second round, so its second row updates what the first wrote.

    A concurrent caller that creates one of the new keys first makes the INSERT fail: the
    worker rolls the piece back and runs it on the exact path (``update_or_create`` per
    row), where that row becomes an update.
    """

    def batch(self, rows: list[Any], *state: Any) -> list[Any]:
        model = apps.get_model(self.model)
        planned = []
        for row in rows:
            plain, m2m = row_values(model, row)
            self.key_of(plain)  # every row has its key
            planned.append((plain, m2m))
        results: list[Any] = [None] * len(rows)
        for positions in _rounds(model, self.unique_fields, [plain for plain, _ in planned]):
            done = self._upsert(model, [planned[i] for i in positions])
            for position, result in zip(positions, done, strict=True):
                results[position] = result
        return results

    def _upsert(self, model: type[Model], planned: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[Any]:
        using = self.database
        existing = self._existing(model, [plain for plain, _ in planned])
        saves: list[tuple[Model, bool, frozenset[str] | None]] = []  # object, created, update_fields
        for plain, _ in planned:
            obj: Any = existing.get(_key(model, self.unique_fields, plain))
            if obj is None:
                obj = model(**plain)
                obj._prepare_related_fields_for_save(operation_name="save")
                saves.append((obj, True, None))
            else:
                values = {name: value for name, value in plain.items() if name not in self.unique_fields}
                for name in self.updated(values):
                    setattr(obj, name, values[name])
                update_fields = update_fields_for(obj, self.updated(values))
                if update_fields is None:  # a property among the values: the exact path saves it
                    raise ValueError("a value that is not a column: upsert this piece row by row")
                saves.append((obj, False, update_fields))
        for obj, _, update_fields in saves:
            if update_fields != frozenset():  # save(update_fields=[]) sends nothing
                pre_save.send(sender=model, instance=obj, raw=False, using=using, update_fields=update_fields)
        insert(model, [obj for obj, created, _ in saves if created], using)
        self._update_existing(model, [(obj, fields) for obj, created, fields in saves if not created])
        for obj, created, update_fields in saves:
            obj._state.db, obj._state.adding = using, False
            if update_fields != frozenset():
                post_save.send(
                    sender=model,
                    instance=obj,
                    created=created,
                    update_fields=update_fields,
                    raw=False,
                    using=using,
                )
                _password_changed(obj)
        for (obj, created, _), (_, m2m) in zip(saves, planned, strict=True):
            for name, value in m2m.items():
                if created or self.update_fields is None or name in self.update_fields:
                    getattr(obj, name).set(value)
        return [(obj.pk, created) for obj, created, _ in saves]

    def _existing(self, model: type[Model], rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], Model]:
        """The objects the rows' keys find, by key, locked until the chunk commits."""
        keys = [plain[self.unique_fields[0]] for plain in rows]
        if len(self.unique_fields) == 1 and None not in keys:  # one IN (...), not a thousand ORs
            query = Q(**{f"{self.unique_fields[0]}__in": keys})
        else:
            query = Q()
            for plain in rows:
                query |= Q(**{name: plain[name] for name in self.unique_fields})
        found = model._base_manager.db_manager(self.database).select_for_update().filter(query)
        return {_key(model, self.unique_fields, obj): obj for obj in found}

    def _update_existing(
        self, model: type[Model], updates: list[tuple[Model, frozenset[str] | None]]
    ) -> None:
        groups: dict[frozenset[str], list[Model]] = {}
        for obj, update_fields in updates:
            if update_fields:
                groups.setdefault(update_fields, []).append(obj)
        manager = model._base_manager.db_manager(self.database)
        features = connections[self.database].features
        by_conflict = not model._meta.parents and features.supports_update_conflicts
        # MySQL's ON DUPLICATE KEY UPDATE takes no target: any unique key of the row finds it.
        target = list(self.unique_fields) if features.supports_update_conflicts_with_target else None
        for update_fields, group in groups.items():
            fields = _columns(model, update_fields)
            for obj in group:
                for field in fields:  # auto_now and the like, as _save_table does
                    setattr(obj, field.attname, field.pre_save(obj, False))
            names = [f.name for f in fields]
            # An INSERT runs every field's pre_save() as for a new row: auto_now_add would
            # give the existing rows a new creation time. Those groups take bulk_update.
            adds = any(getattr(field, "auto_now_add", False) for field in fields)
            if by_conflict and names and not adds:
                # The rows exist and are locked (the keyed read): an INSERT that meets each one's
                # key and updates it is one statement, where bulk_update's CASE per row is slow.
                manager.bulk_create(group, update_conflicts=True, unique_fields=target, update_fields=names)
                continue
            changed = manager.bulk_update(group, names)
            if changed != len(group):
                raise DatabaseError(f"bulk_update changed {changed} rows of {len(group)}: a row is gone")


def _key(model: type[Model], unique_fields: tuple[str, ...], source: Any) -> tuple[Any, ...]:
    """A row's key (from its values) or an object's (from its fields), comparable with each other."""
    key = []
    for name in unique_fields:
        field: Any = model._meta.get_field(name)  # a concrete field (operations checked it)
        if isinstance(source, Model):
            value = getattr(source, field.attname)
        else:
            value = source.get(name, source.get(field.attname))
            if isinstance(value, Model):
                value = value.pk
        key.append(field.to_python(value))
    return tuple(key)


def _rounds(
    model: type[Model], unique_fields: tuple[str, ...], rows: list[dict[str, Any]]
) -> list[list[int]]:
    """The rows' positions in rounds where each key comes once, in input order."""
    seen: dict[tuple[Any, ...], int] = {}
    rounds: list[list[int]] = []
    for position, plain in enumerate(rows):
        key = _key(model, unique_fields, plain)
        number = seen.get(key, -1) + 1
        seen[key] = number
        if number == len(rounds):
            rounds.append([])
        rounds[number].append(position)
    return rounds
