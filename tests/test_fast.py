"""create(fast=True): the same rows and the same signals as the exact path, in bulk statements.

Each equivalence test runs the exact path and the fast path on the same rows, and compares
the rows written (every table the receivers write to, primary keys and times normalised)
and the signals received, with their arguments and the instance's field values.
"""

from __future__ import annotations

import datetime
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from auditlog.models import LogEntry
from django.contrib.auth.models import User
from django.db import connection
from django.db.models import Model
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

import bulkpool
from bulkpool import fast as bulk
from bulkpool.fast import why_not
from tests import jobs
from tests.testapp.models import AuditLog, Author, Book, Document, Marker, Place, Restaurant, Tag
from tests.thirdparty.models import Customer

returns_keys = pytest.mark.skipif(
    "not __import__('django.db').db.connection.features.can_return_rows_from_bulk_insert",
    reason="the database returns no keys from a multi-row INSERT",
)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return "<time>"
    return value


def _fields(obj: Model, pks: dict[Any, dict[Any, str]]) -> dict[str, Any]:
    """The instance's concrete field values; keys (its own and links) as their position."""
    values = {}
    for field in obj._meta.concrete_fields:
        value = getattr(obj, field.attname)
        if field.primary_key or (field.is_relation and field.one_to_one):
            # Numbered per model: the receivers write rows of other models meanwhile.
            numbers = pks.setdefault(obj._meta.concrete_model, {})
            value = numbers.setdefault(value, f"pk{len(numbers)}") if value is not None else None
        values[field.attname] = _plain(value)
    return values


@contextmanager
def recorded() -> Iterator[list[tuple[Any, ...]]]:
    """The save and m2m signals received meanwhile, as comparable tuples."""
    seen: list[tuple[Any, ...]] = []
    pks: dict[Any, dict[Any, str]] = {}

    def on_pre_save(
        sender: Any, instance: Model, raw: bool, using: str, update_fields: Any, **kw: Any
    ) -> None:
        seen.append(("pre_save", sender._meta.label, raw, using, update_fields, _fields(instance, pks)))

    def on_post_save(sender: Any, instance: Model, created: bool, raw: bool, using: str, **kw: Any) -> None:
        seen.append(
            (
                "post_save",
                sender._meta.label,
                created,
                raw,
                using,
                kw["update_fields"],
                _fields(instance, pks),
            )
        )

    def on_m2m(
        sender: Any, instance: Model, action: str, reverse: bool, model: Any, pk_set: Any, **kw: Any
    ) -> None:
        targets = sorted(Tag.objects.filter(pk__in=pk_set).values_list("name", flat=True))
        seen.append(
            ("m2m_changed", sender._meta.label, action, reverse, model._meta.label, targets, kw["using"])
        )

    def on_pre_delete(sender: Any, instance: Model, using: str, **kw: Any) -> None:
        seen.append(("pre_delete", sender._meta.label, using, _fields(instance, pks)))

    def on_post_delete(sender: Any, instance: Model, using: str, **kw: Any) -> None:
        seen.append(("post_delete", sender._meta.label, using, _fields(instance, pks)))

    receivers: list[tuple[Any, Callable[..., None]]] = [
        (pre_save, on_pre_save),
        (post_save, on_post_save),
        (m2m_changed, on_m2m),
        (pre_delete, on_pre_delete),
        (post_delete, on_post_delete),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False, dispatch_uid=f"test_fast.{receiver.__name__}")
    try:
        yield seen
    finally:
        for signal, receiver in receivers:
            signal.disconnect(dispatch_uid=f"test_fast.{receiver.__name__}")


def own_signals(seen: list[tuple[Any, ...]], labels: set[str]) -> dict[str, list[tuple[Any, ...]]]:
    """The signals about the models created (not those of rows the receivers write, such as
    AuditLog), by kind, each kind in the order sent. (The fast path sends every pre_save of a
    chunk before its INSERT, so kinds interleave differently: the documented difference.)"""
    kinds: dict[str, list[tuple[Any, ...]]] = {}
    for s in seen:
        if s[1] in labels or s[0] == "m2m_changed":
            kinds.setdefault(s[0] if s[0] != "m2m_changed" else f"m2m {s[2]}", []).append(s)
    return kinds


