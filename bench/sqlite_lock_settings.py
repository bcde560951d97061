"""Settings for ``bench/sqlite_lock.py``: a SQLite file as a careful user sets it up.

WAL mode (set once on the file, which keeps it), ``BEGIN IMMEDIATE`` for Django's
transactions and a 60 s busy timeout. The path comes from the environment, so that worker
processes started by any method (fork, forkserver, spawn) open the same file.
"""

import os

from bench.settings import *  # noqa: F403
from bench.settings import INSTALLED_APPS as BENCH_APPS

# The bench app's receivers, plus the one that creates a profile row per user.
INSTALLED_APPS = [app for app in BENCH_APPS if app != "bench.apps.BenchConfig"] + [
    "bench.sqlite_lock.LockBenchConfig"
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["BENCH_SQLITE_PATH"],
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 60},
    }
}
