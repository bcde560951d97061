"""Leases on chunks sent to workers the caller cannot watch (a broker's consumers): which of
them will not come back. Pure bookkeeping, fed events with their times; it sends nothing.

    executor                                   Leases
    sent a chunk under a key          -->  sent(key, chunk, now)       its place in the send order
    a worker says it started it       -->  started(key, host, now)     chunks sent before it and
                                                                       not started are "overtaken"
    any later word of it (heartbeat)  -->  heard(key, now)             renews the lease
    it finished, or was given up      -->  pop(key)                    forgotten: later words ignored
    now and then                      -->  expired(now)                what to give up, and why
                                      -->  untaken_since()             since when no worker took any

A started chunk whose worker went silent for ``lease`` seconds is lost (the node died, or
lost the network). A chunk that was never started holds no lease: it waits for a free
worker. But brokers hand messages out in the order they were sent, so a chunk that chunks
sent after it have overtaken -- they started, it did not, for ``lease`` seconds -- was taken
by a node that died before starting it: it is lost too, without blame (it never ran).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from bulkpool.protocol import Chunk


@dataclass
class Lease:
    chunk: Chunk
    sent: float
    seen: float  # when the chunk was sent, or last heard of
    order: int  # sent n-th: the broker hands chunks out in this order
    started: bool = False
    host: str = ""  # where it started, for the messages
    overtaken: float | None = None  # when a chunk sent after it started, while it had not


@dataclass(frozen=True)
class Expiry:
    """A chunk to give up: ``started``, its worker went silent; else chunks sent after it overtook it."""

    key: str
    lease: Lease

    @property
    def started(self) -> bool:
        return self.lease.started


class Leases:
    """The chunks in flight, by key, and when each was last heard of."""

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._flight: dict[str, Lease] = {}
        self._sent = 0

    def __len__(self) -> int:
        return len(self._flight)

    def __contains__(self, key: object) -> bool:
        return key in self._flight

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._flight))

    def sent(self, key: str, chunk: Chunk, now: float) -> None:
        self._sent += 1
        self._flight[key] = Lease(chunk, now, now, self._sent)

    def heard(self, key: str, now: float) -> Lease | None:
        """Renew the lease of ``key``; None for a key not in flight (given up, or another run's)."""
        lease = self._flight.get(key)
        if lease is not None:
            lease.seen = now
        return lease

    def started(self, key: str, host: str, now: float) -> Lease | None:
        """``key`` started on ``host``: every chunk sent before it and not started is overtaken."""
        lease = self.heard(key, now)
        if lease is None:
            return None
        lease.started, lease.host = True, host
        for earlier in self._flight.values():
            if earlier.order < lease.order and not earlier.started and earlier.overtaken is None:
                earlier.overtaken = now
        return lease

    def pop(self, key: str) -> Lease:
        return self._flight.pop(key)

    def waiting(self) -> list[str]:
        """The keys sent and not started: still in the broker, or taken and not begun."""
        return [key for key, lease in self._flight.items() if not lease.started]

    def expired(self, now: float) -> list[Expiry]:
        """The chunks to give up at ``now`` (they stay in flight until popped)."""
        return [
            Expiry(key, lease)
            for key, lease in self._flight.items()
            if (lease.started and now - lease.seen > self.lease)
            or (not lease.started and lease.overtaken is not None and now - lease.overtaken > self.lease)
        ]

    def untaken_since(self) -> float | None:
        """When the oldest chunk in flight was sent, while none in flight has started (else
        None): since then no worker took any of them."""
        if not self._flight or any(lease.started for lease in self._flight.values()):
            return None
        return min(lease.sent for lease in self._flight.values())

    def clear(self) -> None:
        self._flight.clear()
