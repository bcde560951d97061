"""Poison chunks: a chunk that kills every worker that takes it is refused after ``MAX_STARTS``.

Over a broker, a chunk whose worker dies goes back to the broker and is delivered again,
even with no caller left to revoke it. So the workers count each start of a chunk, and the
one that would start it once more than ``MAX_STARTS`` refuses it instead (and acks the
message: the redeliveries end). The caller then loses the chunk and splits it until the
item that kills fails alone.

    worker:  StartGate(count).admit(chunk)  count = one more start, recorded where every
                                            worker and a resumed run see it (the journal's
                                            ``count_start``) -> the starts, or "refused"
    caller:  StartTally.started(key)        a dry run is not journaled: the caller counts the
                                            "started" messages of each key instead

Both are plain counting, fed a counting function or events: no broker, no database needed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bulkpool.protocol import Chunk

logger = logging.getLogger("bulkpool")

MAX_STARTS = 3  # starts of one chunk without a result: it kills its workers


def kills_its_workers(starts: int) -> bool:
    """Whether a chunk started ``starts`` times (this one included) must be refused."""
    return starts > MAX_STARTS


def reason(starts: int, workers: str) -> str:
    """Why a chunk started ``starts`` times (this one included) is given up."""
    return f"the chunk was started {starts - 1} times on {workers} without finishing (it kills them?)"


class StartGate:
    """The worker's side: ``count(chunk)`` records one more start and returns the starts so far."""

    def __init__(self, count: Callable[[Chunk], int]) -> None:
        self._count = count

    def admit(self, chunk: Chunk) -> tuple[bool, int]:
        """(whether to run ``chunk``, its starts so far), counted before it runs: a start that
        kills its worker still counts."""
        starts = self._count(chunk)
        if kills_its_workers(starts):
            logger.warning(
                "Refusing items %s..%s of a bulkpool run: started %s times without finishing.",
                chunk.start,
                chunk.end - 1,
                starts - 1,
            )
            return False, starts
        return True, starts


class StartTally:
    """The caller's side, where no journal counts: the "started" messages of each key."""

    def __init__(self) -> None:
        self._starts: Counter[str] = Counter()

    def started(self, key: str) -> int:
        """One more start of ``key``; returns its starts so far."""
        self._starts[key] += 1
        return self._starts[key]

    def forget(self, key: str) -> None:
        self._starts.pop(key, None)
