"""QuerySet input: split a queryset into primary-key ranges; each worker loads its own rows.

Data flow:

    caller                                              worker (thread or process)
    ------                                              --------------------------
    len(keys): one count() -> the progress bar total
    iter(keys), before item one: every matching pk,
      read page by page (keyset pagination on the
      pk index), spooled to a temporary file
    engine cuts the pks into chunks: each chunk is a
      range [first pk, last pk] with its exact members  --> LoadRows(chunk pks), inside the chunk's
                                                            transaction: the queryset restricted
                                                            to these pks -> model instances
                                                        --> func(instance) per row, as for any item

Only primary keys and a pickled ``Query`` cross a process boundary (``pickle.dumps(qs.query)``
is Django's documented way to ship a query); model instances never do. A failure names
the row's primary key as its item.

Decisions, where the contract is silent:

- **Which rows.** The queryset is read once, when the run starts, before any item runs:
  that fixes the set of rows. A worker then loads its rows by primary key, with the
  queryset's filter applied first (so annotations and everything else about the queryset
  apply as written) and, for rows the filter no longer returns, by key alone. So a row
  that stops matching the filter during the run -- because of this run's own work or
  anyone else's -- is neither skipped nor processed twice, and a row that starts matching
  during the run is not added. Such late rows are loaded through the model's base manager
  with the queryset's ``select_related``, ``prefetch_related`` and ``only()``/``defer()``,
  but without its annotations. Why not pk ranges alone: a range ``(lo, hi]`` re-filtered
  in the worker drops rows that stopped matching, and a range not re-filtered adds rows
  that never matched; only the list of members says which rows the run is about.
- **Memory.** The pk snapshot is spooled to a temporary file beyond ``SPOOL_BYTES``, so
  the caller's memory stays flat for any number of rows; the pages are read with
  ``pk > last`` on the pk index, so each page costs the same however deep it is.
- **Order.** Rows run in primary-key order; the queryset's own ``order_by`` is not kept,
  except for a sliced queryset or one with ``distinct(*fields)``, whose keys are read in
  the queryset's own order (a slice needs its order to mean anything).
- **Duplicates.** A filter across a many-valued relation can return a row several times;
  it runs once. (``count()`` counts such a row as many times as the database does, so the
  progress bar total can be high; ``Report.total`` counts each row once.)
- **Deleted rows.** A row deleted after the run read its key fails with the model's
  ``DoesNotExist``, except in ``delete()`` (``missing_ok``), where it is already gone,
  typically by an earlier row's cascade, and counts as done.
- **Database.** The queryset's ``using()`` alias, else the router's write database; the
  ``database`` option overrides it. Reads and transactions both go there.
- **values() / values_list() querysets** hold plain data, not instances: their rows are
  snapshotted the same way and sent to workers as items.
- ``select_for_update()`` is dropped for reading the keys and kept for loading: each
  chunk locks its rows in its own transaction.
"""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.db import router
from django.db.models import Model, QuerySet
from django.db.models.query import ModelIterable

from bulkpool.errors import ConfigurationError

PAGE_SIZE = 10_000  # primary keys read per query while taking the snapshot
LOAD_BATCH = 500  # primary keys per ``pk__in`` when loading: below every database's parameter limit
SPOOL_BYTES = 8 * 1024 * 1024  # beyond this, the snapshot goes to disk


def database_of(queryset: QuerySet[Any]) -> str:
    """The alias a run over ``queryset`` reads and writes: its ``using()``, else the router's."""
    return queryset._db or router.db_for_write(queryset.model, **queryset._hints)  # type: ignore[attr-defined]


def split(
    queryset: QuerySet[Any], database: str, *, missing_ok: bool = False
) -> tuple[Snapshot, LoadRows | None]:
    """The items the engine runs over (primary keys) and the loader workers turn them into rows with.

    A ``values()`` / ``values_list()`` queryset gives its rows as the items, and no loader.
    """
    queryset = queryset.using(database)
    if queryset.query.combinator:
        raise ConfigurationError(
            f"A {queryset.query.combinator}() queryset cannot be split by primary key; "
            "run over the primary keys it gives, e.g. list(qs.values_list('pk', flat=True))."
        )
    if not issubclass(queryset._iterable_class, ModelIterable):
        return Snapshot(queryset, lambda: _plain_rows(queryset)), None
    try:
        query = pickle.dumps(queryset.query)
        prefetch = pickle.dumps(queryset._prefetch_related_lookups)  # type: ignore[attr-defined]
    except Exception as error:
        raise ConfigurationError(
            f"This queryset cannot be sent to workers: {type(error).__name__}: {error}."
        ) from error
    loader = LoadRows(queryset.model._meta.label, query, prefetch, database, missing_ok)
    return Snapshot(queryset, lambda: primary_keys(queryset)), loader


