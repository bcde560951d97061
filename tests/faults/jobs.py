"""Module-level job functions for the fault suite (process workers import this module)."""

from __future__ import annotations

import os
import signal
import time

from django.db import connection
from django.db.models import F

from tests.testapp.models import Marker

COUNTERS = ("counter-a", "counter-b")


def slow_marker(pause: float, i: int) -> int:
    """Write one Marker keyed by the item, then hold the transaction open for ``pause`` seconds."""
    Marker.objects.create(key=str(i), value=i)
    time.sleep(pause)
    return i


def slow_marker_with_state(pause: float, i: int, state: None) -> int:
    """``slow_marker`` for a run with ``setup=`` (whose state it ignores)."""
    return slow_marker(pause, i)


def slow_setup(seconds: float) -> None:
    """A per-worker setup that takes ``seconds``: workers stay "starting" that long."""
    time.sleep(seconds)


def cross_counters(group: int, pause: float, i: int) -> int:
    """Add 1 to both counter rows, in an order that flips every ``group`` items, then write a Marker.

    Two workers running neighbouring groups lock the counters in opposite orders: a deadlock.
    """
    if connection.vendor == "postgresql":
        # Detect the deadlock in 50 ms rather than the default second (needs a superuser).
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL deadlock_timeout = '50ms'")
    first, second = COUNTERS if (i // group) % 2 == 0 else reversed(COUNTERS)
    Marker.objects.filter(key=first).update(value=F("value") + 1)
    time.sleep(pause)
    Marker.objects.filter(key=second).update(value=F("value") + 1)
    Marker.objects.create(key=str(i), value=i)
    return i


def hot_counter(i: int) -> int:
    """Read, write a Marker, and add 1 to one shared counter row: every item wants the write lock."""
    seen = Marker.objects.filter(key=str(i)).count()
    Marker.objects.create(key=str(i), value=seen)
    Marker.objects.filter(key=COUNTERS[0]).update(value=F("value") + 1)
    sum(range(5_000))  # a little CPU work while the write lock is held
    return i


def think_then_mark(think: float, i: int) -> int:
    """Think ``think`` seconds without the database, then write one Marker: most of the
    item's time comes before its first write (on SQLite, bulkpool runs such items each in a
    transaction of its own, taking the write lock at the write)."""
    time.sleep(think)
    Marker.objects.create(key=str(i), value=i)
    return i


def think_then_mark_dying_at(target: int, think: float, i: int) -> int:
    """``think_then_mark``, but SIGKILL the worker process every time item ``target`` runs."""
    time.sleep(think)
    if i == target:
        os.kill(os.getpid(), signal.SIGKILL)
    Marker.objects.create(key=str(i), value=i)
    return i
