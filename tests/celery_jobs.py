"""Module-level functions for the celery tests: workers import them by their dotted paths."""

from __future__ import annotations

import time

from tests.testapp.models import Marker


def marker(pause: float, i: int) -> int:
    """Write one Marker keyed by the item, then hold the transaction ``pause`` seconds."""
    Marker.objects.create(key=str(i), value=i)
    time.sleep(pause)
    return i * 2


def marker_failing_every(n: int, i: int) -> int:
    """Write one Marker, except for items divisible by ``n``, which raise ``ValueError``."""
    if i % n == 0:
        raise ValueError(f"item {i} is refused")
    Marker.objects.create(key=str(i), value=i)
    return i


def marker_failing_every_slowly(n: int, pause: float, i: int) -> int:
    """``marker_failing_every``, each item holding ``pause`` seconds first: chunks overlap."""
    time.sleep(pause)
    return marker_failing_every(n, i)


def marker_killing_at(poison: int, i: int) -> int:
    """Write one Marker, except item ``poison``, which SIGKILLs the process running it, every time."""
    import os
    import signal

    if i == poison:
        os.kill(os.getpid(), signal.SIGKILL)
    Marker.objects.create(key=str(i), value=i)
    return i


def double_outside(i: int) -> int:
    """A ``prepare``: runs on the worker outside any transaction (it checks)."""
    from django.db import connection

    assert not connection.in_atomic_block, "prepare ran inside a transaction"
    return i * 2


def marker_of_prepared(value: int) -> int:
    """Write one Marker keyed by what ``prepare`` made of the item."""
    Marker.objects.create(key=str(value), value=value)
    return value


def kill_the_node_if_doomed() -> None:
    """A ``setup`` that SIGKILLs the whole celery node it runs on (its main process, then
    this pool process) when the node was started with ``BULKPOOL_TEST_DOOMED_NODE=1``: the
    chunk that node took dies before it ever started."""
    import os
    import signal

    if os.environ.get("BULKPOOL_TEST_DOOMED_NODE"):
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def marker_with_state(i: int, state: None) -> int:
    """Write one Marker keyed by the item (``func`` of a run with ``setup``)."""
    Marker.objects.create(key=str(i), value=i)
    return i


def marker_failing_at_0_slowly(pause: float, i: int) -> int:
    """Item 0 raises at once; every other item writes one Marker, then holds ``pause`` seconds."""
    if i == 0:
        raise ValueError("item 0 is refused")
    return marker(pause, i)