def table_rows() -> dict[str, list[Any]]:
    """What is in every table the tests write to, keys and times left out."""

    def rows(model: type[Model], *fields: str) -> list[Any]:
        return sorted(model._default_manager.values_list(*fields), key=repr)

    return {
        "book": rows(Book, "title", "author__name", "pages"),
        "book_tags": sorted(Book.tags.through.objects.values_list("book__title", "tag__name")),
        "place": rows(Place, "name"),
        "restaurant": rows(Restaurant, "name", "serves_pizza"),
        "document": rows(Document, "title"),
        "marker": rows(Marker, "key", "value"),
        "customer": rows(Customer, "name", "email"),
        "user": rows(User, "username", "email", "password", "is_staff"),
        "history": rows(Customer.history.model, "name", "email", "history_type"),
        "logentry": sorted(
            (e.object_repr, e.action, {k: v for k, v in (e.changes or {}).items() if k != "id"})
            for e in LogEntry.objects.all()
        ),
        "auditlog": [(a.action, a.model) for a in AuditLog.objects.order_by("action", "model")],
    }


@contextmanager
def batched() -> Iterator[Counter[str]]:
    """Rows handed to the bulk path (``batch`` of FastCreateRow, FastUpdateRow, FastDeleteRow)
    meanwhile, by kind: proof that the bulk path ran, in this process (serial and thread
    workers). Without it, a database where the bulk path is never taken would compare the
    exact path with itself and pass."""
    counts: Counter[str] = Counter()
    patch = pytest.MonkeyPatch()
    for kind, cls in (
        ("create", bulk.FastCreateRow),
        ("update", bulk.FastUpdateRow),
        ("delete", bulk.FastDeleteRow),
    ):
        original = cls.batch

        def spy(self: Any, rows: list[Any], *state: Any, _original: Any = original, _kind: str = kind) -> Any:
            counts[_kind] += len(rows)
            return _original(self, rows, *state)

        patch.setattr(cls, "batch", spy)
    try:
        yield counts
    finally:
        patch.undo()


def results(report: bulkpool.Report) -> list[Any]:
    assert report.results is not None
    return report.results


LOGS = (AuditLog, Customer.history.model, LogEntry)  # rows the receivers write


def marks() -> dict[type[Model], int]:
    return {model: max(model._default_manager.values_list("pk", flat=True), default=0) for model in LOGS}


def undo(model: type[Model], pks: list[Any], since: dict[type[Model], int]) -> None:
    """Delete the objects created, and every receiver row written since ``since``."""
    model._base_manager.filter(pk__in=[pk for pk in pks if pk is not None]).delete()
    for log, mark in since.items():
        log._default_manager.filter(pk__gt=mark).delete()


def both_paths(model: type[Model], rows: list[dict[str, Any]], labels: set[str], **options: Any) -> None:
    """Run the exact path, then the fast path, on ``rows``: same report, rows and signals."""
    options = {"backend": "serial", "chunk_size": 4, "progress": False, **options}
    since = marks()
    with recorded() as exact_signals:
        exact = bulkpool.create(model, rows, **options)
    exact_rows = table_rows()
    undo(model, results(exact), since)
    with recorded() as fast_signals, batched() as bulk_rows:
        fast = bulkpool.create(model, rows, fast=True, **options)
    assert bulk_rows["create"] == len(rows), "the bulk path did not run"
    assert (fast.ok, fast.failed, [f.index for f in fast.failures]) == (
        exact.ok,
        exact.failed,
        [f.index for f in exact.failures],
    )
    assert [type(pk) for pk in results(fast)] == [type(pk) for pk in results(exact)]
    assert table_rows() == exact_rows
    fast_own, exact_own = own_signals(fast_signals, labels), own_signals(exact_signals, labels)
    for kind in exact_own:
        assert fast_own.get(kind) == exact_own[kind], kind
    assert fast_own.keys() == exact_own.keys()
    assert fast_signals and len(fast_signals) == len(exact_signals)


