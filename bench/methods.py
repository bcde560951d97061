"""The methods compared: each takes a workload and a generator of items and writes them all.

A method returns None, or a dict of facts worth checking (``bulkpool.run``'s Report).
``UPDATE_METHODS`` take a value instead, and set every user's ``first_name`` to it.
"""

import functools
import itertools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connections, transaction
from django.db.models.signals import post_save, pre_save
from tqdm import tqdm

from bench import jobs
from bench.jobs import Workload

Items = Iterable[dict[str, str]]


def loop(workload: Workload, items: Items) -> None:
    """The baseline: one create per item, each its own autocommit transaction."""
    for item in items:
        workload.job(item)


def loop_atomic500(workload: Workload, items: Items) -> None:
    """The same loop, one transaction per 500 items."""
    for chunk in _chunks(items, 500):
        with transaction.atomic():
            for item in chunk:
                workload.job(item)


def ppe_script(workload: Workload, items: Items, processes: int = 4) -> None:
    """The script in SPEC.md: a ProcessPoolExecutor(4), one future per item, a tqdm bar."""
    connections.close_all()
    with (
        open(os.devnull, "w") as devnull,
        ProcessPoolExecutor(max_workers=processes) as executor,
    ):
        futures = [executor.submit(workload.job, item) for item in items]
        for future in tqdm(futures, file=devnull):
            future.result()


def ppe_script_cpus(workload: Workload, items: Items) -> None:
    """The same script with as many processes as the machine has CPUs, as its users tune it."""
    ppe_script(workload, items, processes=os.cpu_count() or 1)


def pool_atomic500(workload: Workload, items: Items) -> None:
    """The best hand-written design in FINDINGS.md: 2 processes, one atomic() per 500 items."""
    connections.close_all()
    run_chunk = functools.partial(jobs.run_atomically, workload.job)
    with multiprocessing.Pool(2) as pool:
        for _ in pool.imap_unordered(run_chunk, _chunks(items, 500)):
            pass


def thread_atomic100(workload: Workload, items: Items) -> None:
    """A ThreadPoolExecutor(8), one atomic() per 100 items; each block closes its thread's connection."""
    with ThreadPoolExecutor(max_workers=8) as executor:
        blocks = [executor.submit(_run_block_in_thread, workload.job, chunk) for chunk in _chunks(items, 100)]
        for block in blocks:
            block.result()


def _run_block_in_thread(job: Callable[[dict[str, str]], None], items: list[dict[str, str]]) -> None:
    try:
        jobs.run_atomically(job, items)
    finally:
        connections.close_all()  # a thread's connection can only be closed by that thread


def bulkpool_untuned(workload: Workload, items: Items) -> dict[str, Any]:
    """``bulkpool.run(job, items)`` with no option at all: whatever the defaults are today."""
    import bulkpool

    return _facts(bulkpool.run(workload.job, items))


def bulkpool_fast(workload: Workload, items: Items) -> dict[str, Any]:
    """``bulkpool.create(User, items, fast=True)``, no other option (the work in ``prepare``)."""
    return _bulkpool_create(workload, items, fast=True)


def bulkpool_fast_serial(workload: Workload, items: Items) -> dict[str, Any]:
    """The same on the caller's core: ``backend="serial"``."""
    return _bulkpool_create(workload, items, fast=True, backend="serial")


def bulkpool_fast_process2(workload: Workload, items: Items) -> dict[str, Any]:
    """The same on 2 processes: ``backend="process", workers=2``."""
    return _bulkpool_create(workload, items, fast=True, backend="process", workers=2)


def _bulkpool_create(workload: Workload, items: Items, **options: Any) -> dict[str, Any]:
    import bulkpool

    if workload.work is not jobs.no_work:
        options["prepare"] = functools.partial(jobs.prepare_item, workload.work)
    return _facts(bulkpool.create(get_user_model(), items, **options))


