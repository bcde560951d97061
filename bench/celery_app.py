"""The bench project's Celery app: ``celery -A bench.celery_app worker`` runs the celery method's chunks.

The broker is ``BENCH_CELERY_BROKER`` (default: Redis on 127.0.0.1, database 14).
``BENCH_CELERY_CONN_MAX_AGE=60``: the workers keep their database connections between tasks.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/14")

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
if os.environ.get("BENCH_CELERY_CONN_MAX_AGE"):
    # Celery's Django fixup closes a connection after every task unless CONN_MAX_AGE keeps it.
    from django.conf import settings

    settings.DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["BENCH_CELERY_CONN_MAX_AGE"])
app = Celery("bench", set_as_current=False)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(broker_url=BROKER, worker_prefetch_multiplier=1, worker_hijack_root_logger=False)
app.autodiscover_tasks()