@pytest.mark.django_db
def test_books_with_tags_are_created_alike():
    """Foreign keys and many-to-many values (pks, instances): same rows and signals, m2m_changed too."""
    author = Author.objects.create(name="ann")
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    rows = [
        {"title": f"book {i}", "author": author, "pages": i, "tags": [red.pk, blue] if i % 2 else []}
        for i in range(10)
    ]
    both_paths(Book, rows, {"testapp.Book"})


@pytest.mark.django_db
def test_primary_keys_land_in_results_in_input_order():
    """report.results are the new objects' keys, in input order, and they are the rows' keys."""
    with batched() as bulk_rows:
        report = bulkpool.create(
            Marker,
            [{"key": f"k{i}", "value": i} for i in range(10)],
            fast=True,
            backend="serial",
            chunk_size=3,
        )
    assert report.ok == 10 and bulk_rows["create"] == 10
    assert [Marker.objects.get(pk=pk).value for pk in results(report)] == list(range(10))


@pytest.mark.django_db
def test_python_side_keys_work_on_every_database():
    """A UUID primary key made by Python needs nothing back from the database."""
    assert why_not(Document, "default") is None
    both_paths(Document, [{"title": f"d{i}"} for i in range(7)], {"testapp.Document"})


@returns_keys
@pytest.mark.django_db
def test_multi_table_inheritance_inserts_parents_then_children():
    """A Restaurant's Place row, then its own row, with the keys the database returned."""
    rows = [{"name": f"r{i}", "serves_pizza": bool(i % 2)} for i in range(9)]
    both_paths(Restaurant, rows, {"testapp.Restaurant", "testapp.Place"})
    # Each child row links to the parent row made for its own input row (the fast path's rows
    # are the ones left): a mix-up of returned keys would pair a name with the wrong flag.
    names = dict(Place.objects.values_list("pk", "name"))
    linked = {
        names[ptr]: pizza for ptr, pizza in Restaurant.objects.values_list("place_ptr_id", "serves_pizza")
    }
    assert linked == {row["name"]: row["serves_pizza"] for row in rows}


@pytest.mark.django_db
def test_third_party_history_and_audit_rows_are_written_alike():
    """django-simple-history and django-auditlog write the same rows on both paths."""
    rows = [{"name": f"c{i}", "email": f"c{i}@example.com"} for i in range(9)]
    both_paths(Customer, rows, {"thirdparty.Customer"})
    assert Customer.history.count() == 9 and LogEntry.objects.count() == 9


@pytest.mark.django_db
def test_users_take_the_fast_path():
    """auth.User: Django's own AbstractBaseUser.save() is known, so users are created in bulk, alike."""
    assert why_not(User, "default") is None
    rows = [{"username": f"u{i}", "email": f"u{i}@example.com", "password": "!"} for i in range(6)]
    both_paths(User, rows, {"auth.User"})


@pytest.mark.django_db
def test_a_failing_row_fails_alone():
    """A duplicate name fails its row only (the chunk runs again on the exact path); the rest are written."""
    Customer.objects.create(name="c3")
    rows = [{"name": f"c{i}"} for i in range(8)]
    with batched() as bulk_rows:
        report = bulkpool.create(Customer, rows, fast=True, backend="serial", chunk_size=8)
    assert bulk_rows["create"] == 8  # tried in bulk first, then the chunk on the exact path
    assert (report.ok, report.failed, report.failures[0].index) == (7, 1, 3)
    assert "IntegrityError" in report.failures[0].exc_type
    keys = results(report)
    assert keys[3] is None and None not in keys[:3] + keys[4:]
    assert Customer.objects.count() == 8


