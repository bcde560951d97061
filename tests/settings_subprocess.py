"""The test settings, on the test database a test names: for commands a fault test runs in a
subprocess (``BULKPOOL_FAULTS_DB_NAME``, as tests/faults/driver.py reads it)."""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

DATABASES["default"]["NAME"] = os.environ["BULKPOOL_FAULTS_DB_NAME"]
