"""The benchmark's Django project: auth's User, this app, and one database from DATABASE_URL."""

import importlib.util

import dj_database_url

SECRET_KEY = "bench-only-not-secret"
DEBUG = False  # DEBUG=True would keep every query in memory and skew the RSS column
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "bulkpool",  # the journal, which the celery method needs; its task, for the celery worker
    "bench.apps.BenchConfig",
]

DATABASES = {"default": dj_database_url.config(default="sqlite:///bench.sqlite3")}

# bench/tasks_bench.py: django-tasks-db's queue in the same database, where it is installed
# (on Django 5.2 with the django-tasks backport, which is an app too).
if importlib.util.find_spec("django_tasks_db") is not None:
    if importlib.util.find_spec("django.tasks") is None:
        INSTALLED_APPS.append("django_tasks")
    INSTALLED_APPS.append("django_tasks_db")
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": []}}
