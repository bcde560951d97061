"""What one item does: importable by worker processes, which run these functions by name.

A workload is a per-item ``work()`` done before ``User.objects.create(**item)``:

- ``trivial``: no work, so the run measures the ORM, the database and the method's overhead.
- ``setup2ms``: about 2 ms of pure-Python CPU (a multiply-add loop). It holds the GIL, so
  threads cannot overlap it; only processes can.
- ``hash2ms``: about 2 ms of ``hashlib.pbkdf2_hmac``, which releases the GIL while it hashes,
  so threads can overlap it (2 threads ran it 2.2x faster than 1 on a 2-core machine,
  where the pure-Python loop ran 0.84x as fast).
- ``io5ms``: a 5 ms ``time.sleep``, standing for a call to another service: the GIL is
  free while it waits, so threads (or more processes than cores) overlap it.

The loop counts come from the environment (set by ``run.py`` after one calibration) so
every method and every worker process does exactly the same work.
"""

import functools
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

SPIN_ENV = "BENCH_SPIN_ITERATIONS"
HASH_ENV = "BENCH_HASH_ITERATIONS"
TARGET_SECONDS = 0.002
IO_SECONDS = 0.005

saved = 0  # post_save calls seen by this process


def stamp_user(sender: Any, instance: Any, **kwargs: Any) -> None:
    """pre_save: mark the row, so the count of marked rows proves that signals ran."""
    instance.last_name = "signalled"


def count_saved(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    """post_save: a trivial receiver, as most projects have a few."""
    global saved
    saved += 1


def spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i * i
    return total


def pbkdf2(iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", b"password", b"salt", iterations)


@functools.cache
def _iterations(name: str) -> int:
    return int(os.environ[name])


def no_work() -> None:
    pass


def spin_work() -> None:
    spin(_iterations(SPIN_ENV))


def hash_work() -> None:
    pbkdf2(_iterations(HASH_ENV))


def io_work() -> None:
    time.sleep(IO_SECONDS)


def create_user(item: dict[str, str]) -> None:
    get_user_model().objects.create(**item)


def create_user_after_spin(item: dict[str, str]) -> None:
    spin_work()
    create_user(item)


def create_user_after_hash(item: dict[str, str]) -> None:
    hash_work()
    create_user(item)


def create_user_after_io(item: dict[str, str]) -> None:
    io_work()
    create_user(item)


def prepare_item(work: Callable[[], None], item: dict[str, str]) -> dict[str, str]:
    """``prepare=`` for the ``*_prepare`` methods: the workload's work, outside the transaction."""
    work()
    return item


def run_atomically(job: Callable[[dict[str, str]], None], items: list[dict[str, str]]) -> None:
    """One transaction around ``job`` for each of ``items`` (for ``pool_atomic500``)."""
    with transaction.atomic():
        for item in items:
            job(item)


@dataclass(frozen=True)
class Workload:
    job: Callable[[dict[str, str]], None]  # what the methods run for each item
    work: Callable[[], None]  # the part before the create, for bulk_create to repeat


WORKLOADS = {
    "trivial": Workload(create_user, no_work),
    "setup2ms": Workload(create_user_after_spin, spin_work),
    "hash2ms": Workload(create_user_after_hash, hash_work),
    "io5ms": Workload(create_user_after_io, io_work),
}


def calibrate(work: Callable[[int], object], start: int = 1000) -> int:
    """Iterations of ``work`` that take about TARGET_SECONDS here (best of 20 timings)."""
    iterations = start
    while _best_time(work, iterations, 3) < TARGET_SECONDS / 4:
        iterations *= 2
    per_iteration = _best_time(work, iterations, 20) / iterations
    return max(1, round(TARGET_SECONDS / per_iteration))


def _best_time(work: Callable[[int], object], iterations: int, tries: int) -> float:
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        work(iterations)
        best = min(best, time.perf_counter() - start)
    return best
