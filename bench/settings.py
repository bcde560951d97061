"""The benchmark's Django project: auth's User, this app, and one database from DATABASE_URL."""

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
