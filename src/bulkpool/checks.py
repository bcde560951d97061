"""System checks: misconfiguration surfaces in `manage.py check`, not in the middle of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.core.checks import CheckMessage, Tags, Warning, register
from django.db import connections
from django.db.migrations.recorder import MigrationRecorder

from bulkpool.journal import FIX_INSTALL


@register(Tags.database)
def check_journal_tables(
    app_configs: Sequence[AppConfig] | None, databases: Sequence[str] | None, **kwargs: Any
) -> list[CheckMessage]:
    """Warn when a database lacks the journal tables that ``run_id`` needs, though bulkpool's
    migration is recorded as applied. Before that, ``migrate`` is the fix and is what runs
    these checks first: a warning there would only say what it is about to do."""
    from bulkpool.models import Run

    problems: list[CheckMessage] = []
    for alias in databases or []:
        recorder = MigrationRecorder(connections[alias])
        if not recorder.has_table() or ("bulkpool", "0001_initial") not in recorder.applied_migrations():
            continue
        if Run._meta.db_table not in connections[alias].introspection.table_names():
            problems.append(
                Warning(
                    f"Database {alias!r} has no bulkpool journal tables: runs with run_id are refused.",
                    hint=FIX_INSTALL,
                    id="bulkpool.W001",
                )
            )
    return problems
