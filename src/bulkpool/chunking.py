"""Cut the input into numbered chunks, lazily: only the chunks in flight are ever in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

from bulkpool.protocol import Chunk


def chunked(items: Iterable[Any], size: int | Callable[[int], int]) -> Iterator[Chunk]:
    """Yield chunks of ``size`` items, pulling items from ``items`` only when asked for.

    ``size`` may be a function of the next chunk's start, asked as each chunk is read.
    If reading raises, the items read before it still come as a (shorter) chunk, and the
    error is raised at the next pull: what the input gave is run, and then the run stops.
    """
    iterator = iter(items)
    size_at = size if callable(size) else lambda start: size
    start = 0
    number = 0
    while True:
        batch: list[Any] = []
        try:
            batch.extend(islice(iterator, size_at(start)))
        except Exception:
            if batch:
                yield Chunk(number, start, batch)
            raise
        if not batch:
            return
        yield Chunk(number, start, batch)
        start += len(batch)
        number += 1


def known_length(items: Iterable[Any]) -> int | None:
    """The number of items when it is known without reading them, else None."""
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
