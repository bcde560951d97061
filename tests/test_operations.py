"""bulkpool.create / update / delete keep the model's behaviour (bulkpool.operations)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from django.db.models.signals import post_save

import bulkpool
from bulkpool import ConfigurationError
from tests.params import EXECUTORS
from tests.testapp.models import AuditLog, Author, Book, Document, Marker, Place, Restaurant, Tag

RUN: dict[str, Any] = {"workers": 2, "chunk_size": 3, "progress": False}
UPDATE_FIELDS_UID = "tests.test_operations.record_update_fields"


# -- what the workers run: module-level, so every backend can ship them -------------------


def record_update_fields(sender: Any, instance: Any, update_fields: Any, **kwargs: Any) -> None:
    """post_save: one Marker naming the update_fields the signal carried."""
    names = ",".join(sorted(update_fields)) if update_fields is not None else "None"
    Marker.objects.create(key=f"update_fields:{names}")


def connect_update_fields_recorder() -> None:
    """setup: connect the recorder in each worker (threads share the test's process)."""
    post_save.connect(record_update_fields, sender=Author, dispatch_uid=UPDATE_FIELDS_UID)


def rename(author: Author) -> None:
    author.name = f"Renamed {author.name}"


def rename_and_change_email(author: Author) -> None:
    author.name = f"Renamed {author.name}"
    author.email = "changed@example.com"


def refuse_author_2(author: Author) -> None:
    if author.name == "author-2":
        raise ValueError("author-2 cannot be updated")
    author.email = "updated@example.com"


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def update_fields_recorder():
    yield
    post_save.disconnect(sender=Author, dispatch_uid=UPDATE_FIELDS_UID)


def make_authors(count: int = 6) -> list[Author]:
    return [Author.objects.create(name=f"author-{n}") for n in range(count)]


def actions(model: str, pk: object) -> list[str]:
    return list(AuditLog.objects.filter(model=model, object_pk=str(pk)).values_list("action", flat=True))


def keys(report: bulkpool.Report, count: int) -> list[Any]:
    """The report's results: ``count`` primary keys, none missing (an empty list would let
    every assertion over it pass)."""
    assert report.results is not None and len(report.results) == count, report.results
    assert None not in report.results
    return report.results


def audit_counts(action: str, model: str = "testapp.author") -> Counter[str]:
    """How many ``action`` rows each object has, by primary key as a string."""
    return Counter(AuditLog.objects.filter(action=action, model=model).values_list("object_pk", flat=True))


# -- create ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_runs_save_override_and_pre_save(backend):
    """Each row goes through save(): the override sets the slug, pre_save lower-cases the email."""
    rows = [{"name": f"Some Author {n}", "email": f"Author{n}@Example.COM"} for n in range(7)]
    bulkpool.create(Author, rows, backend=backend, **RUN)
    saved = sorted(Author.objects.values_list("name", "slug", "email"))
    assert saved == [(f"Some Author {n}", f"some-author-{n}", f"author{n}@example.com") for n in range(7)]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_sends_post_save_with_created(backend):
    """post_save is sent with created=True once for each new object."""
    report = bulkpool.create(Author, [{"name": f"a{n}"} for n in range(7)], backend=backend, **RUN)
    assert audit_counts("created") == Counter(str(pk) for pk in keys(report, 7))
    assert not AuditLog.objects.filter(action="updated").exists()


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_results_are_primary_keys_in_input_order(backend):
    """report.results holds each row's new primary key, in input order."""
    names = [f"author-{n}" for n in (5, 3, 9, 0, 7, 1, 8, 2)]
    report = bulkpool.create(Author, ({"name": name} for name in names), backend=backend, **RUN)
    assert report.results == [Author.objects.get(name=name).pk for name in names]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_failed_row_is_none_in_results_and_the_rest_are_written(backend):
    """A row that fails (a duplicate unique name) is None in results; the other rows are written."""
    Author.objects.create(name="taken")
    names = ["a0", "a1", "a2", "taken", "a4", "a5", "a6"]
    report = bulkpool.create(Author, [{"name": name} for name in names], backend=backend, **RUN)
    assert [f.index for f in report.failures] == [3]
    assert report.failures[0].exc_type == "django.db.utils.IntegrityError"
    assert report.results is not None and report.results[3] is None
    expected = [None if name == "taken" else Author.objects.get(name=name).pk for name in names]
    assert report.results == expected
    assert Author.objects.count() == 7


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_uuid_primary_keys_in_results(backend):
    """With a UUID primary key, results hold the UUIDs of the rows written, in input order."""
    titles = [f"doc-{n}" for n in range(7)]
    report = bulkpool.create(Document, [{"title": title} for title in titles], backend=backend, **RUN)
    assert report.results == [Document.objects.get(title=title).pk for title in titles]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_mti_child_writes_parent_rows_and_sends_signals(backend):
    """Creating MTI children writes a parent row for each, and sends post_save for the child."""
    rows = [{"name": f"Restaurant {n}", "serves_pizza": n % 2 == 0} for n in range(5)]
    report = bulkpool.create(Restaurant, rows, backend=backend, **RUN)
    assert sorted(Place.objects.values_list("name", flat=True)) == [f"Restaurant {n}" for n in range(5)]
    assert report.results == [Restaurant.objects.get(name=row["name"]).pk for row in rows]
    assert audit_counts("created", "testapp.restaurant") == Counter(str(pk) for pk in keys(report, 5))


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_sets_many_to_many_from_primary_keys(backend):
    """A list of primary keys for an M2M field is set after the save, sending m2m_changed."""
    author = Author.objects.create(name="Writer")
    tags = [Tag.objects.create(name=f"tag-{n}") for n in range(3)]
    rows = [
        {"title": f"b{n}", "author_id": author.pk, "tags": [t.pk for t in tags[: n % 3 + 1]]}
        for n in range(6)
    ]
    report = bulkpool.create(Book, rows, backend=backend, **RUN)
    assert report.failed == 0
    for n, pk in enumerate(keys(report, 6)):
        assert set(Book.objects.get(pk=pk).tags.all()) == set(tags[: n % 3 + 1])
    assert audit_counts("m2m post_add", "testapp.book") == Counter(str(pk) for pk in keys(report, 6))


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_sets_many_to_many_from_instances(backend):
    """A list of model instances for an M2M field is set after the save too."""
    author = Author.objects.create(name="Writer")
    tags = [Tag.objects.create(name=f"tag-{n}") for n in range(2)]
    report = bulkpool.create(
        Book, [{"title": f"b{n}", "author": author, "tags": tags} for n in range(4)], backend=backend, **RUN
    )
    assert report.failed == 0
    assert all(set(Book.objects.get(pk=pk).tags.all()) == set(tags) for pk in keys(report, 4))


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_validate_reports_per_field_messages(backend):
    """validate=True runs full_clean(): an invalid row fails with its field's message; others are written."""
    rows = [{"name": "good-1"}, {"name": "bad", "email": "not-an-email"}, {"name": "good-2"}]
    report = bulkpool.create(Author, rows, validate=True, backend=backend, **RUN)
    (failure,) = report.failures
    assert (failure.index, failure.exc_type) == (1, "django.core.exceptions.ValidationError")
    assert failure.message == "{'email': ['Enter a valid email address.']}"
    assert sorted(Author.objects.values_list("name", flat=True)) == ["good-1", "good-2"]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_validate_checks_uniqueness(backend):
    """validate=True reports a duplicate unique value as a ValidationError naming the field."""
    Author.objects.create(name="taken")
    report = bulkpool.create(
        Author, [{"name": "free"}, {"name": "taken"}], validate=True, backend=backend, **RUN
    )
    (failure,) = report.failures
    assert failure.exc_type == "django.core.exceptions.ValidationError"
    assert failure.message == "{'name': ['Author with this Name already exists.']}"


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_without_validate_skips_full_clean(backend):
    """Without validate, a value full_clean() would refuse is written as given."""
    report = bulkpool.create(Author, [{"name": "a", "email": "not-an-email"}], backend=backend, **RUN)
    assert report.ok == 1
    assert Author.objects.get().email == "not-an-email"


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_unknown_field_fails_that_row_only(backend):
    """A row naming a field the model lacks fails with a message naming it; the run goes on."""
    rows = [{"name": "a0"}, {"nmae": "typo"}, {"name": "a2"}]
    report = bulkpool.create(Author, rows, backend=backend, **RUN)
    (failure,) = report.failures
    assert (failure.index, failure.exc_type) == (1, "django.core.exceptions.FieldDoesNotExist")
    assert failure.message.startswith("Author has no field named 'nmae'; its fields are: id, name, email")
    assert sorted(Author.objects.values_list("name", flat=True)) == ["a0", "a2"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("operation", ["create", "upsert"])
@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_a_row_that_is_not_a_dict_fails_alone_saying_what_a_row_must_be(operation, fast):
    """A row of ``create`` or ``upsert`` is a dict of field values: a tuple, a string or an
    object among them fails alone (on the fast path too: its piece runs again row by row),
    with a message that says so, and every dict is written."""
    rows: list[Any] = [{"name": "a0"}, ("name", "a1"), {"name": "a2"}, "a3", {"name": "a4"}]
    if operation == "create":
        report = bulkpool.create(Author, rows, fast=fast, backend="process", **RUN)
    else:
        report = bulkpool.upsert(Author, rows, unique_fields=["name"], fast=fast, backend="process", **RUN)
    assert [(f.index, f.exc_type) for f in report.failures] == [(1, "TypeError"), (3, "TypeError")]
    messages = [failure.message for failure in report.failures]
    assert messages == [
        "a row must be a dict of field values, not tuple",
        "a row must be a dict of field values, not str",
    ]
    assert sorted(Author.objects.values_list("name", flat=True)) == ["a0", "a2", "a4"]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_with_an_existing_primary_key_fails_instead_of_overwriting(backend):
    """A row naming an existing primary key fails; the existing row is left as it was."""
    existing = Author.objects.create(name="original")
    report = bulkpool.create(Author, [{"id": existing.pk, "name": "intruder"}], backend=backend, **RUN)
    assert report.failures[0].exc_type == "django.db.utils.IntegrityError"
    assert Author.objects.get(pk=existing.pk).name == "original"


@pytest.mark.django_db
def test_create_accepts_a_model_label():
    """The model may be given as its 'app_label.ModelName' label."""
    report = bulkpool.create("testapp.Tag", [{"name": "x"}, {"name": "y"}], backend="serial")
    assert report.results == list(Tag.objects.order_by("pk").values_list("pk", flat=True))


@pytest.mark.django_db
def test_create_refuses_what_is_not_a_model_before_any_row():
    """A model argument that is not a model (or its label) is refused with ConfigurationError."""
    with pytest.raises(ConfigurationError, match="No installed app"):
        bulkpool.create("nowhere.Thing", [{"name": "x"}], backend="serial")
    with pytest.raises(ConfigurationError, match="model class"):
        bulkpool.create(dict, [{"name": "x"}], backend="serial")  # type: ignore[arg-type]


# -- update ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_values_go_through_save_and_signals(backend):
    """values are assigned and save() runs: pre_save lower-cases, post_save records 'updated'."""
    authors = make_authors(7)
    bulkpool.update(Author.objects.all(), values={"email": "NEW@Example.COM"}, backend=backend, **RUN)
    assert set(Author.objects.values_list("email", flat=True)) == {"new@example.com"}
    assert audit_counts("updated") == Counter(str(a.pk) for a in authors)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_func_is_applied_and_the_save_override_runs(backend):
    """func(obj) changes the object; the save() override recomputes the slug from the new name."""
    make_authors(5)
    bulkpool.update(Author.objects.all(), rename, backend=backend, **RUN)
    expected = [(f"Renamed author-{n}", f"renamed-author-{n}") for n in range(5)]
    assert sorted(Author.objects.values_list("name", "slug")) == expected


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_sends_update_fields_with_the_signals(backend, update_fields_recorder):
    """save(update_fields=...) is called, so post_save carries those update_fields."""
    make_authors(5)
    bulkpool.update(
        Author.objects.all(),
        values={"email": "x@example.com"},
        update_fields=["email"],
        setup=connect_update_fields_recorder,
        backend=backend,
        **RUN,
    )
    assert Counter(Marker.objects.values_list("key", flat=True)) == {"update_fields:email": 5}


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_fields_limit_the_columns_written(backend):
    """Only the update_fields columns are written, even when func changes other fields."""
    make_authors(4)
    bulkpool.update(
        Author.objects.all(), rename_and_change_email, update_fields=["email"], backend=backend, **RUN
    )
    assert sorted(Author.objects.values_list("name", "email")) == [
        (f"author-{n}", "changed@example.com") for n in range(4)
    ]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_failing_func_fails_only_its_row(backend):
    """A row whose func raises is reported by its primary key; every other row is saved."""
    authors = make_authors(6)
    report = bulkpool.update(Author.objects.all(), refuse_author_2, backend=backend, **RUN)
    (failure,) = report.failures
    assert (failure.index, failure.item, failure.message) == (2, authors[2].pk, "author-2 cannot be updated")
    assert Author.objects.filter(email="updated@example.com").count() == 5


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_rows_leaving_the_filter_are_each_updated_once(backend):
    """Updating the field the queryset filters on updates every row exactly once."""
    authors = make_authors(10)
    bulkpool.update(
        Author.objects.filter(email=""), values={"email": "done@example.com"}, backend=backend, **RUN
    )
    assert Author.objects.filter(email="done@example.com").count() == 10
    assert audit_counts("updated") == Counter(str(a.pk) for a in authors)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_only_touches_the_filtered_rows(backend):
    """Rows the queryset's filter leaves out are not saved."""
    authors = make_authors(6)
    bulkpool.update(Author.objects.filter(name__in=["author-1", "author-4"]), rename, backend=backend, **RUN)
    assert audit_counts("updated") == Counter({str(authors[1].pk): 1, str(authors[4].pk): 1})


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_sets_many_to_many_values_after_the_save(backend):
    """An M2M name in values is set with .set() after the save, sending m2m_changed."""
    author = Author.objects.create(name="Writer")
    books = [Book.objects.create(title=f"b{n}", author=author) for n in range(4)]
    tag = Tag.objects.create(name="classic")
    bulkpool.update(Book.objects.all(), values={"tags": [tag.pk]}, backend=backend, **RUN)
    assert all(list(book.tags.all()) == [tag] for book in books)
    assert audit_counts("m2m post_add", "testapp.book") == Counter(str(b.pk) for b in books)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_mti_child_saves_parent_fields(backend):
    """Updating MTI children writes the parent's fields to the parent table."""
    restaurants = [Restaurant.objects.create(name=f"r{n}") for n in range(4)]
    bulkpool.update(
        Restaurant.objects.all(), values={"name": "renamed", "serves_pizza": True}, backend=backend, **RUN
    )
    assert set(Place.objects.values_list("name", flat=True)) == {"renamed"}
    assert Restaurant.objects.filter(serves_pizza=True).count() == len(restaurants)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_uuid_primary_keys(backend):
    """Objects with UUID primary keys are loaded and saved like any other."""
    for n in range(5):
        Document.objects.create(title=f"doc-{n}")
    report = bulkpool.update(Document.objects.all(), values={"title": "same"}, backend=backend, **RUN)
    assert report.ok == 5
    assert set(Document.objects.values_list("title", flat=True)) == {"same"}


@pytest.mark.django_db
def test_update_refuses_unknown_names_before_any_row():
    """Unknown names in values or update_fields are refused before anything is saved."""
    make_authors(2)
    with pytest.raises(ConfigurationError, match="Author has no field named 'nmae'"):
        bulkpool.update(Author.objects.all(), values={"nmae": "x"}, backend="serial")
    with pytest.raises(ConfigurationError, match="update_fields: Author has no field named 'emial'"):
        bulkpool.update(Author.objects.all(), rename, update_fields=["emial"], backend="serial")
    with pytest.raises(
        ConfigurationError, match="update_fields must be a list of field names, not the string"
    ):
        bulkpool.update(Author.objects.all(), rename, update_fields="name", backend="serial")
    with pytest.raises(ConfigurationError, match="update_fields: 'id' is not a column save\\(\\) can update"):
        bulkpool.update(Author.objects.all(), rename, update_fields=["id"], backend="serial")
    assert not AuditLog.objects.filter(action="updated").exists()


@pytest.mark.django_db
def test_update_refuses_a_values_queryset():
    """update() needs model instances, so a values() queryset is refused."""
    with pytest.raises(ConfigurationError, match="values"):
        bulkpool.update(Author.objects.values("name"), rename, backend="serial")


# -- delete ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EXECUTORS)
def test_delete_runs_each_objects_delete_and_signals(backend):
    """Each object's own delete() runs (the override records itself), then pre/post_delete."""
    authors = make_authors(5)
    report = bulkpool.delete(Author.objects.all(), backend=backend, **RUN)
    assert report.ok == 5
    assert not Author.objects.exists()
    for author in authors:
        assert actions("testapp.author", author.pk) == ["created", "delete()", "pre_delete", "post_delete"]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_delete_cascades(backend):
    """Deleting an object deletes what cascades from it."""
    authors = make_authors(3)
    for author in authors:
        Book.objects.create(title=f"by {author.name}", author=author)
    Book.objects.create(title="kept", author=Author.objects.create(name="kept"))
    bulkpool.delete(Author.objects.exclude(name="kept"), backend=backend, **RUN)
    assert list(Book.objects.values_list("title", flat=True)) == ["kept"]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_delete_only_the_filtered_rows(backend):
    """Rows the queryset's filter leaves out are kept."""
    make_authors(6)
    bulkpool.delete(Author.objects.filter(name__in=["author-1", "author-4"]), backend=backend, **RUN)
    assert sorted(Author.objects.values_list("name", flat=True)) == [f"author-{n}" for n in (0, 2, 3, 5)]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_delete_mti_child_deletes_the_parent_row(backend):
    """Deleting MTI children deletes their parent rows too."""
    for n in range(4):
        Restaurant.objects.create(name=f"r{n}")
    Place.objects.create(name="just a place")
    bulkpool.delete(Restaurant.objects.all(), backend=backend, **RUN)
    assert list(Place.objects.values_list("name", flat=True)) == ["just a place"]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_delete_uuid_primary_keys(backend):
    """Objects with UUID primary keys are deleted like any other."""
    for n in range(5):
        Document.objects.create(title=f"doc-{n}")
    report = bulkpool.delete(Document.objects.exclude(title="doc-2"), backend=backend, **RUN)
    assert report.ok == 4
    assert list(Document.objects.values_list("title", flat=True)) == ["doc-2"]
