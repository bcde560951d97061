"""What a run shows and leaves as it goes: the progress bar and the rejects file."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from tqdm import tqdm

from bulkpool.chunking import known_length
from bulkpool.outcomes import Failure
from bulkpool.protocol import UNREADABLE


class NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(progress: bool | None, items: Any) -> Any:
    """A tqdm bar: in bytes for a file of known size (so it has a total and an ETA), else in items."""
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return NoBar()
    if isinstance(getattr(items, "size", None), int):
        return tqdm(
            total=items.size, unit="B", unit_scale=True, desc="bulkpool", file=sys.stderr, smoothing=0.1
        )
    return tqdm(total=known_length(items), unit="item", desc="bulkpool", file=sys.stderr, smoothing=0.1)


def open_rejects(path: Any, *, append: bool) -> IO[str] | None:
    """The rejects file: started afresh, or added to when resuming a journaled run."""
    return open(path, "a" if append else "w", encoding="utf-8") if path else None


def write_reject(file: IO[str] | None, failure: Failure) -> None:
    if file is None:
        return
    line = {
        "index": failure.index,
        "item": failure.item,
        "exc_type": failure.exc_type,
        "message": failure.message,
    }
    if failure.line is not None:
        line["line"] = failure.line
    if failure.unsafe:
        line["unsafe"] = True
    if failure.exc_type == UNREADABLE:
        line["unreadable"] = True  # its item is the raw line: fix it in the input, not here
    file.write(json.dumps(line, default=repr, ensure_ascii=False) + "\n")
    file.flush()