def bulkpool_serial(workload: Workload, items: Items) -> dict[str, Any]:
    return _bulkpool(workload, items, backend="serial")


def bulkpool_thread(workload: Workload, items: Items) -> dict[str, Any]:
    return _bulkpool(workload, items, backend="thread", workers=2)


def bulkpool_thread_auto(workload: Workload, items: Items) -> dict[str, Any]:
    """``backend="thread"``, sized as untuned is: do threads beat untuned's processes anywhere?"""
    return _bulkpool(workload, items, backend="thread")


def bulkpool_process(workload: Workload, items: Items) -> dict[str, Any]:
    return _bulkpool(workload, items, backend="process", workers=2)


def bulkpool_process_500(workload: Workload, items: Items) -> dict[str, Any]:
    """As ``bulkpool_process``, with the chunk size of ``pool_atomic500``: same commit count."""
    return _bulkpool(workload, items, backend="process", workers=2, chunk_size=500)


def bulkpool_serial_prepare(workload: Workload, items: Items) -> dict[str, Any]:
    """The workload's work in ``prepare``, the create in ``func``, in the caller's process."""
    return _bulkpool_prepared(workload, items, backend="serial")


def bulkpool_process_prepare(workload: Workload, items: Items) -> dict[str, Any]:
    """The same on 2 processes: the work runs outside the chunk's write transaction."""
    return _bulkpool_prepared(workload, items, backend="process", workers=2)


def _bulkpool_prepared(workload: Workload, items: Items, **options: Any) -> dict[str, Any]:
    import bulkpool

    prepare = functools.partial(jobs.prepare_item, workload.work)
    report = bulkpool.run(jobs.create_user, items, prepare=prepare, progress=False, **options)
    return _facts(report)


def bulkpool_process_journaled(workload: Workload, items: Items) -> dict[str, Any]:
    """As ``bulkpool_process``, journaled (a ``run_id``), as every celery run is."""
    import uuid

    return _bulkpool(workload, items, backend="process", workers=2, run_id=f"bench-{uuid.uuid4().hex}")


def bulkpool_celery(workload: Workload, items: Items) -> dict[str, Any]:
    """``bulkpool.run`` on ``backend="celery"``: a local node of 2 prefork processes on the
    broker of ``bench.celery_app`` (Redis by default); the node's start is not timed."""
    import subprocess
    import sys
    import time
    import uuid

    from bench.celery_app import app

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    node = f"bench-{queue}@localhost"
    command = [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "prefork"]
    command += ["-c", "2", "-Q", queue, "-n", node, "--without-gossip", "--without-mingle", "-l", "error"]
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[node], timeout=0.5):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError("the celery worker did not start")
        started = time.perf_counter()
        from bulkpool import CeleryExecutor

        facts = _bulkpool(workload, items, backend=CeleryExecutor(app=app, queue=queue), workers=2)
        return {**facts, "elapsed": time.perf_counter() - started}
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def bulk_create(workload: Workload, items: Items) -> None:
    """For reference: one INSERT per 1,000 rows; no save(), no signals."""
    user = get_user_model()
    for chunk in _chunks(items, 1000):
        user.objects.bulk_create(_built_users(workload, chunk))


def _built_users(workload: Workload, chunk: Any) -> list[Any]:
    """Unsaved users for the bulk methods, each after its item's work."""
    user = get_user_model()
    objects = []
    for item in chunk:
        workload.work()
        objects.append(user(**item))
    return objects


def signalled_bulk_create(workload: Workload, items: Items) -> None:
    """The floor of a signal-keeping bulk path, by hand (FINDINGS.md): ``pre_save`` per
    object, ``bulk_create`` per 1,000, ``post_save`` per object, one atomic() per 1,000."""
    user = get_user_model()
    for chunk in _chunks(items, 1000):
        objects = _built_users(workload, chunk)
        with transaction.atomic():
            for obj in objects:
                pre_save.send(user, instance=obj, raw=False, using="default", update_fields=None)
            user.objects.bulk_create(objects)
            for obj in objects:
                post_save.send(
                    user, instance=obj, created=True, raw=False, using="default", update_fields=None
                )


