from __future__ import annotations

from django.db import models
from simple_history.models import HistoricalRecords


class Customer(models.Model):
    """django-simple-history writes a historical row, django-auditlog a ``LogEntry``, per change."""

    name = models.CharField(max_length=100, unique=True)
    email = models.EmailField(blank=True)
    # No foreign key constraint to auth_user: this app has no migrations (see apps.py), so
    # its tables are created before the migrated apps' tables exist.
    history = HistoricalRecords(user_db_constraint=False)

    def __str__(self) -> str:
        return self.name