@pytest.mark.django_db(transaction=True)
def test_a_dangling_foreign_key_fails_alone_on_workers():
    """A row whose foreign key dangles fails alone at COMMIT, on a thread worker too."""
    author = Author.objects.create(name="ann")
    rows = [{"title": f"b{i}", "author_id": author.pk if i != 2 else author.pk + 1000} for i in range(6)]
    with batched() as bulk_rows:
        report = bulkpool.create(Book, rows, fast=True, backend="thread", workers=1, chunk_size=6)
    assert bulk_rows["create"] >= 6
    assert (report.ok, report.failed, report.failures[0].index) == (5, 1, 2)
    assert Book.objects.count() == 5


@pytest.mark.django_db
def test_validate_runs_full_clean_before_the_insert():
    """validate=True: a row that fails full_clean fails alone, with Django's message."""
    rows = [{"key": "x" * (200 if i == 1 else 3), "value": i} for i in range(4)]
    with batched() as bulk_rows:
        report = bulkpool.create(Marker, rows, fast=True, validate=True, backend="serial")
    assert bulk_rows["create"] >= 4
    assert (report.ok, report.failed, report.failures[0].index) == (3, 1, 1)
    assert report.failures[0].exc_type == "django.core.exceptions.ValidationError"


@pytest.mark.django_db
def test_a_model_that_overrides_save_takes_the_exact_path_and_says_so(caplog):
    """Author overrides save(): fast=True runs save() per row, logged once on "bulkpool"."""
    with caplog.at_level(logging.INFO, logger="bulkpool"):
        report = bulkpool.create(Author, [{"name": f"a{i}"} for i in range(5)], fast=True, backend="serial")
    assert report.ok == 5 and all(a.slug == a.name for a in Author.objects.all())
    lines = [r.getMessage() for r in caplog.records if "exact path" in r.getMessage()]
    assert lines == [
        "create(testapp.Author, fast=True) uses the exact path (save() per row): Author overrides save()."
    ]


@pytest.mark.django_db(transaction=True)
def test_fast_create_on_process_workers(caplog):
    """On process workers the rows, keys and the receivers' rows are those of the exact path."""
    rows = [{"name": f"c{i}", "email": f"C{i}@x.org"} for i in range(12)]
    with caplog.at_level(logging.INFO, logger="bulkpool"):
        report = bulkpool.create(Customer, rows, fast=True, backend="process", workers=2, chunk_size=4)
    # The workers' batch() calls cannot be counted from here; the caller chose the bulk path
    # if it did not log that it uses the exact one.
    assert not [r.getMessage() for r in caplog.records if "exact path" in r.getMessage()]
    assert report.ok == 12
    assert sorted(results(report)) == sorted(Customer.objects.values_list("pk", flat=True))
    assert Customer.history.count() == 12 and LogEntry.objects.count() == 12


def test_why_not_names_missing_returned_keys_where_the_database_cannot_return_them():
    """Without RETURNING from a multi-row INSERT, a model with a database-made key takes the exact path."""
    reason = why_not(Marker, "default")
    if connection.features.can_return_rows_from_bulk_insert:
        assert reason is None
    else:
        assert reason is not None and "cannot return the keys" in reason


@pytest.mark.django_db
def test_without_returned_keys_the_exact_path_is_used(monkeypatch, caplog):
    """As on MySQL: no keys back from a multi-row INSERT, so fast=True saves per row, and says why."""
    monkeypatch.setattr(type(connection.features), "can_return_rows_from_bulk_insert", False)
    with caplog.at_level(logging.INFO, logger="bulkpool"):
        report = bulkpool.create(Marker, [{"key": "a"}, {"key": "b"}], fast=True, backend="serial")
    assert report.ok == 2 and None not in results(report)
    assert any("cannot return the keys" in r.getMessage() for r in caplog.records)


