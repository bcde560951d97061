"""QuerySet input: split by primary key, each worker loads its own rows (bulkpool.querysets)."""

from __future__ import annotations

from collections import Counter
from itertools import chain
from typing import Any

import pytest
from django.db import connection
from django.db.models import Model
from django.test.utils import CaptureQueriesContext

import bulkpool
from bulkpool import ConfigurationError, querysets
from bulkpool.querysets import LoadRows, primary_keys, split
from tests.params import EXECUTORS
from tests.testapp.models import Author, Book, Document, Marker, Tag

RUN: dict[str, Any] = {"workers": 2, "chunk_size": 3, "progress": False}


# -- what the workers run: module-level, so every backend can ship them -------------------


def record(obj: Model) -> None:
    Marker.objects.create(key=f"seen:{obj.pk}")


def record_author_is_cached(book: Book) -> None:
    Marker.objects.create(key=f"cached:{book.pk}", value=int(Book.author.is_cached(book)))


def record_tags_are_prefetched(book: Book) -> None:
    prefetched = "tags" in getattr(book, "_prefetched_objects_cache", {})
    Marker.objects.create(key=f"prefetched:{book.pk}", value=int(prefetched))


def record_deferred_fields(author: Author) -> None:
    Marker.objects.create(key=f"deferred:{','.join(sorted(author.get_deferred_fields()))}")


def record_and_unmatch_everyone(author: Author) -> None:
    """Record this row, then make every author stop matching ``email=""``."""
    record(author)
    Author.objects.update(email="elsewhere@example.com")


def record_and_delete_the_last(author: Author) -> None:
    record(author)
    Author.objects.filter(name="author-9").delete()


def record_value(value: object) -> None:
    Marker.objects.create(key=f"value:{value}")


def fail_for_author_3(author: Author) -> None:
    if author.name == "author-3":
        raise ValueError("author-3 is not welcome")


# -- helpers ---------------------------------------------------------------------------------


def make_authors(count: int = 10) -> list[Author]:
    return [Author.objects.create(name=f"author-{n}") for n in range(count)]


def seen() -> Counter[str]:
    """How many times each row was processed, by primary key as a string."""
    keys = Marker.objects.filter(key__startswith="seen:").values_list("key", flat=True)
    return Counter(key.removeprefix("seen:") for key in keys)


def values_of(prefix: str) -> dict[str, int]:
    markers = Marker.objects.filter(key__startswith=prefix)
    return {m.key.removeprefix(prefix): m.value for m in markers}


# -- which rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EXECUTORS)
def test_each_row_of_the_filtered_queryset_runs_once(backend):
    """run(func, queryset) calls func once for each row the filter selects, and no other."""
    authors = make_authors(10)
    chosen = [a for a in authors if a.name != "author-4"]
    report = bulkpool.run(record, Author.objects.exclude(name="author-4"), backend=backend, **RUN)
    assert (report.total, report.ok, report.failed) == (9, 9, 0)
    assert seen() == Counter(str(a.pk) for a in chosen)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_rows_that_stop_matching_during_the_run_run_once(backend, monkeypatch):
    """Rows changed by the run so they no longer match the filter are still run, once each."""
    monkeypatch.setattr(querysets, "PAGE_SIZE", 2)  # several pages of keys, smaller than a chunk
    authors = make_authors(10)
    report = bulkpool.run(
        record_and_unmatch_everyone, Author.objects.filter(email=""), backend=backend, **RUN
    )
    assert report.ok == 10
    assert seen() == Counter(str(a.pk) for a in authors)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_uuid_primary_keys_run_once_each(backend):
    """A model with UUID primary keys is split and loaded like one with integer keys."""
    documents = [Document.objects.create(title=f"doc-{n}") for n in range(10)]
    report = bulkpool.run(record, Document.objects.all(), backend=backend, **RUN)
    assert report.ok == 10
    assert seen() == Counter(str(d.pk) for d in documents)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_row_matched_twice_by_a_join_runs_once(backend):
    """A filter across a many-to-many relation that returns a row twice runs it once."""
    book = Book.objects.create(title="Joined", author=Author.objects.create(name="Writer"))
    book.tags.set([Tag.objects.create(name="tag-a"), Tag.objects.create(name="tag-b")])
    report = bulkpool.run(record, Book.objects.filter(tags__name__startswith="tag-"), backend=backend, **RUN)
    assert report.total == 1
    assert seen() == Counter({str(book.pk): 1})


@pytest.mark.parametrize("backend", EXECUTORS)
def test_row_deleted_after_the_run_read_its_key_fails_alone(backend):
    """A row deleted before its turn is that item's DoesNotExist failure; the others run."""
    authors = make_authors(10)
    options = {**RUN, "workers": 1}  # one worker: the deletion happens before the last chunk loads
    report = bulkpool.run(record_and_delete_the_last, Author.objects.all(), backend=backend, **options)
    (failure,) = report.failures
    assert (failure.index, failure.item) == (9, authors[9].pk)
    assert failure.exc_type == "tests.testapp.models.Author.DoesNotExist"
    assert "no longer exists" in failure.message
    assert seen() == Counter(str(a.pk) for a in authors[:9])


# -- what each worker loads ------------------------------------------------------------------


@pytest.mark.parametrize("backend", EXECUTORS)
def test_select_related_is_honoured(backend):
    """Rows come with the relations the queryset's select_related() names already loaded."""
    author = Author.objects.create(name="Writer")
    books = [Book.objects.create(title=f"b{n}", author=author) for n in range(4)]
    bulkpool.run(record_author_is_cached, Book.objects.select_related("author"), backend=backend, **RUN)
    assert values_of("cached:") == {str(b.pk): 1 for b in books}


