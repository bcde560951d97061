"""The tasks backend's messages about chunks: rows of ``ChunkReply`` in the run's database.

Django's Tasks framework has no reply channel and not every backend has results, so a
worker says what it would say on Celery's reply queue -- started, beat, done (with the
ChunkResult), crashed, refused, setup_failed -- as a row under its caller's ``channel``,
committed at once (autocommit), and the caller reads and deletes its channel's rows.

Rows are read whatever their primary key and deleted once read: ids are handed out when a
row is inserted, and on PostgreSQL a later id can commit first, so "ids above the last one
read" would skip a row.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import Any

READ_AT_ONCE = 500  # rows read by one query
KEPT_FOR = datetime.timedelta(days=1)  # what late workers post to a channel no caller reads


def post(database: str, channel: str, key: str, kind: str, **fields: Any) -> None:
    """The worker's side: one message about chunk ``key`` to the caller reading ``channel``."""
    from bulkpool.models import ChunkReply

    ChunkReply.objects.using(database).create(channel=channel, key=key, kind=kind, body=json.dumps(fields))


class Mailbox:
    """The caller's side: its channel's messages, each passed to ``on_reply`` once."""

    def __init__(
        self, database: str, channel: str, on_reply: Callable[[dict[str, Any]], None], *, poll: float
    ) -> None:
        self.database = database
        self.channel = channel
        self.poll = poll
        self._on_reply = on_reply
        self.reads = 0  # queries made, for the bench's poll cost

    def open(self) -> None:
        """Delete what late workers posted to channels long closed (a late chunk still says
        how it went; a caller killed with SIGKILL leaves its channel's rows)."""
        from django.utils import timezone

        from bulkpool.models import ChunkReply

        ChunkReply.objects.using(self.database).filter(sent_at__lt=timezone.now() - KEPT_FOR).delete()

    def drain(self, wait: float) -> None:
        """Pass on the messages there now; if none, poll every ``poll`` s for up to ``wait`` s."""
        deadline = time.monotonic() + wait
        while not self._read() and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self.poll, deadline - time.monotonic())))

    def _read(self) -> int:
        from bulkpool.models import ChunkReply

        rows = ChunkReply.objects.using(self.database).filter(channel=self.channel)
        self.reads += 1
        found = list(rows.order_by("pk").values_list("pk", "key", "kind", "body")[:READ_AT_ONCE])
        if not found:
            return 0
        rows.filter(pk__in=[pk for pk, *_ in found]).delete()
        for _, key, kind, body in found:
            self._on_reply({"key": key, "kind": kind, **json.loads(body)})
        return len(found)

    def close(self) -> None:
        """Forget the channel: what its workers post later stays for ``KEPT_FOR``."""
        from bulkpool.models import ChunkReply

        ChunkReply.objects.using(self.database).filter(channel=self.channel).delete()
