"""The status of a journaled run: the one vocabulary of ``Run.status``."""

from __future__ import annotations

from django.db.models import TextChoices


class RunStatus(TextChoices):
    """A run's status (``Run.Status``): apart from ``models.py``, so that the journal and the
    engine can name it without loading a model, and ``models.py`` imports nothing of bulkpool's."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"  # on_error="raise", max_failures, bad input, an imap consumer that stopped...
    FINISHED = "finished"  # every item ran
