"""Django settings for the test project.

The database comes from ``DATABASE_URL`` (parsed by dj-database-url), for example::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
    DATABASE_URL=mysql://root@127.0.0.1:3306/test

Without it, a SQLite file next to this project is used. Worker processes import this
module too, so everything here must come out the same in every process: no random names,
no per-process paths.

Test databases are named after the checkout (``test_test_1f2e3d4c``): two checkouts
testing against one server at once (a developer's tree and a CI clone) would otherwise
drop and recreate each other's ``test_test`` mid-run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

DEFAULT_SQLITE_PATH = BASE_DIR / "bulkpool-test.sqlite3"

CHECKOUT_ID = hashlib.sha1(str(BASE_DIR).encode()).hexdigest()[:8]


def _test_sqlite_path(name: str) -> str:
    """Where the SQLite *test* database lives: always a file.

    Django's default test database for SQLite is in memory, and an in-memory database
    cannot be shared with worker processes; a file can.
    """
    path = Path(name) if name and name != ":memory:" else DEFAULT_SQLITE_PATH
    return str(path.with_name(f"{path.stem}-test{path.suffix or '.sqlite3'}"))


def _database(url: str) -> dict[str, Any]:
    database: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=0))
    engine = database["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        database["TEST"] = {"NAME": _test_sqlite_path(database["NAME"])}
        return database
    database["TEST"] = {"NAME": f"test_{database['NAME']}_{CHECKOUT_ID}"}
    if engine == "django.db.backends.mysql":
        database.setdefault("OPTIONS", {}).update(
            charset="utf8mb4",
            # Strict mode turns silent truncation into an error, as on the other databases.
            init_command="SET sql_mode='STRICT_TRANS_TABLES'",
        )
        database["TEST"].update(CHARSET="utf8mb4", COLLATION="utf8mb4_unicode_ci")
    return database


DATABASES = {
    "default": _database(os.environ.get("DATABASE_URL") or f"sqlite:///{DEFAULT_SQLITE_PATH}"),
}

# Only for the test that checks an in-memory SQLite database is refused to concurrent workers.
DATABASES["memory"] = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "bulkpool",
    "tests.testapp",
    # Third-party apps whose signal receivers write rows, as real projects have them.
    "simple_history",
    "auditlog",
    "tests.thirdparty",
]

# Django's Tasks framework (the tasks backend): django.tasks on Django 6.0+, else the
# django-tasks backport, which is an app. django-tasks-db, where it is installed (Django
# 5.2+), for the real-worker tests (tests/faults/test_tasks.py).
if importlib.util.find_spec("django.tasks") is None and importlib.util.find_spec("django_tasks"):
    INSTALLED_APPS.append("django_tasks")
_TASKS_ROOT = "django.tasks" if importlib.util.find_spec("django.tasks") else "django_tasks"
TASKS: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": f"{_TASKS_ROOT}.backends.immediate.ImmediateBackend"},
    "dummy": {"BACKEND": f"{_TASKS_ROOT}.backends.dummy.DummyBackend"},
    "recording": {"BACKEND": "tests.tasks_backends.Recording"},
    "threaded": {"BACKEND": "tests.tasks_backends.Threaded"},
}
if importlib.util.find_spec("django_tasks_db") is not None:
    INSTALLED_APPS.append("django_tasks_db")
    TASKS["database"] = {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}  # any queue

# django-tasks-rq (the backport's: Django 5.2 and before) on Redis, where it is installed. A
# queue per checkout and database: scripts/test runs every database's slow tests at once.
RQ_QUEUE = f"bulkpool-tests-{CHECKOUT_ID}-{DATABASES['default']['ENGINE'].rsplit('.', 1)[-1]}"
if importlib.util.find_spec("django_tasks_rq") is not None and _TASKS_ROOT == "django_tasks":
    INSTALLED_APPS += ["django_rq", "django_tasks_rq"]
    RQ_QUEUES = {RQ_QUEUE: {"URL": os.environ.get("BULKPOOL_TASKS_REDIS", "redis://127.0.0.1:6379/3")}}
    TASKS["rq"] = {"BACKEND": "django_tasks_rq.RQBackend", "QUEUES": [RQ_QUEUE]}

# The admin, for the journal's pages (tests/test_admin.py and the browser test).
ROOT_URLCONF = "tests.urls"
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "static/"

SECRET_KEY = "django-bulkpool-tests-not-secret"  # a test-only key
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Quiet: only warnings and errors reach stderr; pytest's caplog still sees everything.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "level": "WARNING"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
