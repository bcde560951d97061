"""Parameters shared by test modules."""

from __future__ import annotations

import pytest

# Workers other than serial use their own connections, so they need committed rows.
EXECUTORS = [
    pytest.param("serial", marks=pytest.mark.django_db),
    pytest.param("thread", marks=pytest.mark.django_db(transaction=True)),
    pytest.param("process", marks=pytest.mark.django_db(transaction=True)),
]
