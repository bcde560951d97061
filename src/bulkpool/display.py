"""A journaled run described to people, in the same words by the admin and ``bulkpool show``.

Counts are written ``1,234`` everywhere (indexes and line numbers, which name an item, are
not counts). A run's chunks are described by the sizes they held, from its committed
chunks: a resume may use another ``chunk_size``, and ``"auto"`` sizes every chunk, so the
size a run was started with says little.
"""

from __future__ import annotations

from django.db.models import Count, Max, Min
from django.utils import timezone

from bulkpool.models import Run, RunChunk
from bulkpool.status import STALE

RESUME_PREFIX = "To resume, run:"  # how the command words the line it records (Run.command)


def count(number: int | None) -> str:
    """A count as people read it: ``1,234``; ``-`` for none known."""
    return "-" if number is None else f"{number:,}"


def chunks_held(run: Run) -> str:
    """``"3 chunks of 10-551 items"``, ``"2 chunks of 1,000 items"`` or ``"no chunk done yet"``."""
    sizes = (
        RunChunk.objects.using(run._state.db)
        .filter(run=run)
        .aggregate(chunks=Count("pk"), smallest=Min("size"), largest=Max("size"))
    )
    chunks = sizes["chunks"]
    if not chunks:
        return "no chunk done yet"
    noun = "chunk" if chunks == 1 else "chunks"
    smallest, largest = sizes["smallest"], sizes["largest"]
    held = count(largest) if smallest == largest else f"{count(smallest)}-{count(largest)}"
    return f"{count(chunks)} {noun} of {held} item{'s' if largest != 1 else ''}"


def resume_command(run: Run) -> str | None:
    """The command that resumes ``run`` (what its caller recorded, else the call to repeat);
    None for a finished run, which has nothing to resume."""
    if run.status == Run.Status.FINISHED:
        return None
    command = run.command.strip()
    if command.startswith(RESUME_PREFIX):
        command = command.removeprefix(RESUME_PREFIX).strip()
    return command or f"Run the same call again with run_id={run.run_id!r}"


def holder(run: Run) -> str | None:
    """Who holds a run marked running: its caller and its lease; None for any other run."""
    if run.status != Run.Status.RUNNING or run.heartbeat_at is None:
        return None
    seconds = (timezone.now() - run.heartbeat_at).total_seconds()
    ago = f"{seconds:,.0f} s ago" if seconds < 120 else f"{seconds / 60:,.0f} min ago"
    who = run.owner or "a caller"
    if run.state == STALE:
        return f"{who}, whose lease was last renewed {ago}: it is gone; resuming the run takes it over"
    return f"{who}, lease renewed {ago}"
