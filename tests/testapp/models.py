"""Models with the semantics ``bulk_create`` skips, so tests can see them kept.

Every side effect lands in a table: ``AuditLog`` rows record signals and overridden
methods, and ``Marker`` rows make a write that happened twice countable. Tests then
assert on rows, which works the same whether the work ran in the test's own thread, in
a thread pool or in another process.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.utils.text import slugify


class AuditLog(models.Model):
    """One row per observed side effect.

    ``action`` is one of: ``created``, ``updated`` (post_save), ``delete()`` (the
    ``Author.delete`` override), ``pre_delete``, ``post_delete``, or ``m2m <action>``
    (m2m_changed, e.g. ``m2m post_add``). ``model`` is the sender's ``label_lower``
    (``testapp.author``); ``object_pk`` is a string so that it holds UUIDs too.
    """

    action = models.CharField(max_length=50)
    model = models.CharField(max_length=100)
    object_pk = models.CharField(max_length=64)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.action} {self.model} {self.object_pk}"


class Author(models.Model):
    """A model with a ``save()`` and a ``delete()`` override and signal receivers.

    ``slug`` is set only by ``save()``, so a row with a slug proves ``save()`` ran;
    ``email`` is lower-cased only by a pre_save receiver; creating, updating and deleting
    write ``AuditLog`` rows (see ``signals.py``). ``name`` is unique, for tests of
    integrity errors on one item among many.
    """

    name = models.CharField(max_length=100, unique=True)
    email = models.EmailField(blank=True)
    slug = models.SlugField(max_length=100, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.slug = slugify(self.name)
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "name" in update_fields:
            # Keep the slug in step when only the name is saved.
            kwargs["update_fields"] = {*update_fields, "slug"}
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        # QuerySet.delete() never calls this; a row here proves the object's own delete() ran.
        AuditLog.objects.create(action="delete()", model="testapp.author", object_pk=str(self.pk))
        return super().delete(*args, **kwargs)


class Tag(models.Model):
    """The other side of ``Book.tags``; ``name`` is unique."""

    name = models.CharField(max_length=50, unique=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    """A foreign key and a many-to-many relation; setting ``tags`` writes AuditLog rows."""

    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="books")
    tags = models.ManyToManyField(Tag, blank=True, related_name="books")
    pages = models.IntegerField(default=0)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.title


class Place(models.Model):
    """The parent of a multi-table-inheritance pair, which ``bulk_create`` refuses."""

    name = models.CharField(max_length=100)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name


class Restaurant(Place):
    """An MTI child: one save writes a ``Place`` row and a ``Restaurant`` row."""

    serves_pizza = models.BooleanField(default=False)


class Document(models.Model):
    """A model whose primary key is set by Python (a UUID), not by the database."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    title = models.CharField(max_length=200)

    class Meta:
        ordering = ["title"]

    def __str__(self) -> str:
        return self.title


class Marker(models.Model):
    """A table with no unique constraint: an item written twice shows up as two rows.

    Tests write one marker per item and count rows per ``key`` to prove that retries,
    resumed runs and redelivered chunks write each item exactly once.
    """

    key = models.CharField(max_length=100, db_index=True)
    value = models.IntegerField(default=0)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


class Stamped(models.Model):
    """``auto_now_add`` and ``auto_now`` fields, no ``save()`` override: upsert's bulk path."""

    name = models.CharField(max_length=50, unique=True)
    note = models.CharField(max_length=50, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    touched_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name
