"""upsert: the same rows, signals and (pk, created) as a loop of update_or_create; race-safe.

The equivalence tests run a loop of ``update_or_create`` in ``atomic()`` blocks, the way a
careful user writes it, and then ``bulkpool.upsert`` on the same starting rows, and compare
the rows written (every table the receivers write to) and the save signals received.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from auditlog.models import LogEntry
from django.db import connections, transaction
from django.db.models import Model

import bulkpool
from bulkpool import ConfigurationError
from bulkpool.fast import FastUpsertRow
from tests.test_fast import marks, recorded, same_signals, table_rows, undo
from tests.testapp.models import Author, Book, Place, Restaurant, Stamped, Tag
from tests.thirdparty.models import Customer

pytestmark = pytest.mark.django_db(transaction=True)

RUN: dict[str, Any] = {"backend": "serial", "chunk_size": 4, "progress": False}


def customer_rows() -> list[dict[str, Any]]:
    """Half the names exist already; c3 comes twice (the second row updates the first's object)."""
    rows = [{"name": f"c{i}", "email": f"new{i}@example.com"} for i in range(12)]
    return [*rows, {"name": "c3", "email": "again@example.com"}]


def existing_customers() -> None:
    for i in range(0, 12, 2):
        Customer.objects.create(name=f"c{i}", email=f"old{i}@example.com")


def update_or_create_loop(model: type[Model], rows: list[dict[str, Any]], keys: list[str]) -> list[Any]:
    """The hand-written reference: update_or_create per row, in atomic() blocks of 500, and
    the row's many-to-many values set after it."""
    relations = {field.name for field in model._meta.many_to_many}
    results = []
    for start in range(0, len(rows), 500):
        with transaction.atomic():
            for row in rows[start : start + 500]:
                key = {name: row[name] for name in keys}
                defaults = {k: v for k, v in row.items() if k not in keys and k not in relations}
                obj, created = model._default_manager.update_or_create(defaults=defaults, **key)
                for name in relations & row.keys():
                    getattr(obj, name).set(row[name])
                results.append((obj.pk, created))
    return results


def compare_with_the_loop(
    model: type[Model], rows: list[dict[str, Any]], keys: list[str], labels: set[str], **options: Any
) -> bulkpool.Report:
    """Rows, signals, created flags: upsert against the update_or_create loop, from one start."""
    before = {m: list(m._base_manager.values()) for m in (model,)}
    links = {f.name: {o.pk: list(getattr(o, f.name).all()) for o in model._base_manager.all()}
             for f in model._meta.many_to_many}  # fmt: skip
    since = marks()
    with recorded() as loop_signals:
        expected = update_or_create_loop(model, rows, keys)
    loop_rows = table_rows()
    undo(model, [pk for pk, created in expected if created], since)
    for row in before[model]:  # the existing objects back as they were, without signals
        model._base_manager.filter(pk=row["id"]).update(**row)
    for name, by_pk in links.items():
        for pk, targets in by_pk.items():
            through = getattr(model, name).through
            source = f"{model._meta.model_name}_id"
            through._default_manager.filter(**{source: pk}).delete()
            target = f"{getattr(model, name).field.related_model._meta.model_name}_id"
            through._default_manager.bulk_create(through(**{source: pk, target: t.pk}) for t in targets)
    with recorded() as signals:
        report = bulkpool.upsert(model, rows, unique_fields=keys, **{**RUN, **options})
    assert (report.ok, report.failed) == (len(rows), 0)
    assert [created for _, created in report.results or []] == [created for _, created in expected]
    assert len(report.results or []) == len(rows)
    assert (report.created, report.updated) == (
        sum(c for _, c in expected),
        len(rows) - sum(c for _, c in expected),
    )
    assert table_rows() == loop_rows
    same_signals(keys_unnumbered(signals), keys_unnumbered(loop_signals), labels)
    return report


def keys_unnumbered(signals: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The signals with primary keys as "pk": recorded() numbers keys in the order it first sees
    them, and the bulk path sees an existing object's key before a new one's (every pre_save
    comes before the INSERT). The rows compared name each object by its unique key anyway."""
    return [
        tuple(
            {
                k: "pk" if isinstance(v, str) and v.startswith("pk") and v[2:].isdigit() else v
                for k, v in part.items()
            }
            if isinstance(part, dict)
            else part
            for part in signal
        )
        for signal in signals
    ]


@pytest.fixture
def bulk_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the pieces upsert(fast=True) ran through its bulk path (serial backend)."""
    calls: list[int] = []
    batch = FastUpsertRow.batch

    def counted(self: FastUpsertRow, rows: list[Any], *state: Any) -> list[Any]:
        calls.append(len(rows))
        return batch(self, rows, *state)

    monkeypatch.setattr(FastUpsertRow, "batch", counted)
    return calls


@pytest.mark.parametrize("fast", [False, True])
def test_third_party_receivers_see_the_same_upserts_as_update_or_create(fast, bulk_calls):
    """django-simple-history and django-auditlog rows, save signals and created flags as the loop's."""
    existing_customers()
    rows = customer_rows()
    report = compare_with_the_loop(Customer, rows, ["name"], {"thirdparty.Customer"}, fast=fast)
    assert sum(bulk_calls) == (len(rows) if fast else 0)  # fast=True: every row on the bulk path
    assert (report.created, report.updated) == (6, 7)
    assert "6 created, 7 updated" in str(report)
    assert LogEntry.objects.filter(action=LogEntry.Action.UPDATE).count() == 7


@pytest.mark.parametrize("fast", [False, True])
def test_a_save_override_runs_for_created_and_updated_rows(fast, bulk_calls, caplog):
    """Author.save() sets the slug, on both kinds of row, as update_or_create does; fast=True says
    it takes the exact path for such a model."""
    Author.objects.create(name="ann", email="old@example.com")
    rows = [{"name": "ann", "email": "ANN@example.com"}, {"name": "bob", "email": "Bob@example.com"}]
    with caplog.at_level("INFO", logger="bulkpool"):
        compare_with_the_loop(Author, rows, ["name"], {"testapp.Author"}, fast=fast)
    assert bulk_calls == []
    assert ("Author overrides save()" in caplog.text) == fast
    assert sorted(Author.objects.values_list("slug", "email")) == [
        ("ann", "ann@example.com"),
        ("bob", "bob@example.com"),
    ]


@pytest.mark.parametrize("fast", [False, True])
def test_an_mti_child_and_a_many_to_many_field_upsert_as_update_or_create_does(fast, bulk_calls):
    """Restaurant (MTI) and Book (tags): tables and signals, m2m_changed too, as the loop's."""
    old = Restaurant.objects.create(name="old", serves_pizza=False)
    rows = [{"id": old.pk, "name": "renamed", "serves_pizza": True}, {"id": old.pk + 100, "name": "new"}]
    compare_with_the_loop(Restaurant, rows, ["id"], {"testapp.Restaurant", "testapp.Place"}, fast=fast)
    author = Author.objects.create(name="ann")
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    book = Book.objects.create(title="old", author=author)
    book.tags.set([red])
    rows = [
        {"id": book.pk, "title": "old", "author": author, "tags": [blue]},
        {"id": book.pk + 50, "title": "new", "author": author, "tags": [red, blue]},
    ]
    compare_with_the_loop(Book, rows, ["id"], {"testapp.Book"}, fast=fast)
    assert sum(bulk_calls) == (4 if fast else 0)


@pytest.mark.parametrize("fast", [False, True])
def test_multi_table_inheritance_by_primary_key(fast, bulk_calls):
    """An MTI child keyed on its primary key: a new one writes both tables, an old one is updated."""
    old = Restaurant.objects.create(name="old", serves_pizza=False)
    rows = [{"id": old.pk, "name": "renamed", "serves_pizza": True}, {"id": old.pk + 100, "name": "new"}]
    report = bulkpool.upsert(Restaurant, rows, unique_fields=["id"], fast=fast, **RUN)
    assert sum(bulk_calls) == (2 if fast else 0)
    assert report.results == [(old.pk, False), (old.pk + 100, True)]
    assert sorted(Restaurant.objects.values_list("pk", "name", "serves_pizza")) == [
        (old.pk, "renamed", True),
        (old.pk + 100, "new", False),
    ]
    assert Place.objects.count() == 2


@pytest.mark.parametrize("fast", [False, True])
def test_update_fields_limit_what_existing_objects_get(fast):
    """update_fields: an existing object gets only those; a new one gets the whole row."""
    Customer.objects.create(name="c0", email="old@example.com")
    rows = [{"name": "c0", "email": "x@example.com"}, {"name": "c1", "email": "y@example.com"}]
    with recorded() as signals:
        report = bulkpool.upsert(Customer, rows, unique_fields=["name"], update_fields=[], fast=fast, **RUN)
    saves = [(kind, created) for kind, label, *rest in signals if label == "thirdparty.Customer"
             for created in [rest[0] if kind == "post_save" else None]]  # fmt: skip
    assert saves == [("pre_save", None), ("post_save", True)]  # c0: save(update_fields=[]) sends nothing
    assert [created for _, created in report.results or []] == [False, True]
    assert sorted(Customer.objects.values_list("name", "email")) == [
        ("c0", "old@example.com"),
        ("c1", "y@example.com"),
    ]


@pytest.mark.parametrize("fast", [False, True])
def test_many_to_many_values_are_set_on_created_and_updated_objects(fast, bulk_calls):
    """A row's many-to-many values are set after the save, on both kinds of object."""
    author = Author.objects.create(name="ann")
    red, blue = Tag.objects.create(name="red"), Tag.objects.create(name="blue")
    old = Book.objects.create(title="old", author=author)
    old.tags.set([red])
    rows = [
        {"id": old.pk, "title": "old", "author": author, "tags": [blue]},
        {"id": old.pk + 50, "title": "new", "author": author, "tags": [red, blue]},
    ]
    bulkpool.upsert(Book, rows, unique_fields=["id"], fast=fast, **RUN)
    assert sum(bulk_calls) == (2 if fast else 0)
    tags = {b.title: sorted(t.name for t in b.tags.all()) for b in Book.objects.all()}
    assert tags == {"old": ["blue"], "new": ["blue", "red"]}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["email"], "no unique constraint of Customer covers exactly these fields"),
        ("name", "not the string"),
        ([], "must name the fields"),
        (["nope"], "Customer has no field named 'nope'"),
    ],
)
def test_a_key_that_cannot_find_one_object_is_refused_before_anything_runs(keys, message):
    """unique_fields must be a unique key of the model: checked before item one, with the keys it has."""
    with pytest.raises(ConfigurationError, match=message):
        bulkpool.upsert(Customer, [{"name": "c0"}], unique_fields=keys, **RUN)
    assert not Customer.objects.exists()


