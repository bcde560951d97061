"""func's arguments for one chunk run: the items, what ``prepare`` made of them, or what
``load`` makes of them.

    chunk --prepare()--> each item prepared once per chunk run, outside any transaction
                         (no write lock held); the redos, retries and splits reuse the values
    piece --for_piece()--> (offset, argument) pairs; with ``task.load``, loaded inside the
                           piece's transaction, once per attempt
    an item whose prepare or load failed: its error goes in the result; func never sees it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo
from bulkpool.retrying import Transient, is_transient
from bulkpool.work.calling import Calls
from bulkpool.work.timing import Stopwatch


@dataclass(frozen=True)
class PrepareFailed:
    """In place of a prepared value: ``task.prepare`` raised for that item."""

    error: ErrorInfo


class Inputs:
    """func's arguments for the pieces of one chunk (the chunk, or parts of it)."""

    def __init__(self, calls: Calls, chunk: Chunk, clock: Stopwatch) -> None:
        self._calls = calls
        self._chunk = chunk
        self._clock = clock
        # With task.prepare: func's argument for each offset in the chunk, or PrepareFailed.
        self._prepared: list[Any] | None = None

    def prepare(self) -> None:
        """Each item's prepared value (or the error it failed with), outside any transaction
        of ours. Errors in prepare are the item's, as in func; Ctrl-C in the caller's thread
        is the caller's."""
        prepare = self._calls.prepare
        if prepare is None:
            return
        prepared: list[Any] = []
        with self._clock.timing("prepare"):
            for item in self._chunk.items:
                try:
                    prepared.append(prepare(item))
                except KeyboardInterrupt as error:
                    if self._calls.in_caller_thread:
                        raise
                    prepared.append(PrepareFailed(ErrorInfo.from_exception(error)))
                except BaseException as error:
                    prepared.append(PrepareFailed(ErrorInfo.from_exception(error)))
        self._prepared = prepared

    def for_piece(self, piece: Chunk, result: ChunkResult) -> list[tuple[int, Any]]:
        """(offset in ``piece``, argument) pairs to call func with; items that failed to
        prepare or to load are recorded in ``result`` as failures and left out."""
        if self._prepared is not None:
            base = piece.start - self._chunk.start
            inputs = []
            for offset, value in enumerate(self._prepared[base : base + len(piece)]):
                if isinstance(value, PrepareFailed):
                    result.errors[offset] = value.error
                else:
                    inputs.append((offset, value))
            return inputs
        if self._calls.task.load is None:
            return list(enumerate(piece.items))
        return self._load(piece, result)

    def _load(self, piece: Chunk, result: ChunkResult) -> list[tuple[int, Any]]:
        load = self._calls.task.load
        assert load is not None
        with self._clock.timing("load"):
            try:
                loaded = load(piece.items)
            except Exception as error:
                if is_transient(error):
                    raise Transient(error) from error
                loaded = [error] * len(piece)
        inputs = []
        for offset, value in enumerate(loaded):
            if isinstance(value, BaseException):
                result.errors[offset] = ErrorInfo.from_exception(value)
            else:
                inputs.append((offset, value))
        return inputs