def same_signals(
    fast: list[tuple[Any, ...]], exact: list[tuple[Any, ...]], labels: set[str], *, in_order: bool = True
) -> None:
    """The same signals of each kind; ``in_order=False``: in any order (a queryset delete()
    sends a chunk's delete signals in the order of Django's collector)."""
    fast_own, exact_own = own_signals(fast, labels), own_signals(exact, labels)
    for kind in exact_own:
        if in_order:
            assert fast_own.get(kind) == exact_own[kind], kind
        else:
            assert sorted(map(repr, fast_own.get(kind, []))) == sorted(map(repr, exact_own[kind])), kind
    assert fast_own.keys() == exact_own.keys()
    assert len(fast) == len(exact)


def add_x(book: Book) -> None:
    book.title += "x"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("model", "options"),
    [
        (Book, {"values": {"pages": 7}, "update_fields": ["pages"]}),
        (Book, {"values": {"pages": 7}, "update_fields": []}),  # save() does nothing, sends nothing
        (Book, {"func": add_x}),
        (Customer, {"values": {"email": "new@example.com"}}),
        (User, {"values": {"is_staff": True}, "update_fields": ["is_staff"]}),
    ],
)
def test_update_is_alike(model, options):
    """update(fast=True): the same rows and save signals (update_fields included) as the exact path."""
    author = Author.objects.create(name="ann")
    for i in range(7):
        if model is Book:
            Book.objects.create(title=f"b{i}", author=author)
        elif model is Customer:
            Customer.objects.create(name=f"c{i}")
        else:
            User.objects.create(username=f"u{i}")
    before = list(model.objects.order_by("pk").values())
    since = marks()
    run: dict[str, Any] = {"backend": "serial", "chunk_size": 3, "progress": False}
    with recorded() as exact_signals:
        exact = bulkpool.update(model.objects.all(), **options, **run)
    exact_rows = table_rows()
    for row in before:  # back as they were, without signals
        model.objects.filter(pk=row["pk" if "pk" in row else "id"]).update(**row)
    undo(Marker, [], since)
    with recorded() as fast_signals, batched() as bulk_rows:
        fast = bulkpool.update(model.objects.all(), fast=True, **options, **run)
    assert bulk_rows["update"] == 7, "the bulk path did not run"
    assert (fast.ok, fast.failed) == (exact.ok, exact.failed) == (7, 0)
    assert table_rows() == exact_rows
    same_signals(fast_signals, exact_signals, {model._meta.label})


@pytest.mark.django_db
@pytest.mark.parametrize("model", [Book, Customer])
def test_delete_is_alike(model):
    """delete(fast=True): one queryset delete() per chunk; the same rows left and the same delete signals."""
    author = Author.objects.create(name="ann")
    red = Tag.objects.create(name="red")

    def make() -> None:
        for i in range(7):
            if model is Book:
                Book.objects.create(title=f"b{i}", author=author).tags.set([red])
            else:
                Customer.objects.create(name=f"c{i}")

    run: dict[str, Any] = {"backend": "serial", "chunk_size": 3, "progress": False}
    make()
    with recorded() as exact_signals:
        exact = bulkpool.delete(model.objects.all(), **run)
    exact_rows = table_rows()
    make()
    for log, mark in marks().items():  # the rows the second make() logged
        log._default_manager.filter(pk__gt=mark).delete()
    undo(Marker, [], {})
    with recorded() as fast_signals, batched() as bulk_rows:
        fast = bulkpool.delete(model.objects.all(), fast=True, **run)
    assert bulk_rows["delete"] == 7, "the bulk path did not run"
    assert (fast.ok, fast.failed) == (exact.ok, exact.failed) == (7, 0)
    assert model.objects.count() == 0
    same_signals(fast_signals, exact_signals, {model._meta.label}, in_order=False)
    assert {k: v for k, v in table_rows().items() if k not in ("history", "logentry", "auditlog")} == {
        k: v for k, v in exact_rows.items() if k not in ("history", "logentry", "auditlog")
    }


