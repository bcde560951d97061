"""The status of a journaled run: the one vocabulary of ``Run.status``, and its lease.

A run that is running holds its ``run_id`` with a lease: its caller stamps ``Run.owner``
(host and pid) when it begins and renews ``Run.heartbeat_at`` every ``HEARTBEAT_SECONDS``
while it runs. Another caller of the same ``run_id`` is refused while the lease holds; a
lease not renewed for ``STALE_AFTER_SECONDS`` (its caller was killed, or its machine is
gone) makes the run *stale*: shown so, and taken over by the next caller that resumes it.
The journal's locked records keep even two callers from writing an item twice; the lease
is what tells a person that a run is live.
"""

from __future__ import annotations

from django.db.models import TextChoices

HEARTBEAT_SECONDS = 10.0  # how often a live run renews its lease
# A lease not renewed for this long is dead. Generous: the caller renews between chunks, so
# a long chunk on the caller's own thread (backend="serial") delays it.
STALE_AFTER_SECONDS = 120.0
STALE = "stale"  # not stored: what a running run whose lease expired is shown as (Run.state)


class RunStatus(TextChoices):
    """A run's status (``Run.Status``): apart from ``models.py``, so that the journal and the
    engine can name it without loading a model, and ``models.py`` imports nothing of bulkpool's."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    STOPPED = "stopped"  # on_error="raise", max_failures, bad input, an imap consumer that stopped...
    FINISHED = "finished"  # every item ran