@pytest.mark.parametrize("fast", [False, True])
def test_a_row_without_its_key_fails_alone(fast):
    """A row that lacks a key field fails with a message naming it; the other rows are written."""
    rows = [{"name": "c0"}, {"email": "no-name@example.com"}, {"name": "c2"}]
    report = bulkpool.upsert(Customer, rows, unique_fields=["name"], fast=fast, **RUN)
    assert (report.ok, [f.index for f in report.failures]) == (2, [1])
    assert "no value for name" in report.failures[0].message
    assert sorted(Customer.objects.values_list("name", flat=True)) == ["c0", "c2"]


@pytest.mark.parametrize("fast", [False, True])
def test_the_same_key_on_two_workers_at_once_creates_one_object(fast):
    """Each key twice, in chunks that two processes run at once: one object per key, every row ok."""
    # Chunks 2j and 2j+1 hold the same five keys, and the two workers take them at once.
    keys = [f"k{i}" for group in range(8) for i in [*range(group * 5, group * 5 + 5)] * 2]
    rows = [{"name": key, "email": f"{n}@example.com"} for n, key in enumerate(keys)]
    report = bulkpool.upsert(
        Customer, rows, unique_fields=["name"], fast=fast, backend="process", workers=2, chunk_size=5
    )
    assert (report.ok, report.failed, report.created, report.updated) == (80, 0, 40, 40)
    assert Customer.objects.count() == 40
    by_pk = {pk for pk, _ in report.results or []}
    assert by_pk == set(Customer.objects.values_list("pk", flat=True))


