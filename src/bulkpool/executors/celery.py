"""The celery executor: chunks run as Celery tasks on any number of machines, applied once by the journal.

Data flow (every message is JSON; nothing is pickled):

    caller (CeleryExecutor)                                  a celery worker, on any machine
    start()   declares its own reply queue on the app's broker
    submit()  --send_task("bulkpool.run_chunk",                -->  tasks.run_chunk -> run_here():
                 [job, chunk, key, reply queue])                    a Worker per job and process
                                                                    (setup runs once there), on
                                                                    a thread of its own (_Runner)
                                                                    that keeps its connections
                                                                    one more start of the chunk,
                                                                    counted in the journal
    events()  <--{"kind": "started", key, host, pid}-----------     before the chunk runs, or
              <--{"kind": "refused", key, starts}----------------   it started MAX_STARTS times
              <--{"kind": "crashed", key, error, traceback}------   failed outside any item
              <--{"kind": "beat", key}  every heartbeat s -------     while it runs (a thread)
              <--{"kind": "done", key, ChunkResult as JSON}------     committed, failed or skipped
              <--{"kind": "setup_failed", traceback}--------------    setup raised on that worker

``job`` is what a worker needs to build the ``Task``: ``func`` and ``setup`` as references
(a dotted path; a ``functools.partial`` as its function's path and JSON arguments; a
bulkpool operation such as ``create``'s per-row callable as its class path and JSON fields),
the options, the journal's ``JournalRef``, and for QuerySet input the model label (the
worker loads each chunk's rows by primary key with the model's base manager).

Results come back on the reply queue, not through a result backend: it works with or
without one, on Redis and RabbitMQ alike. The reply queue expires on RabbitMQ when the
caller has gone for ``REPLY_EXPIRES`` seconds; on Redis it is deleted by ``stop()`` (a
caller killed with SIGKILL leaves a small list behind).

Exactly once. Every celery run is journaled (``delivery = "at_least_once"``; the engine
makes a ``run_id`` up when none is given). The task is ``acks_late`` with
``reject_on_worker_lost``, so the chunk of a killed pool child goes back to the broker at
once and runs again elsewhere; a chunk that runs twice meets its journal record
(``AlreadyDone``) and is skipped, not applied again.

Loss. A started chunk holds a lease that each heartbeat renews; when it expires (the node
died, or lost the network) the chunk comes back ``ChunkLost`` and its task is revoked, so
the engine sends it again (or splits it) under a new key. Messages under a key declared
lost are ignored.

Poison. A worker counts each start of a chunk in the journal (``count_start``: same run,
start and size, in a transaction of its own, before the chunk runs), so the count is
the same on every machine and outlives the caller. A chunk started ``MAX_STARTS`` times
without finishing kills the workers that take it: the next worker to get it refuses it
("refused") and acks the message, so the broker stops redelivering it even when no
caller is left to revoke it; the caller loses it and the engine splits it until the item
that does it fails alone, as locally. A resumed run meets the same count: the chunk that
killed workers in the first attempt is refused at once in the second. (A dry run is not
journaled: there the caller counts the "started" messages of each key.)

A chunk that was never started has no lease: it waits in the broker for a free worker.
But the broker hands messages out in the order they were sent, so a chunk that chunks
sent after it have overtaken -- they started, it did not, for ``lease`` seconds -- was
taken by a node that died before starting it. On RabbitMQ the broker requeues such a
message when the node's connection drops; on Redis it would wait for the visibility
timeout (an hour by default), so the caller sends it again (without blame: it never ran;
the old message, if it ever runs, meets the journal). Run workers with
``worker_prefetch_multiplier = 1``, so that a node takes only what it runs at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import os
import queue
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bulkpool.errors import ConfigurationError, WorkerStartupError
from bulkpool.executors.base import Executor
from bulkpool.journal import JournalRef, count_start
from bulkpool.protocol import JSON, Chunk, ChunkDone, ChunkLost, Event, Task

if TYPE_CHECKING:
    from bulkpool.options import Options
    from bulkpool.work import Worker

logger = logging.getLogger("bulkpool")

TASK_NAME = "bulkpool.run_chunk"
MAX_STARTS = 3  # starts of one chunk without a result: it kills its workers
REPLY_EXPIRES = 3600  # seconds a reply queue outlives its caller (RabbitMQ)
WORKERS_CACHED = 4  # jobs a worker process keeps set up at once


class CeleryExecutor(Executor):
    """Chunks as Celery tasks of ``app`` (the project's current app by default) on ``queue``.

    ``lease``: seconds a started chunk may go without a heartbeat before it counts as lost
    (``heartbeat``, by default a sixth of it, is how often a worker sends one).
    ``ahead``: chunks in flight (sent, not finished) per worker expected (``workers``).
    """

    name = "celery"
    delivery = "at_least_once"
    detects_loss = True

    def __init__(
        self,
        workers: int | None = None,
        *,
        app: Any = None,
        queue: str | None = None,
        lease: float = 30.0,
        heartbeat: float | None = None,
        ahead: int = 2,
    ) -> None:
        super().__init__(workers)
        heartbeat = lease / 6 if heartbeat is None else heartbeat
        if not 0 < heartbeat < lease:
            raise ConfigurationError(
                f"heartbeat ({heartbeat}) must be more than 0 and less than lease ({lease})."
            )
        if ahead < 1:
            raise ConfigurationError(f"ahead must be 1 or more, not {ahead!r}.")
        self.app = app
        self.queue = queue
        self.lease = lease
        self.heartbeat = heartbeat
        self.ahead = ahead

    def __repr__(self) -> str:
        return f"CeleryExecutor(workers={self.workers!r}, queue={self.queue!r}, lease={self.lease!r})"

    # -- before the run --------------------------------------------------------------------

    def check_options(self, options: Options) -> None:
        from django.apps import apps

        if not options.dry_run and not apps.is_installed("bulkpool"):
            raise ConfigurationError(
                "The celery backend journals every run, so that a chunk delivered twice is applied "
                'once: add "bulkpool" to INSTALLED_APPS (the workers need it too, for their task) '
                "and run `python manage.py migrate bulkpool`."
            )

    def check(self, task: Task) -> None:
        job_of(task, heartbeat=self.heartbeat)  # refuses what cannot travel, before anything is sent

    # -- the Executor interface ------------------------------------------------------------

    def start(self, task: Task, workers: int) -> None:
        from kombu import Consumer, Exchange, Queue

        self._app = self.app or _current_app()
        self._job = JSON.encode(job_of(task, heartbeat=self.heartbeat)).decode()
        self._capacity = self.ahead * workers
        self._flight: dict[str, _InFlight] = {}
        self._sent = 0  # chunks sent so far: each in-flight chunk's place in the broker's order
        self._received: list[Event] = []
        self._setup_failed: str | None = None
        self._reply = f"bulkpool.reply.{uuid.uuid4().hex}"
        exchange = Exchange(self._reply, type="direct", durable=False)
        self._queue = Queue(
            self._reply, exchange, routing_key=self._reply, durable=False, expires=REPLY_EXPIRES
        )
        try:
            self._conn = self._app.connection_for_read()
            self._conn.ensure_connection(max_retries=3)
            self._consumer = Consumer(
                self._conn, [self._queue], callbacks=[self._on_reply], no_ack=True, accept=["json"]
            )
            self._consumer.consume()
        except Exception as error:
            raise WorkerStartupError(
                f"Cannot reach the Celery broker of {self._app.main or 'the app'} "
                f"({self._app.conf.broker_url}): {type(error).__name__}: {error}. Start it, or "
                "pass CeleryExecutor(app=...) with the right broker_url."
            ) from error

    def capacity(self) -> int:
        return self._capacity

    def submit(self, chunk: Chunk) -> None:
        payload = encode_chunk(chunk)
        key = uuid.uuid4().hex
        try:
            self._app.send_task(
                TASK_NAME, args=[self._job, payload, key, self._reply], queue=self.queue, task_id=key
            )
        except Exception as error:  # the engine stops sending, drains what is in flight, reports
            raise WorkerStartupError(
                f"Could not send a chunk to the Celery broker ({self._app.conf.broker_url}): "
                f"{type(error).__name__}: {error}"
            ) from error
        self._sent += 1
        self._flight[key] = _InFlight(chunk, time.monotonic(), self._sent)

    def events(self, timeout: float | None = None) -> list[Event]:
        deadline = time.monotonic() + (self.heartbeat if timeout is None else timeout)
        while True:
            wait = max(0.0, min(deadline - time.monotonic(), self.heartbeat))
            self._drain(wait)
            self._expire()
            if self._setup_failed is not None:
                raise WorkerStartupError("A celery worker failed in setup.", self._setup_failed)
            if self._received or time.monotonic() >= deadline:
                break
        received, self._received = self._received, []
        return received

    def stop(self, *, cancel: bool = False) -> None:
        if cancel and self._flight:
            self._revoke(list(self._flight))
        self._flight.clear()
        # Wake the consumer's pending read, which closing the connection waits for: on Redis
        # a BRPOP that takes up to a second (kombu's brpop_timeout) to come back.
        with contextlib.suppress(Exception), self._app.producer_or_acquire() as producer:
            producer.publish({"kind": "closing"}, exchange=self._reply, routing_key=self._reply, retry=False)
        with contextlib.suppress(Exception):
            self._queue.bind(self._conn.default_channel).delete()
        with contextlib.suppress(Exception):
            self._conn.release()

    # -- replies and leases ----------------------------------------------------------------

    def _drain(self, wait: float) -> None:
        """Read the replies that arrive within ``wait`` seconds, then those already there."""
        try:
            self._conn.drain_events(timeout=max(wait, 0.001))
            for _ in range(1000):
                self._conn.drain_events(timeout=0.001)
        except TimeoutError:
            pass
        except self._conn.connection_errors as error:  # the broker went away: wait for it
            logger.warning("Lost the Celery broker (%s); reconnecting", error)
            self._reconnect()

    def _reconnect(self) -> None:
        from kombu import Consumer

        with contextlib.suppress(Exception):
            self._conn.release()
        self._conn = self._app.connection_for_read()
        self._conn.ensure_connection(max_retries=None, interval_start=0.5, interval_max=2)
        self._consumer = Consumer(
            self._conn, [self._queue], callbacks=[self._on_reply], no_ack=True, accept=["json"]
        )
        self._consumer.consume()

    def _on_reply(self, body: dict[str, Any], message: Any) -> None:
        kind = body.get("kind")
        if kind == "setup_failed":
            self._setup_failed = body.get("traceback", "")
            return
        flight = self._flight.get(body.get("key", ""))
        if flight is None:  # a key declared lost, or another run's: never reported twice
            return
        flight.seen = time.monotonic()
        if kind == "started":
            flight.starts += 1
            for earlier in self._flight.values():  # sent before this one, not started yet
                if earlier.order < flight.order and not earlier.starts and earlier.overtaken is None:
                    earlier.overtaken = flight.seen
            flight.host = f"{body.get('host')} pid {body.get('pid')}"
            if flight.starts > MAX_STARTS:
                self._lose(
                    body["key"],
                    f"the chunk was started {flight.starts - 1} times on celery workers without "
                    "finishing (it kills them?)",
                )
        elif kind == "crashed":
            self._lose(
                body["key"],
                f"the celery worker running it crashed outside any item: {body.get('error')}",
                traceback=body.get("traceback", ""),
            )
        elif kind == "refused":
            self._lose(
                body["key"],
                f"the chunk was started {int(body.get('starts', 0)) - 1} times on celery workers "
                "without finishing (it kills them?)",
            )
        elif kind == "done":
            del self._flight[body["key"]]
            self._received.append(ChunkDone(flight.chunk, JSON.decode(body["result"])))

    def _expire(self) -> None:
        now = time.monotonic()
        for key, flight in list(self._flight.items()):
            if flight.starts and now - flight.seen > self.lease:
                self._lose(
                    key, f"the celery worker running it ({flight.host}) went silent for {self.lease:g}s"
                )
            elif not flight.starts and flight.overtaken is not None and now - flight.overtaken > self.lease:
                self._lose(
                    key,
                    f"chunks sent after it started {self.lease:g}s ago and it did not: a celery node "
                    "that died had taken it",
                    started=False,
                )

    def withdraw(self) -> None:
        """Revoke the chunks still queued in the broker, so a stopping run does not wait for
        them. One a worker starts all the same commits with its journal record: a resume
        skips it."""
        waiting = [key for key, flight in self._flight.items() if not flight.starts]
        if waiting:
            self._revoke(waiting)
        for key in waiting:
            flight = self._flight.pop(key)
            self._received.append(ChunkLost(flight.chunk, "withdrawn: the run is stopping", started=False))

    def _lose(self, key: str, reason: str, *, started: bool = True, traceback: str = "") -> None:
        flight = self._flight.pop(key)
        self._revoke([key])
        lost = ChunkLost(flight.chunk, reason, in_doubt=started, traceback=traceback, started=started)
        self._received.append(lost)

    def _revoke(self, keys: list[str]) -> None:
        try:
            self._app.control.revoke(keys)
        except Exception as error:  # a revoked chunk that runs all the same meets its journal record
            logger.warning("Could not revoke %s celery tasks: %s", len(keys), error)


@dataclass
class _InFlight:
    chunk: Chunk
    seen: float  # when the chunk was sent, or last heard of
    order: int  # sent n-th: the broker hands chunks out in this order
    starts: int = 0
    host: str = ""
    overtaken: float | None = None  # when a chunk sent after it started, while it had not


def _current_app() -> Any:
    from celery import current_app

    return current_app._get_current_object()


# -- what travels: references and JSON ---------------------------------------------------------


def encode_chunk(chunk: Chunk) -> str:
    """The chunk as JSON text; an item JSON cannot carry is refused, named, before it is sent."""
    try:
        return JSON.encode(chunk).decode()
    except (TypeError, ValueError):
        for index, item in chunk.indexed():
            try:
                JSON.check_value(item)
            except (TypeError, ValueError) as error:
                raise ConfigurationError(
                    f"Item {index} ({item!r:.200}) cannot be sent to celery workers: {error}. Items "
                    "travel as JSON (with dates, times, decimals, UUIDs and bytes): pass plain "
                    "values, e.g. primary keys or dicts, and load objects in func."
                ) from error
        raise


def job_of(task: Task, *, heartbeat: float) -> dict[str, Any]:
    """What a celery worker needs to rebuild ``task``, as plain data; refuses what cannot travel."""
    from bulkpool.querysets import LoadRows

    load = None
    if task.load is not None:
        if not isinstance(task.load, LoadRows):
            raise ConfigurationError(f"The celery backend cannot send this loader: {task.load!r}.")
        load = _loader_of(task.load)
    job = {
        "func": reference(task.func, "func"),
        "setup": None if task.setup is None else reference(task.setup, "setup"),
        "prepare": None if task.prepare is None else reference(task.prepare, "prepare"),
        "atomic": task.atomic,
        "database": task.database,
        "retries": task.retries,
        "keep_values": task.keep_values,
        "dry_run": task.dry_run,
        "journal": None if task.journal is None else dataclasses.asdict(task.journal),
        "load": load,
        "heartbeat": heartbeat,
    }
    try:
        JSON.encode(job)
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"The arguments of func or setup cannot be sent to celery workers as JSON: {error}. "
            "Give functools.partial plain arguments (numbers, strings, lists, dicts, dates...)."
        ) from error
    return job


def reference(obj: Any, what: str) -> dict[str, Any]:
    """``obj`` (a function, a partial of one, or a dataclass instance such as bulkpool's
    per-row operations) as data a worker can import it back from."""
    if isinstance(obj, functools.partial):
        return {"partial": reference(obj.func, what), "args": list(obj.args), "keywords": dict(obj.keywords)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {}
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            is_callable = callable(value) and not isinstance(value, type)
            fields[field.name] = {"ref": reference(value, what)} if is_callable else {"value": value}
        return {"dataclass": _path(type(obj), what), "fields": fields}
    return {"path": _path(obj, what)}


def _path(obj: Any, what: str) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    fix = (
        f"Celery workers import {what} by its dotted path, so it must be a function defined at "
        "the top level of an importable module (a functools.partial of one, with JSON arguments, "
        "works too)."
    )
    if not module or not qualname:
        raise ConfigurationError(f"{what}={obj!r} has no importable name. {fix}")
    if "<" in qualname:  # <lambda>, <locals>
        raise ConfigurationError(f"{what}={module}.{qualname} is a lambda or a closure. {fix}")
    if module == "__main__":
        raise ConfigurationError(
            f"{what}={qualname} is defined in __main__, which a celery worker cannot import. "
            f"Move it to a module of your project. {fix}"
        )
    try:
        found = _import(f"{module}:{qualname}")
    except Exception as error:
        raise ConfigurationError(
            f"{what}={module}.{qualname} cannot be imported back: {error}. {fix}"
        ) from error
    if found is not obj:  # a bound method, or a name rebound since
        raise ConfigurationError(f"{what}={obj!r} is not what {module}.{qualname} names. {fix}")
    return f"{module}:{qualname}"


def _import(path: str) -> Any:
    module, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module)
    for name in qualname.split("."):
        found = getattr(found, name)
    return found


def rebuild(ref: dict[str, Any]) -> Any:
    """The object ``reference()`` described."""
    if "partial" in ref:
        return functools.partial(rebuild(ref["partial"]), *ref["args"], **ref["keywords"])
    if "dataclass" in ref:
        fields = {
            name: rebuild(field["ref"]) if "ref" in field else field["value"]
            for name, field in ref["fields"].items()
        }
        return _import(ref["dataclass"])(**fields)
    return _import(ref["path"])


def _loader_of(load: Any) -> dict[str, Any]:
    """QuerySet input travels as its model's label: each chunk's rows are loaded by primary
    key with the base manager. Refused where that would not give the same objects."""
    import pickle

    query = pickle.loads(load.query)
    lookups = pickle.loads(load.prefetch)
    differs = [
        name
        for name, present in (
            ("annotate()", bool(query.annotations)),
            ("extra()", bool(query.extra)),
            ("select_related()", bool(query.select_related)),
            ("only() / defer()", query.deferred_loading != (frozenset(), True)),
            ("prefetch_related()", bool(lookups)),
            ("select_for_update()", bool(query.select_for_update)),
        )
        if present
    ]
    if differs:
        raise ConfigurationError(
            f"The celery backend sends a QuerySet as primary keys, and workers load the rows by "
            f"primary key with {load.model}'s base manager; this queryset uses {', '.join(differs)}, "
            "which would be lost. Drop it (do that work in func), or run over a plain queryset."
        )
    return {"model": load.model, "database": load.database, "missing_ok": load.missing_ok}


# -- the worker's side (called by bulkpool.tasks.run_chunk) -----------------------------------

_workers: dict[str, Worker] = {}
_lock = threading.Lock()
IDLE_CLOSE = 10.0  # seconds without a chunk after which a runner closes its database connections


def run_here(app: Any, job: str, payload: str, key: str, reply: str) -> None:
    """Run one chunk in this celery worker process and send its result to the caller's reply queue."""
    send = functools.partial(_send, app, reply, key)
    runner = _runner()
    try:
        worker, heartbeat = runner.call(_worker_for, job)
    except Exception:
        send("setup_failed", traceback=traceback.format_exc())
        raise
    try:
        result = runner.call(_run_chunk, worker, heartbeat, JSON.decode(payload), send)
    except Exception as error:  # outside any item (the journal unreachable...): say so, never hang
        send("crashed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        raise
    if result is not None:
        send("done", result=JSON.encode(result).decode())


def _run_chunk(worker: Worker, heartbeat: float, chunk: Chunk, send: Callable[..., None]) -> Any:
    """Count the start, then run the chunk (None: refused, it kept killing its workers)."""
    journal = worker.task.journal
    if journal is not None:
        starts = count_start(journal, worker.task.database, chunk)
        if starts > MAX_STARTS:  # it killed the workers that took it: end the redeliveries
            logger.warning(
                "Refusing items %s..%s of a bulkpool run: started %s times without finishing.",
                chunk.start,
                chunk.end - 1,
                starts - 1,
            )
            send("refused", starts=starts)
            return None
    send("started", host=socket.gethostname(), pid=os.getpid())
    with _beating(send, heartbeat):
        return worker.run(chunk)


def _worker_for(job: str) -> tuple[Worker, float]:
    from bulkpool.work import Worker

    with _lock:
        found = _workers.get(job)
        if found is None:
            data = JSON.decode(job)
            found = Worker(_task_of(data))
            found.start()
            while len(_workers) >= WORKERS_CACHED:
                _workers.pop(next(iter(_workers))).close()
            _workers[job] = found
        return found, float(JSON.decode(job)["heartbeat"])


class _Runner(threading.Thread):
    """The thread that does bulkpool's work for one task thread of a celery worker.

    Celery's Django fixup closes the task thread's database connections before and after
    every task, so a chunk run there opens a new connection (about 20 ms on PostgreSQL
    here, a sixth of a chunk of 100 saves). Run here, the work keeps its connections from
    chunk to chunk, as a process worker does; they close after ``IDLE_CLOSE`` seconds
    without a chunk, so an idle celery worker holds none. ``setup`` and ``func`` always
    run on this one thread.
    """

    def __init__(self) -> None:
        super().__init__(name="bulkpool-runner", daemon=True)
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]
        self._calls = queue.SimpleQueue()

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        future: Future[Any] = Future()
        self._calls.put((future, func, args))
        return future.result()

    def run(self) -> None:
        from django.db import connections

        while True:
            try:
                future, func, args = self._calls.get(timeout=IDLE_CLOSE)
            except queue.Empty:
                connections.close_all()
                continue
            try:
                future.set_result(func(*args))
            except BaseException as error:  # the task thread re-raises it
                future.set_exception(error)


_runners: dict[int, _Runner] = {}
_runners_lock = threading.Lock()


def _runner() -> _Runner:
    """This task thread's runner (one per thread: prefork has one, a thread pool several)."""
    with _runners_lock:
        found = _runners.get(threading.get_ident())
        if found is None or not found.is_alive():
            found = _runners[threading.get_ident()] = _Runner()
            found.start()
        return found


def _task_of(data: dict[str, Any]) -> Task:
    from bulkpool.querysets import LoadRows

    load = None
    if data["load"] is not None:
        import pickle

        from django.apps import apps

        spec = data["load"]
        model = apps.get_model(spec["model"])
        load = LoadRows(
            spec["model"],
            pickle.dumps(model._base_manager.all().query),
            pickle.dumps(()),
            spec["database"],
            spec["missing_ok"],
        )
    return Task(
        func=rebuild(data["func"]),
        setup=None if data["setup"] is None else rebuild(data["setup"]),
        prepare=None if data["prepare"] is None else rebuild(data["prepare"]),
        atomic=data["atomic"],
        database=data["database"],
        retries=data["retries"],
        keep_values=data["keep_values"],
        own_connections=True,
        load=load,
        journal=None if data["journal"] is None else JournalRef(**data["journal"]),
        dry_run=data["dry_run"],
        check_value=JSON.check_value,
    )


def _send(app: Any, reply: str, key: str, kind: str, **fields: Any) -> None:
    with app.producer_or_acquire() as producer:
        producer.publish(
            {"kind": kind, "key": key, **fields},
            exchange=reply,
            routing_key=reply,
            serializer="json",
            retry=True,
            retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        )


@contextlib.contextmanager
def _beating(send: Callable[..., None], every: float) -> Iterator[None]:
    """A heartbeat every ``every`` seconds while the chunk runs: the caller's lease on it."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            try:
                send("beat")
            except Exception as error:  # the caller's lease expires and it sends the chunk again
                logger.warning("Could not send a heartbeat: %s", error)

    thread = threading.Thread(target=beat, name="bulkpool-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
