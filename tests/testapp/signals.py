"""Signal receivers of the test app; ``connect()`` is called from ``TestAppConfig.ready``.

Each receiver writes an ``AuditLog`` row (or changes the instance), so that a test can
tell from the database alone which signals fired, even when they fired in another
process.
"""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from tests.testapp.models import AuditLog, Author, Book, Place, Restaurant


def _log(action: str, sender: type[models.Model], pk: Any) -> None:
    AuditLog.objects.create(action=action, model=sender._meta.label_lower, object_pk=str(pk))


def lowercase_email(sender: type[Author], instance: Author, **kwargs: Any) -> None:
    """pre_save: lower-case ``Author.email``; a lower-cased email proves pre_save fired."""
    instance.email = instance.email.lower()


def log_save(sender: type[models.Model], instance: models.Model, created: bool, **kwargs: Any) -> None:
    """post_save: one ``created`` or ``updated`` row."""
    _log("created" if created else "updated", sender, instance.pk)


def log_pre_delete(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    """pre_delete: one ``pre_delete`` row."""
    _log("pre_delete", sender, instance.pk)


def log_post_delete(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    """post_delete: one ``post_delete`` row."""
    _log("post_delete", sender, instance.pk)


def log_m2m(sender: type[models.Model], instance: models.Model, action: str, **kwargs: Any) -> None:
    """m2m_changed on ``Book.tags``: one row per post_add / post_remove / post_clear."""
    if action.startswith("post_"):
        _log(f"m2m {action}", type(instance), instance.pk)


def connect() -> None:
    """Connect every receiver once (``dispatch_uid`` makes a second call harmless)."""
    pre_save.connect(lowercase_email, sender=Author, dispatch_uid="testapp.lowercase_email")
    post_save.connect(log_save, sender=Author, dispatch_uid="testapp.log_save.author")
    pre_delete.connect(log_pre_delete, sender=Author, dispatch_uid="testapp.pre_delete")
    post_delete.connect(log_post_delete, sender=Author, dispatch_uid="testapp.post_delete")
    m2m_changed.connect(log_m2m, sender=Book.tags.through, dispatch_uid="testapp.log_m2m")
    # Django sends save signals with the concrete class as sender, so saving a Restaurant
    # sends post_save(sender=Restaurant) and never sender=Place: connect both.
    post_save.connect(log_save, sender=Place, dispatch_uid="testapp.log_save.place")
    post_save.connect(log_save, sender=Restaurant, dispatch_uid="testapp.log_save.restaurant")