@pytest.mark.parametrize("fast", [False, True])
def test_two_runs_upserting_the_same_keys_at_once_create_each_object_once(fast):
    """Two concurrent upsert runs over the same keys: 40 objects, 40 created in all, nothing failed."""
    rows = [{"name": f"k{i}", "email": f"{i}@example.com"} for i in range(40)]
    barrier = threading.Barrier(2)
    reports: list[bulkpool.Report] = []

    def run() -> None:
        try:
            barrier.wait()
            reports.append(bulkpool.upsert(Customer, rows, unique_fields=["name"], fast=fast, **RUN))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(reports) == 2 and [r.failed for r in reports] == [0, 0]
    assert sum(r.created or 0 for r in reports) == 40
    assert sum(r.updated or 0 for r in reports) == 40
    assert Customer.objects.count() == 40


@pytest.mark.parametrize("fast", [False, True])
def test_a_resumed_upsert_reports_every_result_and_writes_each_row_once(fast):
    """Stopped when its input broke, then resumed: (pk, created) for every row, those of the first
    attempt read back from the journal; nothing written twice."""
    rows = [{"name": f"c{i}", "email": f"{i}@example.com"} for i in range(30)]

    def breaking() -> Iterator[dict[str, Any]]:
        yield from rows[:20]
        raise OSError("the input broke")

    options = {**RUN, "chunk_size": 10, "run_id": "upsert-resume", "fast": fast}
    with pytest.raises(bulkpool.InputFailed):
        bulkpool.upsert(Customer, breaking(), unique_fields=["name"], **options)
    assert Customer.objects.count() == 20
    resumed = bulkpool.upsert(Customer, rows, unique_fields=["name"], **options)
    assert (resumed.skipped, resumed.ok) == (20, 10)
    pks = dict(Customer.objects.values_list("name", "pk"))
    assert resumed.results == [(pks[f"c{i}"], True) for i in range(30)]
    assert Customer.objects.count() == 30