class Snapshot:
    """The queryset's items, read once when iteration starts; ``len()`` is one ``count()``."""

    def __init__(self, queryset: QuerySet[Any], read: Callable[[], Iterator[list[Any]]]) -> None:
        self.queryset = queryset
        self.read = read
        self._count: int | None = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = self.queryset.count()
        return self._count

    def __iter__(self) -> Iterator[Any]:
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
            for page in self.read():
                pickle.dump(page, spool, protocol=pickle.HIGHEST_PROTOCOL)
            spool.seek(0)
            while True:
                try:
                    page = pickle.load(spool)
                except EOFError:
                    return
                yield from page


def primary_keys(queryset: QuerySet[Any], page_size: int | None = None) -> Iterator[list[Any]]:
    """The queryset's primary keys, each once, as pages in primary-key order."""
    page_size = page_size or PAGE_SIZE
    keys = queryset.prefetch_related(None).values_list("pk", flat=True)
    keys.query.select_for_update = False
    if keys.query.is_sliced or keys.query.distinct_fields:
        yield from _in_own_order(keys, page_size)
        return
    keys = keys.order_by("pk")
    page = list(keys[:page_size])
    while page:
        # Sorted, so the same row returned twice by a join is returned twice in a row.
        yield [key for n, key in enumerate(page) if n == 0 or key != page[n - 1]]
        if len(page) < page_size:
            return
        page = list(keys.filter(pk__gt=page[-1])[:page_size])


def _in_own_order(keys: QuerySet[Any], page_size: int) -> Iterator[list[Any]]:
    seen: set[Any] = set()
    page: list[Any] = []
    for key in keys.iterator(chunk_size=page_size):
        if key not in seen:
            seen.add(key)
            page.append(key)
        if len(page) == page_size:
            yield page
            page = []
    if page:
        yield page


def _plain_rows(queryset: QuerySet[Any]) -> Iterator[list[Any]]:
    page: list[Any] = []
    for row in queryset.iterator(chunk_size=PAGE_SIZE):
        page.append(row)
        if len(page) == PAGE_SIZE:
            yield page
            page = []
    if page:
        yield page


@dataclass(frozen=True)
class LoadRows:
    """In a worker: a chunk's primary keys -> its model instances, in the same order.

    A row that no longer exists comes back as a ``DoesNotExist`` instance in its place (the
    worker reports it as that item's failure), or as None with ``missing_ok``.
    """

    model: str  # "app_label.ModelName": the class itself is looked up in the worker
    query: bytes  # pickle.dumps(queryset.query)
    prefetch: bytes  # the pickled prefetch_related() lookups, which live outside the Query
    database: str
    missing_ok: bool = False

    def __call__(self, keys: list[Any]) -> list[Any]:
        model = apps.get_model(self.model)
        lookups = pickle.loads(self.prefetch)
        query = pickle.loads(self.query)
        query.clear_limits()
        query.clear_ordering(force=True)
        as_filtered: QuerySet[Any] = QuerySet(model, query=query, using=self.database)
        found = _by_key(as_filtered.prefetch_related(*lookups), keys)
        missing = [key for key in keys if key not in found]
        if missing:
            by_key_alone = model._base_manager.db_manager(self.database).prefetch_related(*lookups)
            by_key_alone.query.select_related = query.select_related
            by_key_alone.query.deferred_loading = query.deferred_loading
            by_key_alone.query.select_for_update = query.select_for_update
            found.update(_by_key(by_key_alone, missing))
        return [
            found[key] if key in found else None if self.missing_ok else _gone(model, key) for key in keys
        ]


def _by_key(queryset: QuerySet[Any], keys: list[Any]) -> dict[Any, Model]:
    found: dict[Any, Model] = {}
    for start in range(0, len(keys), LOAD_BATCH):
        for obj in queryset.filter(pk__in=keys[start : start + LOAD_BATCH]):
            found.setdefault(obj.pk, obj)
    return found


def _gone(model: type[Model], key: Any) -> Exception:
    return model.DoesNotExist(  # type: ignore[attr-defined]
        f"{model.__name__} with pk={key!r} no longer exists: it was deleted after this run read the queryset."
    )
