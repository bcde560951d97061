"""The test project's Celery app, as a Django project lays it out (``proj/celery.py``).

    BULKPOOL_CELERY_BROKER=redis://127.0.0.1:6379/15 BULKPOOL_CELERY_DB_NAME=<database> \\
        celery -A tests.celery_app worker --pool prefork -c 2 -Q <queue>

The settings are the test project's (``DATABASE_URL`` picks the server); the database
*name* comes from ``BULKPOOL_CELERY_DB_NAME``, so a worker started by a test writes to that
test's database (``test_test_...``, or the SQLite test file), as ``tests/faults/driver.py``
does. The task is found by ``autodiscover_tasks()``: "bulkpool" is in INSTALLED_APPS.

``BULKPOOL_CELERY_TRANSPORT_OPTIONS`` (JSON) gives the broker's transport options to every
app made here, the workers' and the caller's alike: a test of Redis's redelivery sets a
visibility timeout of seconds, not an hour, under a key prefix of its own.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery import Celery

REDIS = "redis://127.0.0.1:6379/15"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


TRANSPORT_OPTIONS = "BULKPOOL_CELERY_TRANSPORT_OPTIONS"


def make_app(broker: str, transport_options: dict[str, Any] | None = None) -> Celery:
    """The app, with ``transport_options`` (default: ``BULKPOOL_CELERY_TRANSPORT_OPTIONS``)."""
    if transport_options is None:
        transport_options = json.loads(os.environ.get(TRANSPORT_OPTIONS) or "{}")
    app = Celery("bulkpool_tests", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(
        broker_url=broker,
        accept_content=["json"],
        task_serializer="json",
        worker_prefetch_multiplier=1,  # what bulkpool's docs advise: nothing waits behind a busy child
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options=transport_options,
    )
    app.autodiscover_tasks()
    return app


if "BULKPOOL_CELERY_BROKER" in os.environ:  # a worker: `celery -A tests.celery_app worker`
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    if os.environ.get("BULKPOOL_CELERY_DB_NAME"):
        settings.DATABASES["default"]["NAME"] = os.environ["BULKPOOL_CELERY_DB_NAME"]
    app = make_app(os.environ["BULKPOOL_CELERY_BROKER"])