@pytest.mark.vendor("postgresql", "mysql")
def test_a_lost_race_to_create_becomes_an_update():
    """Another transaction creates the key between this row's read and its INSERT: the row
    updates that object (created False) instead of failing."""
    from bulkpool.rows import UpsertRow

    upsert = UpsertRow("thirdparty.Customer", ("name",), None, "default")
    inserted, done = threading.Event(), threading.Event()

    def first() -> None:
        try:
            with transaction.atomic():
                upsert({"name": "k", "email": "first@example.com"})
                inserted.set()
                done.wait(0.5)  # the second caller is blocked on this uncommitted row meanwhile
        finally:
            connections.close_all()

    thread = threading.Thread(target=first)
    thread.start()
    assert inserted.wait(10)
    with transaction.atomic():
        pk, created = upsert({"name": "k", "email": "second@example.com"})
    thread.join()
    assert created is False
    assert list(Customer.objects.values_list("pk", "email")) == [(pk, "second@example.com")]


@pytest.mark.parametrize("fast", [False, True])
def test_an_existing_objects_creation_time_stays_and_its_auto_now_moves(fast, bulk_calls):
    """auto_now_add is kept on an existing object and auto_now set, as update_or_create does:
    the bulk path's INSERT ... ON CONFLICT would give it a new creation time."""
    old = Stamped.objects.create(name="a", note="old")
    created, touched = old.created_at, old.touched_at
    rows = [{"name": "a", "note": "new"}, {"name": "b", "note": "fresh"}]
    report = bulkpool.upsert(Stamped, rows, unique_fields=["name"], fast=fast, **RUN)
    assert [c for _, c in report.results or []] == [False, True]
    assert sum(bulk_calls) == (2 if fast else 0)
    again = Stamped.objects.get(name="a")
    assert (again.note, again.created_at) == ("new", created)
    assert again.touched_at > touched