@pytest.mark.parametrize("backend", EXECUTORS)
def test_prefetch_related_is_honoured(backend):
    """Rows come with the relations the queryset's prefetch_related() names already fetched."""
    author = Author.objects.create(name="Writer")
    books = [Book.objects.create(title=f"b{n}", author=author) for n in range(4)]
    bulkpool.run(record_tags_are_prefetched, Book.objects.prefetch_related("tags"), backend=backend, **RUN)
    assert values_of("prefetched:") == {str(b.pk): 1 for b in books}


@pytest.mark.parametrize("backend", EXECUTORS)
def test_only_is_honoured(backend):
    """Rows of an only() queryset defer the other fields."""
    make_authors(4)
    bulkpool.run(record_deferred_fields, Author.objects.only("name"), backend=backend, **RUN)
    assert Counter(Marker.objects.values_list("key", flat=True)) == {"deferred:created_at,email,slug": 4}


@pytest.mark.parametrize("backend", EXECUTORS)
def test_defer_is_honoured(backend):
    """Rows of a defer() queryset defer the fields it names."""
    make_authors(4)
    bulkpool.run(record_deferred_fields, Author.objects.defer("email"), backend=backend, **RUN)
    assert Counter(Marker.objects.values_list("key", flat=True)) == {"deferred:email": 4}


@pytest.mark.parametrize("backend", EXECUTORS)
def test_failure_names_the_row_by_primary_key(backend):
    """A failing row is reported with its primary key as the item and its place in pk order."""
    authors = make_authors(6)
    report = bulkpool.run(fail_for_author_3, Author.objects.all(), backend=backend, **RUN)
    (failure,) = report.failures
    assert (failure.index, failure.item, failure.message) == (3, authors[3].pk, "author-3 is not welcome")


@pytest.mark.parametrize("backend", EXECUTORS)
def test_imap_yields_rows_in_primary_key_order(backend):
    """imap over a queryset yields one outcome per row, in primary-key order, whatever order_by says."""
    for n in range(7):
        Document.objects.create(title=f"doc-{n}")
    in_pk_order = list(Document.objects.order_by("pk").values_list("pk", flat=True))  # the database's order
    outcomes = list(bulkpool.imap(record, Document.objects.order_by("-title"), backend=backend, **RUN))
    assert [o.item for o in outcomes] == in_pk_order
    assert all(o.ok for o in outcomes)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_sliced_queryset_runs_its_rows_in_its_own_order(backend):
    """A sliced queryset runs exactly the rows of the slice, in the slice's order."""
    authors = make_authors(10)
    outcomes = bulkpool.imap(record, Author.objects.order_by("-name")[:3], backend=backend, **RUN)
    assert [o.item for o in outcomes] == [authors[9].pk, authors[8].pk, authors[7].pk]


@pytest.mark.parametrize("backend", EXECUTORS)
def test_values_list_queryset_gives_plain_values(backend):
    """A values_list() queryset's rows are sent to workers as plain values."""
    make_authors(5)
    bulkpool.run(record_value, Author.objects.values_list("name", flat=True), backend=backend, **RUN)
    expected = {f"value:author-{n}" for n in range(5)}
    assert set(Marker.objects.values_list("key", flat=True)) == expected


# -- the parts, directly ---------------------------------------------------------------------


@pytest.mark.django_db
def test_total_comes_from_one_count_query():
    """len() of the split queryset, which the progress bar reads, is a single COUNT query."""
    make_authors(5)
    keys, _ = split(Author.objects.filter(name__startswith="author-"), "default")
    with CaptureQueriesContext(connection) as queries:
        assert len(keys) == 5
        assert len(keys) == 5
    (query,) = queries.captured_queries
    assert "COUNT(" in query["sql"].upper()


@pytest.mark.django_db
def test_primary_keys_are_read_in_pages_by_keyset():
    """The keys are read page by page, each page after the last key of the one before."""
    authors = make_authors(7)
    with CaptureQueriesContext(connection) as queries:
        pages = list(primary_keys(Author.objects.all(), page_size=3))
    assert [len(page) for page in pages] == [3, 3, 1]
    assert list(chain(*pages)) == [a.pk for a in authors]
    assert len(queries.captured_queries) == 3
    assert "OFFSET" not in queries.captured_queries[-1]["sql"].upper()


@pytest.mark.django_db
def test_uuid_primary_keys_are_read_in_pages_by_keyset():
    """Keyset pages of UUID keys follow the database's own UUID order, each key once."""
    for n in range(7):
        Document.objects.create(title=f"doc-{n}")
    pages = list(primary_keys(Document.objects.all(), page_size=2))
    assert [len(page) for page in pages] == [2, 2, 2, 1]
    assert list(chain(*pages)) == list(Document.objects.order_by("pk").values_list("pk", flat=True))


@pytest.mark.django_db
def test_loader_marks_deleted_rows():
    """The loader gives a DoesNotExist for a deleted row, or None with missing_ok."""
    authors = make_authors(3)
    _, load = split(Author.objects.all(), "default")
    assert isinstance(load, LoadRows)
    keys = [a.pk for a in authors]
    authors[1].delete()
    first, gone, last = load(keys)
    assert (first.pk, last.pk) == (keys[0], keys[2])
    assert isinstance(gone, Author.DoesNotExist)
    _, load_missing_ok = split(Author.objects.all(), "default", missing_ok=True)
    assert load_missing_ok is not None
    assert load_missing_ok(keys)[1] is None


@pytest.mark.django_db
def test_union_queryset_is_refused_before_any_item():
    """A union() cannot be split by primary key: refused with a ConfigurationError."""
    union = Author.objects.filter(name="a").union(Author.objects.filter(name="b"))
    with pytest.raises(ConfigurationError, match="union"):
        bulkpool.run(record, union, backend="serial")
