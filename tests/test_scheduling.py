"""The scheduling policy, fed events by hand: no processes, no database."""

from __future__ import annotations

import datetime
import decimal
import uuid

import pytest

from bulkpool.protocol import JSON, PICKLE, Chunk, ChunkLost, ChunkResult, ErrorInfo, Timings
from bulkpool.scheduling import Drop, Fail, Scheduler, SendAgain


def chunk(start: int, size: int) -> Chunk:
    return Chunk(start // 10, start, list(range(start, start + size)))


def lost(c: Chunk, in_doubt: bool = False) -> ChunkLost:
    return ChunkLost(c, "the worker died", in_doubt=in_doubt)


def test_window_holds_capacity_chunks_in_flight():
    """No more than ``capacity`` chunks go out before one comes back."""
    scheduler = Scheduler(capacity=2, retries=3)
    for n in range(2):
        assert scheduler.may_send()
        scheduler.sent(chunk(n * 10, 10))
    assert not scheduler.may_send()
    scheduler.finished(chunk(0, 10), ChunkResult(0, None))
    assert scheduler.may_send()


def test_ordered_results_are_released_in_input_order():
    """A chunk that finishes early waits for the ones before it."""
    scheduler = Scheduler(capacity=3, retries=3, ordered=True)
    first, second, third = chunk(0, 10), chunk(10, 10), chunk(20, 10)
    for c in (first, second, third):
        scheduler.sent(c)
    assert scheduler.finished(third, ChunkResult(2, None)) == []
    assert scheduler.finished(second, ChunkResult(1, None)) == []
    released = scheduler.finished(first, ChunkResult(0, None))
    assert [c.start for c, _ in released] == [0, 10, 20]


def test_ordered_window_counts_results_waiting_for_an_earlier_chunk():
    """Ordered output: results waiting for a slow chunk take room, so memory stays bounded."""
    scheduler = Scheduler(capacity=2, retries=3, ordered=True)
    slow = chunk(0, 10)
    scheduler.sent(slow)
    for n in range(1, 4):
        scheduler.sent(chunk(n * 10, 10))
        scheduler.finished(chunk(n * 10, 10), ChunkResult(n, None))
    assert not scheduler.may_read()  # 1 in flight + 3 waiting >= 2 * capacity: no fresh input
    assert scheduler.may_send()  # but a chunk sent again, or one already planned, may go


def test_a_lost_chunk_is_sent_again_up_to_retries_then_split_in_halves():
    """Lost once, twice: sent again whole; after ``retries`` it is split in halves."""
    scheduler = Scheduler(capacity=1, retries=2)
    whole = chunk(0, 10)
    for _ in range(2):
        scheduler.sent(whole)
        decision = scheduler.lost(lost(whole))
        assert decision == SendAgain((whole,), 10)
        scheduler.again(decision.chunks)
        assert scheduler.next_again() == whole
    scheduler.sent(whole)
    decision = scheduler.lost(lost(whole))
    assert isinstance(decision, SendAgain)
    assert [(c.start, len(c)) for c in decision.chunks] == [(0, 5), (5, 5)]
    scheduler.again(decision.chunks)
    first = scheduler.next_again()
    assert first is not None and first.start == 0  # the first half goes first


def test_a_poison_item_is_found_by_halving_and_fails_alone():
    """Pieces of a split chunk are split again at their first loss, down to the one item."""
    scheduler = Scheduler(capacity=1, retries=0)
    poison = 6
    piece = chunk(0, 10)
    deaths = 0
    while True:
        scheduler.sent(piece)
        decision = scheduler.lost(lost(piece))
        deaths += 1
        if isinstance(decision, Fail):
            break
        assert isinstance(decision, SendAgain)
        piece = next(c for c in decision.chunks if c.start <= poison < c.end)
    assert (piece.start, len(piece)) == (poison, 1)
    assert decision.record  # the journal records it, so a resume reports it instead of running it
    (error,) = decision.result.errors.values()
    assert error.exc_type == "bulkpool.WorkerDied" and not error.unsafe
    assert deaths <= 5  # 1 whole + log2(10) rounded up


def test_a_chunk_queued_behind_a_poison_one_is_sent_again_without_blame():
    """Chunks that never started when their worker died count no loss: innocent items are
    never split off and failed with the poison."""
    scheduler = Scheduler(capacity=2, retries=0)
    poison, behind = chunk(0, 8), chunk(8, 8)
    for c in (poison, behind):
        scheduler.sent(c)
    assert isinstance(scheduler.lost(lost(poison)), SendAgain)  # split: retries=0
    for _ in range(5):  # however often it waits behind the poison
        scheduler.sent(behind)
        decision = scheduler.lost(ChunkLost(behind, "the worker died", started=False))
        assert decision == SendAgain((behind,), 0)


def test_a_chunk_lost_in_commit_without_a_journal_fails_commit_unknown():
    """In doubt and no journal to ask: never sent again, its items fail CommitUnknown, unsafe."""
    scheduler = Scheduler(capacity=1, retries=3, journaled=False)
    c = chunk(0, 10)
    scheduler.sent(c)
    decision = scheduler.lost(lost(c, in_doubt=True))
    assert isinstance(decision, Fail) and not decision.record
    assert {e.exc_type for e in decision.result.errors.values()} == {"bulkpool.CommitUnknown"}
    assert all(e.unsafe for e in decision.result.errors.values())


def test_a_chunk_lost_in_commit_with_a_journal_is_sent_again():
    """In doubt with a journal: sent again; the worker's journal check tells whether it committed."""
    scheduler = Scheduler(capacity=1, retries=3, journaled=True)
    c = chunk(0, 10)
    scheduler.sent(c)
    assert scheduler.lost(lost(c, in_doubt=True)) == SendAgain((c,), 10)


@pytest.mark.parametrize("atomic", ["item", False])
def test_without_a_chunk_transaction_a_lost_chunk_fails_unsafe(atomic):
    """atomic='item'/False: some items may be written, so the chunk is not sent again; unsafe."""
    scheduler = Scheduler(capacity=1, retries=3, atomic=atomic)
    c = chunk(0, 10)
    scheduler.sent(c)
    decision = scheduler.lost(lost(c))
    assert isinstance(decision, Fail)
    assert all(e.unsafe and e.exc_type == "bulkpool.WorkerDied" for e in decision.result.errors.values())


def test_a_stopping_run_drops_lost_chunks_and_sends_nothing():
    """Once stopping, nothing more goes out and a lost chunk stays not run."""
    scheduler = Scheduler(capacity=2, retries=3)
    c = chunk(0, 10)
    scheduler.sent(c)
    scheduler.stopping = True
    assert not scheduler.may_send()
    assert isinstance(scheduler.lost(lost(c)), Drop)
    assert scheduler.in_flight == 0


# -- the codecs ----------------------------------------------------------------------------


def result_with_everything() -> ChunkResult:
    return ChunkResult(
        number=3,
        values=[1, None, "x"],
        errors={1: ErrorInfo("ValueError", "bad", "Traceback ...", unsafe=False)},
        retried=2,
        callback_errors={0: ErrorInfo("ZeroDivisionError", "division by zero", "tb")},
        timings=Timings(load=0.1, work=0.2, commit=0.05, total=0.4),
    )


@pytest.mark.parametrize("codec", [PICKLE, JSON], ids=["pickle", "json"])
def test_codecs_carry_chunks_and_results_whole(codec):
    """A chunk and a chunk result come back equal from either codec."""
    items = [
        {"when": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)},
        datetime.date(2024, 5, 1),
        decimal.Decimal("1.10"),
        uuid.UUID(int=7),
        "plain",
    ]
    original = Chunk(2, 20, items)
    assert codec.decode(codec.encode(original)) == original
    assert codec.decode(codec.encode(result_with_everything())) == result_with_everything()


def test_json_codec_refuses_what_json_cannot_carry():
    """An object JSON cannot carry is refused with its type named."""
    with pytest.raises(TypeError, match=r"builtins\.object"):
        JSON.encode(Chunk(0, 0, [object()]))
    with pytest.raises(TypeError, match="cannot be sent as JSON"):
        JSON.check_value({1, 2})
