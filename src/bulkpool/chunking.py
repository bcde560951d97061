"""Cut the input into numbered chunks, lazily: only the chunks in flight are ever in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from bulkpool.protocol import Chunk


def chunked(items: Iterable[Any], size: int) -> Iterator[Chunk]:
    """Yield chunks of ``size`` items, pulling items from ``items`` only when asked for."""
    iterator = iter(items)
    start = 0
    number = 0
    while batch := list(islice(iterator, size)):
        yield Chunk(number, start, batch)
        start += len(batch)
        number += 1


def known_length(items: Iterable[Any]) -> int | None:
    """The number of items when it is known without reading them, else None."""
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