@pytest.mark.django_db
def test_delete_of_a_model_that_overrides_delete_takes_the_exact_path(caplog):
    """Author overrides delete(): fast=True calls it per object, and says so."""
    Author.objects.create(name="ann")
    with caplog.at_level(logging.INFO, logger="bulkpool"):
        report = bulkpool.delete(Author.objects.all(), fast=True, backend="serial")
    assert report.ok == 1 and AuditLog.objects.filter(action="delete()").count() == 1
    assert any("Author overrides delete()" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_a_failing_update_fails_alone():
    """A row that func refuses fails alone; the chunk runs again on the exact path and the rest are saved."""
    for i in range(6):
        Customer.objects.create(name=f"c{i}")
    with batched() as bulk_rows:
        report = bulkpool.update(
            Customer.objects.all(), jobs.refuse_c3, fast=True, backend="serial", chunk_size=6
        )
    assert bulk_rows["update"] == 6
    assert (report.ok, report.failed) == (5, 1)
    assert Customer.objects.filter(email="done@example.com").count() == 5


@pytest.mark.django_db
def test_update_of_an_only_queryset_saves_and_signals_the_loaded_fields():
    """As save() does for a deferred object: update_fields is the loaded fields, and only they are written."""
    Customer.objects.create(name="c0", email="old@example.com")
    with recorded() as seen, batched() as bulk_rows:
        report = bulkpool.update(
            Customer.objects.only("name"), jobs.rename, fast=True, backend="serial", progress=False
        )
    assert report.ok == 1 and bulk_rows["update"] == 1
    assert list(Customer.objects.values_list("name", "email")) == [("c0!", "old@example.com")]
    saves = [s for s in seen if s[0] in ("pre_save", "post_save") and s[1] == "thirdparty.Customer"]
    assert [s[4 if s[0] == "pre_save" else 5] for s in saves] == [frozenset({"name"})] * 2


@pytest.mark.django_db
def test_reverse_many_to_many_values_are_set_alike():
    """A Tag created with books=[...] (the reverse side): same through rows, m2m_changed(reverse=True)."""
    author = Author.objects.create(name="ann")
    books = [Book.objects.create(title=f"b{i}", author=author) for i in range(3)]
    rows = [{"name": f"t{i}", "books": books[: i % 4]} for i in range(6)]
    since = marks()
    with recorded() as exact_signals:
        exact = bulkpool.create(Tag, rows, backend="serial", chunk_size=4)
    exact_links = sorted(Book.tags.through.objects.values_list("book__title", "tag__name"))
    undo(Tag, results(exact), since)
    with recorded() as fast_signals, batched() as bulk_rows:
        fast = bulkpool.create(Tag, rows, fast=True, backend="serial", chunk_size=4)
    assert fast.ok == exact.ok == 6 and bulk_rows["create"] == 6
    assert sorted(Book.tags.through.objects.values_list("book__title", "tag__name")) == exact_links
    exact_m2m = [s[:5] for s in exact_signals if s[0] == "m2m_changed"]
    assert exact_m2m and all(s[3] is True for s in exact_m2m)
    assert sorted(s[:5] for s in fast_signals if s[0] == "m2m_changed") == sorted(exact_m2m)


@pytest.mark.django_db(transaction=True)
def test_a_journaled_fast_run_resumes_and_a_dry_run_writes_nothing():
    """fast=True keeps the journal (a rerun skips every chunk) and dry_run (nothing stays written)."""
    rows = [{"key": f"k{i}", "value": i} for i in range(9)]
    with batched() as bulk_rows:
        dry = bulkpool.create(
            Marker, rows, fast=True, backend="thread", workers=2, chunk_size=4, dry_run=True
        )
    assert dry.ok == 9 and Marker.objects.count() == 0 and bulk_rows["create"] == 9
    first = bulkpool.create(Marker, rows, fast=True, backend="thread", workers=2, chunk_size=4, run_id="fast")
    second = bulkpool.create(
        Marker, rows, fast=True, backend="thread", workers=2, chunk_size=4, run_id="fast"
    )
    assert (first.ok, second.skipped, Marker.objects.count()) == (9, 9, 9)
