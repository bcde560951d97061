"""Cut the input into numbered chunks, lazily: only the chunks in flight are ever in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """Items ``start`` .. ``start + len(items) - 1`` of the input: the unit of work a worker runs."""

    number: int
    start: int
    items: list[Any]

    def __len__(self) -> int:
        return len(self.items)

    def indexed(self) -> Iterator[tuple[int, Any]]:
        return enumerate(self.items, self.start)


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
