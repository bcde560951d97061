"""The test project itself works on this database: migrations, signals, overrides.

These use only Django, never bulkpool, so a failure here points at the test project or the
database, not at the library.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from django.db import connection

from tests.testapp.models import AuditLog, Author, Book, Document, Marker, Restaurant, Tag


def actions(model: str, pk: object) -> list[str]:
    return list(AuditLog.objects.filter(model=model, object_pk=str(pk)).values_list("action", flat=True))


@pytest.mark.django_db
def test_creating_an_author_writes_an_audit_row() -> None:
    """post_save is connected and the migrations created both tables."""
    author = Author.objects.create(name="Ada Lovelace", email="ADA@Example.com")
    assert actions("testapp.author", author.pk) == ["created"]


@pytest.mark.django_db
def test_author_save_override_and_pre_save_receiver_run() -> None:
    """save() sets the slug and the pre_save receiver lower-cases the email."""
    author = Author.objects.create(name="Grace Hopper", email="Grace@Navy.MIL")
    author.refresh_from_db()
    assert (author.slug, author.email) == ("grace-hopper", "grace@navy.mil")


@pytest.mark.django_db
def test_saving_only_the_name_keeps_the_slug_in_step() -> None:
    """save(update_fields=["name"]) also saves the slug the override computed."""
    author = Author.objects.create(name="Old Name")
    author.name = "New Name"
    author.save(update_fields=["name"])
    author.refresh_from_db()
    assert author.slug == "new-name"
    assert actions("testapp.author", author.pk) == ["created", "updated"]


@pytest.mark.django_db
def test_author_delete_runs_the_override_and_both_signals() -> None:
    """Author.delete() records itself, then pre_delete and post_delete fire."""
    author = Author.objects.create(name="Temporary")
    pk = author.pk
    author.delete()
    assert actions("testapp.author", pk) == ["created", "delete()", "pre_delete", "post_delete"]


@pytest.mark.django_db
def test_setting_book_tags_writes_an_m2m_audit_row() -> None:
    """m2m_changed is connected for Book.tags."""
    book = Book.objects.create(title="Notes", author=Author.objects.create(name="Writer"))
    book.tags.set([Tag.objects.create(name="maths"), Tag.objects.create(name="history")])
    assert actions("testapp.book", book.pk) == ["m2m post_add"]
    assert book.tags.count() == 2


@pytest.mark.django_db
def test_mti_child_save_writes_both_tables_and_an_audit_row() -> None:
    """Saving a Restaurant writes a Place row too and sends post_save for Restaurant."""
    restaurant = Restaurant.objects.create(name="Luigi's", serves_pizza=True)
    assert restaurant.place_ptr.name == "Luigi's"
    assert actions("testapp.restaurant", restaurant.pk) == ["created"]


@pytest.mark.django_db
def test_document_primary_key_is_a_uuid() -> None:
    """The UUID primary key round-trips on this database."""
    document = Document.objects.create(title="Spec")
    assert isinstance(document.pk, uuid.UUID)
    assert Document.objects.get(pk=document.pk).title == "Spec"


@pytest.mark.django_db
def test_marker_keys_are_not_unique() -> None:
    """Writing the same marker twice gives two rows, so duplicates can be counted."""
    Marker.objects.create(key="item-1", value=1)
    Marker.objects.create(key="item-1", value=1)
    assert Marker.objects.filter(key="item-1").count() == 2


@pytest.mark.vendor("sqlite")
@pytest.mark.django_db
def test_sqlite_test_database_is_a_file() -> None:
    """Worker processes can open the SQLite test database only if it is a file."""
    name = str(connection.settings_dict["NAME"])
    assert "memory" not in name
    assert Path(name).is_file()


def test_db_vendor_fixture_names_the_configured_vendor(db_vendor: str) -> None:
    """db_vendor is Django's connection.vendor, without touching the database."""
    assert db_vendor == connection.vendor
    assert db_vendor in {"sqlite", "postgresql", "mysql"}
