"""What a job and its chunks become to travel to workers on other machines: JSON, nothing pickled.

Not tied to one transport (Celery's task arguments today; Django's Tasks framework can send
the same strings):

    caller                                          a worker, on any machine
    job_of(task)     -> {"func": reference, ...} -> task_of(job)    a Task again: func, setup and
                                                                    prepare rebuilt by dotted path,
                                                                    QuerySet input as its model label
    encode_chunk(c)  -> JSON text              -> JSON.decode(...)   the same Chunk

``reference`` describes a function by its dotted path (``module:qualname``), a
``functools.partial`` as its function's reference and JSON arguments, and a dataclass
instance (bulkpool's per-row operations, such as ``create``'s) as its class path and fields.
What a worker could not import back -- a lambda, a closure, a bound method, ``__main__`` --
is refused before anything is sent, saying what to do instead. ``to`` names the workers in
those messages ("celery workers").
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

from bulkpool.errors import ConfigurationError
from bulkpool.journal import JournalRef
from bulkpool.protocol import JSON, Chunk, Task

REMOTE = "remote workers"  # how messages name the workers when the caller does not say


def encode_chunk(chunk: Chunk, *, to: str = REMOTE) -> str:
    """The chunk as JSON text; an item JSON cannot carry is refused, named, before it is sent."""
    try:
        return JSON.encode(chunk).decode()
    except (TypeError, ValueError):
        for index, item in chunk.indexed():
            try:
                JSON.check_value(item)
            except (TypeError, ValueError) as error:
                raise ConfigurationError(
                    f"Item {index} ({item!r:.200}) cannot be sent to {to}: {error}. Items "
                    "travel as JSON (with dates, times, decimals, UUIDs and bytes): pass plain "
                    "values, e.g. primary keys or dicts, and load objects in func."
                ) from error
        raise


def job_of(task: Task, *, heartbeat: float, to: str = REMOTE) -> dict[str, Any]:
    """What a worker needs to rebuild ``task``, as plain data; refuses what cannot travel."""
    from bulkpool.querysets import LoadRows

    load = None
    if task.load is not None:
        if not isinstance(task.load, LoadRows):
            raise ConfigurationError(f"Cannot send this loader to {to}: {task.load!r}.")
        load = _loader_of(task.load, to)
    job = {
        "func": reference(task.func, "func", to=to),
        "setup": None if task.setup is None else reference(task.setup, "setup", to=to),
        "prepare": None if task.prepare is None else reference(task.prepare, "prepare", to=to),
        "atomic": task.atomic,
        "database": task.database,
        "retries": task.retries,
        "keep_values": task.keep_values,
        "dry_run": task.dry_run,
        "journal": None if task.journal is None else dataclasses.asdict(task.journal),
        "load": load,
        "heartbeat": heartbeat,
    }
    try:
        JSON.encode(job)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"The arguments of func or setup cannot be sent to {to} as JSON: {error}. "
            "Give functools.partial plain arguments (numbers, strings, lists, dicts, dates...)."
        ) from error
    return job


def task_of(data: dict[str, Any]) -> Task:
    """The ``Task`` that ``job_of`` described, as a worker runs it (on its own connections)."""
    return Task(
        func=rebuild(data["func"]),
        setup=None if data["setup"] is None else rebuild(data["setup"]),
        prepare=None if data["prepare"] is None else rebuild(data["prepare"]),
        atomic=data["atomic"],
        database=data["database"],
        retries=data["retries"],
        keep_values=data["keep_values"],
        own_connections=True,
        load=None if data["load"] is None else _loader_from(data["load"]),
        journal=None if data["journal"] is None else JournalRef(**data["journal"]),
        dry_run=data["dry_run"],
        check_value=JSON.check_value,
    )


def reference(obj: Any, what: str, *, to: str = REMOTE) -> dict[str, Any]:
    """``obj`` (a function, a partial of one, or a dataclass instance such as bulkpool's
    per-row operations) as data a worker can import it back from."""
    if isinstance(obj, functools.partial):
        return {
            "partial": reference(obj.func, what, to=to),
            "args": list(obj.args),
            "keywords": dict(obj.keywords),
        }
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            is_callable = callable(value) and not isinstance(value, type)
            fields[field.name] = {"ref": reference(value, what, to=to)} if is_callable else {"value": value}
        return {"dataclass": _path(type(obj), what, to), "fields": fields}
    return {"path": _path(obj, what, to)}


def rebuild(ref: dict[str, Any]) -> Any:
    """The object ``reference()`` described."""
    if "partial" in ref:
        return functools.partial(rebuild(ref["partial"]), *ref["args"], **ref["keywords"])
    if "dataclass" in ref:
        fields = {
            name: rebuild(field["ref"]) if "ref" in field else field["value"]
            for name, field in ref["fields"].items()
        }
        return _import(ref["dataclass"])(**fields)
    return _import(ref["path"])


def _path(obj: Any, what: str, to: str) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    fix = (
        f"{to[0].upper()}{to[1:]} import {what} by its dotted path, so it must be a function defined "
        "at the top level of an importable module (a functools.partial of one, with JSON arguments, "
        "works too)."
    )
    if not module or not qualname:
        raise ConfigurationError(f"{what}={obj!r} has no importable name. {fix}")
    if "<" in qualname:  # <lambda>, <locals>
        raise ConfigurationError(f"{what}={module}.{qualname} is a lambda or a closure. {fix}")
    if module == "__main__":
        raise ConfigurationError(
            f"{what}={qualname} is defined in __main__, which {to} cannot import. "
            f"Move it to a module of your project. {fix}"
        )
    try:
        found = _import(f"{module}:{qualname}")
    except Exception as error:
        raise ConfigurationError(
            f"{what}={module}.{qualname} cannot be imported back: {error}. {fix}"
        ) from error
    if found is not obj:  # a bound method, or a name rebound since
        raise ConfigurationError(f"{what}={obj!r} is not what {module}.{qualname} names. {fix}")
    return f"{module}:{qualname}"


def _import(path: str) -> Any:
    module, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    return found


def _loader_of(load: Any, to: str) -> dict[str, Any]:
    """QuerySet input travels as its model's label: each chunk's rows are loaded by primary
    key with the base manager. Refused where that would not give the same objects."""
    import pickle

    query = pickle.loads(load.query)
    lookups = pickle.loads(load.prefetch)
    differs = [
        name
        for name, present in (
            ("annotate()", bool(query.annotations)),
            ("extra()", bool(query.extra)),
            ("select_related()", bool(query.select_related)),
            ("only() / defer()", query.deferred_loading != (frozenset(), True)),
            ("prefetch_related()", bool(lookups)),
            ("select_for_update()", bool(query.select_for_update)),
        )
        if present
    ]
    if differs:
        raise ConfigurationError(
            f"A QuerySet is sent to {to} as primary keys, and they load the rows by "
            f"primary key with {load.model}'s base manager; this queryset uses {', '.join(differs)}, "
            "which would be lost. Drop it (do that work in func), or run over a plain queryset."
        )
    return {"model": load.model, "database": load.database, "missing_ok": load.missing_ok}


def _loader_from(spec: dict[str, Any]) -> Any:
    """The worker's loader for QuerySet input: the model's base manager, by primary key."""
    import pickle

    from django.apps import apps

    from bulkpool.querysets import LoadRows

    model = apps.get_model(spec["model"])
    return LoadRows(
        spec["model"],
        pickle.dumps(model._base_manager.all().query),
        pickle.dumps(()),
        spec["database"],
        spec["missing_ok"],
    )
