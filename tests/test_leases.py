"""Leases on chunks in flight, fed events and times by hand: no broker, no clock."""

from __future__ import annotations

from bulkpool.executors.leases import Leases
from bulkpool.protocol import Chunk


def _chunk(start: int) -> Chunk:
    return Chunk(start, start * 10, list(range(10)))


def _sent(*keys: str, at: float = 0.0) -> Leases:
    leases = Leases(lease=5.0)
    for number, key in enumerate(keys):
        leases.sent(key, _chunk(number), at)
    return leases


def test_a_chunk_not_started_holds_no_lease():
    """Sent and never started, with nothing sent after it started: it waits, however long."""
    leases = _sent("a")
    assert leases.expired(now=1000.0) == []
    assert leases.waiting() == ["a"]


def test_a_started_chunk_expires_after_a_lease_of_silence():
    """Started at 1, silent since: kept at 6, given up (started) after 6."""
    leases = _sent("a")
    leases.started("a", "node pid 1", now=1.0)
    assert leases.expired(now=6.0) == []
    [expiry] = leases.expired(now=6.5)
    assert (expiry.key, expiry.started, expiry.lease.host) == ("a", True, "node pid 1")


def test_a_heartbeat_renews_the_lease():
    """Each word of the chunk moves its expiry a lease later."""
    leases = _sent("a")
    leases.started("a", "node pid 1", now=1.0)
    leases.heard("a", now=5.0)
    assert leases.expired(now=9.5) == []
    assert [e.key for e in leases.expired(now=10.5)] == ["a"]


def test_a_chunk_overtaken_by_a_later_one_expires_unstarted():
    """b, sent after a, started at 2 while a had not: a is given up (never started) after 7."""
    leases = _sent("a", "b")
    leases.started("b", "node pid 1", now=2.0)
    leases.heard("b", now=7.0)  # b is alive
    assert leases.expired(now=7.0) == []
    [expiry] = leases.expired(now=7.5)
    assert (expiry.key, expiry.started) == ("a", False)


def test_a_chunk_sent_after_the_one_that_started_is_not_overtaken():
    """Only chunks sent before the one that started are overtaken."""
    leases = _sent("a", "b")
    leases.started("a", "node pid 1", now=2.0)
    leases.heard("a", now=100.0)
    assert leases.expired(now=100.0) == []
    assert leases.waiting() == ["b"]


def test_an_overtaken_chunk_that_starts_holds_a_lease_instead():
    """Overtaken at 2, started at 4: it now expires only after silence, from 4."""
    leases = _sent("a", "b")
    leases.started("b", "node pid 1", now=2.0)
    leases.started("a", "node pid 2", now=4.0)
    leases.heard("b", now=9.0)
    assert leases.expired(now=9.0) == []
    assert [e.key for e in leases.expired(now=9.5)] == ["a"]


def test_words_of_a_key_given_up_are_ignored():
    """Once popped, a key's later messages find nothing: a chunk is never reported twice."""
    leases = _sent("a")
    assert leases.pop("a").chunk.start == 0
    assert leases.heard("a", now=1.0) is None
    assert leases.started("a", "node pid 1", now=1.0) is None
    assert "a" not in leases and len(leases) == 0


def test_untaken_since_the_oldest_send_while_nothing_started():
    """No worker took any chunk: since the first was sent; once one starts, None."""
    leases = Leases(lease=5.0)
    assert leases.untaken_since() is None  # nothing in flight
    leases.sent("a", _chunk(0), 1.0)
    leases.sent("b", _chunk(1), 3.0)
    assert leases.untaken_since() == 1.0
    leases.started("b", "node pid 1", now=4.0)
    assert leases.untaken_since() is None
