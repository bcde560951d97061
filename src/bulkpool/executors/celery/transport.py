"""The Celery transport: chunks out as tasks, replies back on a queue of the caller's own.

    caller (CeleryTransport)                                 a celery worker
    open()     declares the reply queue on the app's broker
    send()     --send_task(TASK_NAME, [job, chunk, key, reply], queue) -->  the task runs
    drain()    <--{"kind": ..., "key": key, ...}--------------------------  publish_reply()
               each reply to ``on_reply``; a lost broker is reconnected
    revoke()   --control.revoke(keys)-->  (a best effort: the journal catches the rest)
    close()    deletes the reply queue

Results come back on the reply queue, not through a result backend: it works with or
without one, on Redis and RabbitMQ alike. The reply queue expires on RabbitMQ when the
caller has gone for ``REPLY_EXPIRES`` seconds; on Redis it is deleted by ``close()`` (a
caller killed with SIGKILL leaves a small list behind). kombu is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

from bulkpool.errors import WorkerStartupError

logger = logging.getLogger("bulkpool")

TASK_NAME = "bulkpool.run_chunk"
REPLY_EXPIRES = 3600  # seconds a reply queue outlives its caller (RabbitMQ)


class CeleryTransport:
    """The caller's connection to ``app``'s broker: sends to ``queue``, reads its own reply queue."""

    def __init__(self, app: Any, queue: str | None, on_reply: Callable[[dict[str, Any]], None]) -> None:
        from kombu import Exchange, Queue

        self.app = app
        self.queue = queue
        self._on_reply = on_reply
        self.reply = f"bulkpool.reply.{uuid.uuid4().hex}"
        exchange = Exchange(self.reply, type="direct", durable=False)
        self._replies = Queue(
            self.reply, exchange, routing_key=self.reply, durable=False, expires=REPLY_EXPIRES
        )

    def open(self) -> None:
        try:
            self._connect(max_retries=3)
        except Exception as error:
            raise WorkerStartupError(
                f"Cannot reach the Celery broker of {self.app.main or 'the app'} "
                f"({self.app.conf.broker_url}): {type(error).__name__}: {error}. Start it, or "
                "pass CeleryExecutor(app=...) with the right broker_url."
            ) from error

    def _connect(self, **retry: Any) -> None:
        from kombu import Consumer

        self._conn = self.app.connection_for_read()
        self._conn.ensure_connection(**retry)
        self._consumer = Consumer(
            self._conn, [self._replies], callbacks=[self._reply], no_ack=True, accept=["json"]
        )
        self._consumer.consume()

    def _reply(self, body: dict[str, Any], message: Any) -> None:
        self._on_reply(body)

    @property
    def queue_name(self) -> str:
        """The queue chunks go to: ``queue``, or where the app routes the task (``task_routes``,
        else ``task_default_queue``)."""
        if self.queue is not None:
            return self.queue
        try:
            return str(self.app.amqp.router.route({}, TASK_NAME)["queue"].name)
        except Exception:  # an app routing in a way of its own: say its default
            return str(self.app.conf.task_default_queue)

    @property
    def broker(self) -> str:
        """The broker's URL, its password masked."""
        try:
            return str(self.app.connection_for_read().as_uri())
        except Exception:
            return "the app's broker"

    def send(self, job: str, payload: str, key: str) -> None:
        try:
            self.app.send_task(TASK_NAME, args=[job, payload, key, self.reply], queue=self.queue, task_id=key)
        except Exception as error:  # the engine stops sending, drains what is in flight, reports
            raise WorkerStartupError(
                f"Could not send a chunk to the Celery broker ({self.app.conf.broker_url}): "
                f"{type(error).__name__}: {error}"
            ) from error

    def drain(self, wait: float) -> None:
        """Hand on the replies that arrive within ``wait`` seconds, then those already there."""
        try:
            self._conn.drain_events(timeout=max(wait, 0.001))
            for _ in range(1000):
                self._conn.drain_events(timeout=0.001)
        except TimeoutError:
            pass
        except self._conn.connection_errors as error:  # the broker went away: wait for it
            logger.warning("Lost the Celery broker (%s); reconnecting", error)
            with contextlib.suppress(Exception):
                self._conn.release()
            self._connect(max_retries=None, interval_start=0.5, interval_max=2)

    def revoke(self, keys: list[str]) -> None:
        try:
            self.app.control.revoke(keys)
        except Exception as error:  # a revoked chunk that runs all the same meets its journal record
            logger.warning("Could not revoke %s celery tasks: %s", len(keys), error)

    def close(self) -> None:
        # Wake the consumer's pending read, which closing the connection waits for: on Redis
        # a BRPOP that takes up to a second (kombu's brpop_timeout) to come back.
        with contextlib.suppress(Exception), self.app.producer_or_acquire() as producer:
            producer.publish({"kind": "closing"}, exchange=self.reply, routing_key=self.reply, retry=False)
        with contextlib.suppress(Exception):
            self._replies.bind(self._conn.default_channel).delete()
        with contextlib.suppress(Exception):
            self._conn.release()


def publish_reply(app: Any, reply: str, key: str, kind: str, **fields: Any) -> None:
    """The worker's side: one message about chunk ``key`` to the caller's reply queue."""
    with app.producer_or_acquire() as producer:
        producer.publish(
            {"kind": kind, "key": key, **fields},
            exchange=reply,
            routing_key=reply,
            serializer="json",
            retry=True,
            retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
        )
