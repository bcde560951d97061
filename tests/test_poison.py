"""Poison counting, fed a counting function and events by hand: no broker, no database."""

from __future__ import annotations

import itertools

from bulkpool.executors.poison import MAX_STARTS, StartGate, StartTally, kills_its_workers, reason
from bulkpool.protocol import Chunk

CHUNK = Chunk(0, 40, list(range(4)))


def test_a_worker_runs_a_chunk_up_to_max_starts_then_refuses_it():
    """Starts 1..MAX_STARTS run; the next start is refused, with the starts so far."""
    counter = itertools.count(1)
    gate = StartGate(lambda chunk: next(counter))
    admitted = [gate.admit(CHUNK) for _ in range(MAX_STARTS + 1)]
    assert admitted == [(True, n) for n in range(1, MAX_STARTS + 1)] + [(False, MAX_STARTS + 1)]


def test_the_gate_counts_before_it_decides():
    """The start is recorded before the chunk runs, so a start that kills its worker counts."""
    counted: list[Chunk] = []

    def count(chunk: Chunk) -> int:
        counted.append(chunk)
        return len(counted)

    gate = StartGate(count)
    gate.admit(CHUNK)
    assert counted == [CHUNK]


def test_a_resumed_run_meets_the_same_count():
    """A count that is already past the limit (the journal's, from the first attempt) refuses at once."""
    gate = StartGate(lambda chunk: MAX_STARTS + 2)
    assert gate.admit(CHUNK) == (False, MAX_STARTS + 2)


def test_the_caller_counts_started_messages_per_key():
    """Without a journal (a dry run), the caller's tally says when a key kills its workers."""
    tally = StartTally()
    starts = [tally.started("a") for _ in range(MAX_STARTS + 1)]
    assert [kills_its_workers(n) for n in starts] == [False] * MAX_STARTS + [True]
    assert tally.started("b") == 1


def test_a_key_forgotten_counts_from_zero():
    """A chunk sent again goes under a new key; a forgotten key starts over."""
    tally = StartTally()
    tally.started("a")
    tally.forget("a")
    assert tally.started("a") == 1


def test_the_reason_says_how_many_starts_did_not_finish():
    """The fourth start is refused because three did not finish."""
    assert reason(MAX_STARTS + 1, "celery workers") == (
        f"the chunk was started {MAX_STARTS} times on celery workers without finishing (it kills them?)"
    )