def _bulkpool(workload: Workload, items: Items, **options: Any) -> dict[str, Any]:
    import bulkpool  # here, so the other methods run while the library cannot be imported

    report = bulkpool.run(workload.job, items, progress=False, **options)
    return _facts(report)


def _facts(report: Any) -> dict[str, Any]:
    first = report.failures[0] if report.failures else None
    return {
        "report_ok": report.ok,
        "report_failed": report.failed,
        "first_failure": f"{first.exc_type}: {first.message}" if first else None,
        "notes": list(getattr(report, "notes", [])),  # what workers/chunk_size="auto" chose, and why
    }


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


METHODS: dict[str, Callable[[Workload, Items], dict[str, Any] | None]] = {
    "loop": loop,
    "loop_atomic500": loop_atomic500,
    "ppe_script": ppe_script,
    "ppe_script_cpus": ppe_script_cpus,
    "pool_atomic500": pool_atomic500,
    "bulkpool_serial": bulkpool_serial,
    "bulkpool_thread": bulkpool_thread,
    "bulkpool_thread_auto": bulkpool_thread_auto,
    "bulkpool_process": bulkpool_process,
    "bulkpool_process_500": bulkpool_process_500,
    "bulkpool_serial_prepare": bulkpool_serial_prepare,
    "bulkpool_process_prepare": bulkpool_process_prepare,
    "bulkpool_process_journaled": bulkpool_process_journaled,
    "bulkpool_celery": bulkpool_celery,
    "bulk_create": bulk_create,
    "thread_atomic100": thread_atomic100,
    "bulkpool_untuned": bulkpool_untuned,
    "bulkpool_fast": bulkpool_fast,
    "bulkpool_fast_serial": bulkpool_fast_serial,
    "bulkpool_fast_process2": bulkpool_fast_process2,
    "signalled_bulk_create": signalled_bulk_create,
}


def update_loop_atomic500(value: str) -> None:
    """By hand: load 500 users at a time, set, ``save(update_fields=...)``, one atomic() per 500."""
    user = get_user_model()
    pks = list(user.objects.order_by("pk").values_list("pk", flat=True))
    for chunk in _chunks(pks, 500):
        with transaction.atomic():
            for obj in user.objects.filter(pk__in=chunk):
                obj.first_name = value
                obj.save(update_fields=["first_name"])


def bulk_update(value: str) -> None:
    """For reference: load all, set, ``bulk_update`` per 1,000; no save(), no signals."""
    user = get_user_model()
    objects = list(user.objects.all())
    for obj in objects:
        obj.first_name = value
    user.objects.bulk_update(objects, ["first_name"], batch_size=1000)


def bulkpool_update(value: str) -> dict[str, Any]:
    """``bulkpool.update`` with no option: a ``save(update_fields=...)`` per object."""
    return _bulkpool_update(value)


def bulkpool_update_fast(value: str) -> dict[str, Any]:
    """The same with ``fast=True``: the signals per object, the UPDATEs in bulk."""
    return _bulkpool_update(value, fast=True)


def _bulkpool_update(value: str, **options: Any) -> dict[str, Any]:
    import bulkpool

    users = get_user_model().objects.all()
    report = bulkpool.update(users, values={"first_name": value}, update_fields=["first_name"], **options)
    return _facts(report)


UPDATE_METHODS: dict[str, Callable[[str], dict[str, Any] | None]] = {
    "update_loop_atomic500": update_loop_atomic500,
    "bulk_update": bulk_update,
    "bulkpool_update": bulkpool_update,
    "bulkpool_update_fast": bulkpool_update_fast,
}
