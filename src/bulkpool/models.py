"""The run journal: a journaled run (``run_id=...``) and the chunks it has committed.

A ``RunChunk`` row is written by the worker in the same transaction as the chunk's work,
so "this chunk is done" and "this chunk's rows are written" are one fact: rerunning the
same ``run_id`` skips exactly the chunks that committed, and a chunk that runs twice
(a worker died after its commit, a redelivered task) meets the unique constraint instead
of writing its rows again.
"""

from __future__ import annotations

import datetime

from django.db import models
from django.db.models.functions import Coalesce
from django.utils import timezone

from bulkpool.status import STALE, STALE_AFTER_SECONDS, RunStatus


class RunQuerySet(models.QuerySet["Run"]):
    def unfinished(self) -> RunQuerySet:
        return self.exclude(status=Run.Status.FINISHED)

    def stale(self) -> RunQuerySet:
        """Runs marked running whose caller stopped renewing its lease (killed, or gone)."""
        since = timezone.now() - datetime.timedelta(seconds=STALE_AFTER_SECONDS)
        lapsed = models.Q(heartbeat_at__lt=since) | models.Q(heartbeat_at__isnull=True)
        return self.filter(lapsed, status=Run.Status.RUNNING)

    def finished(self) -> RunQuerySet:
        return self.filter(status=Run.Status.FINISHED)

    def with_totals(self) -> RunQuerySet:
        """Annotate what every attempt together has done, from the committed chunks.

        ``done_items``, ``done_ok`` and ``done_failed`` (0 for a run with no chunk yet): a
        run's own ``total`` / ``ok`` / ``failed`` count its last attempt only.
        """

        def total(field: str) -> Coalesce:
            big = models.BigIntegerField()
            return Coalesce(models.Sum(f"chunks__{field}"), models.Value(0), output_field=big)

        return self.annotate(done_items=total("size"), done_ok=total("ok"), done_failed=total("failed"))


class Run(models.Model):
    Status = RunStatus

    run_id = models.CharField(max_length=200, unique=True)
    func = models.CharField(max_length=500, help_text="The function's module and name.")
    chunk_size = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    total = models.BigIntegerField(default=0, help_text="Items read in the last attempt.")
    ok = models.BigIntegerField(default=0)
    failed = models.BigIntegerField(default=0)
    skipped = models.BigIntegerField(default=0, help_text="Items already done, in the last attempt.")
    attempts = models.PositiveIntegerField(default=1)
    started_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    command = models.TextField(
        blank=True, help_text="How to resume it, as the caller that started it wrote it."
    )
    owner = models.CharField(
        max_length=300, blank=True, help_text="The host and pid of the caller running it now."
    )
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="When its caller last renewed its lease on the run_id."
    )

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.run_id} ({self.state})"

    @property
    def state(self) -> str:
        """The status to show: ``stale`` for a run marked running whose lease lapsed."""
        if self.status == self.Status.RUNNING and self.lease_lapsed():
            return STALE
        return str(self.status)

    def lease_lapsed(self, now: datetime.datetime | None = None) -> bool:
        if self.heartbeat_at is None:
            return True
        now = now or timezone.now()
        return (now - self.heartbeat_at).total_seconds() > STALE_AFTER_SECONDS


class RunChunk(models.Model):
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="chunks")
    start = models.BigIntegerField(help_text="Input index of the chunk's first item.")
    size = models.PositiveIntegerField()
    digest = models.CharField(max_length=64, help_text="Fingerprint of the chunk's items.")
    ok = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    finished_at = models.DateTimeField(default=timezone.now)
    values = models.TextField(
        blank=True,
        help_text="What its items returned, as JSON (create: the new keys), when the run keeps them "
        "and they are plain JSON; a chunk delivered again, or resumed, reports them.",
    )

    class Meta:
        ordering = ["run", "start"]
        constraints = [models.UniqueConstraint(fields=["run", "start"], name="bulkpool_chunk_once")]

    def __str__(self) -> str:
        return f"{self.run_id}: items {self.start}..{self.start + self.size - 1}"


class ChunkDelivery(models.Model):
    """How many times a chunk of a run was started by an at-least-once executor's workers
    (celery), counted in its own transaction before it runs: a chunk that keeps killing
    the workers that take it is refused after a few starts, on any machine, whether or
    not its caller is still there (see ``journal.count_start``)."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="deliveries")
    start = models.BigIntegerField(help_text="Input index of the chunk's first item.")
    size = models.PositiveIntegerField()
    starts = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["run", "start", "size"]
        constraints = [
            models.UniqueConstraint(fields=["run", "start", "size"], name="bulkpool_delivery_once")
        ]

    def __str__(self) -> str:
        return f"{self.run_id}: items {self.start}..{self.start + self.size - 1}, started {self.starts}x"


class ChunkReply(models.Model):
    """A message from a worker of the tasks backend to the caller that sent it a chunk
    (started, heartbeat, done with its result...): Django's Tasks framework has no reply
    channel, so the run's database carries them (``bulkpool.executors.tasks.mailbox``). The
    caller deletes each one it reads; a run's leftovers are deleted a day later."""

    channel = models.CharField(max_length=32, help_text="The caller's: one per run attempt.")
    key = models.CharField(max_length=32, help_text="The chunk's, as sent.")
    kind = models.CharField(max_length=20)
    body = models.TextField(help_text="The message's fields, as JSON.")
    sent_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        indexes = [models.Index(fields=["channel"], name="bulkpool_reply_channel")]

    def __str__(self) -> str:
        return f"{self.kind} of {self.key} to {self.channel}"


class RunFailure(models.Model):
    """A failed item of a journaled chunk, committed with the chunk."""

    chunk = models.ForeignKey(RunChunk, on_delete=models.CASCADE, related_name="failures")
    index = models.BigIntegerField()
    line = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Its line in the input file, for a line that could not be read."
    )
    item = models.TextField(help_text="The item as JSON, or its repr (an unreadable line: its text).")
    exc_type = models.CharField(max_length=300)
    message = models.TextField()
    traceback = models.TextField(blank=True)
    attempt = models.PositiveIntegerField(
        null=True, blank=True, help_text="The attempt of the run that recorded it (retry_failed replaces it)."
    )

    class Meta:
        ordering = ["chunk", "index"]

    def __str__(self) -> str:
        return f"item {self.index}: {self.exc_type}: {self.message}"
