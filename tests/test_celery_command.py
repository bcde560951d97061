"""``bulkpool run --backend celery --queue NAME``, without a broker: what the command hands on."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

import bulkpool
from bulkpool.management import running
from bulkpool.management.commands import bulkpool as command


def test_queue_without_the_celery_backend_is_a_usage_error(tmp_path):
    """--queue names a Celery queue: without --backend celery it is refused, saying so."""
    items = tmp_path / "items.jsonl"
    items.write_text("1\n", encoding="utf-8")
    with pytest.raises(CommandError, match="pass --backend celery too") as refused:
        call_command(
            "bulkpool",
            "run",
            "tests.celery_jobs.marker_of_prepared",
            "--input",
            str(items),
            "--queue",
            "bulk",
        )
    assert refused.value.returncode == 2


def test_the_queue_reaches_the_celery_executor(tmp_path, monkeypatch):
    """--backend celery --queue bulk: the run gets a CeleryExecutor sending to "bulk"."""
    items = tmp_path / "items.jsonl"
    items.write_text("1\n", encoding="utf-8")
    seen: dict[str, Any] = {}

    def build_engine(func: Any, source: Any, given: dict[str, Any], **kwargs: Any) -> Any:
        seen.update(given)
        raise bulkpool.ConfigurationError("stop here")

    monkeypatch.setattr(running, "build_engine", build_engine)  # where run and upsert start
    with pytest.raises(CommandError, match="stop here"):
        call_command(
            "bulkpool", "run", "tests.celery_jobs.marker_of_prepared", "--input", str(items),
            "--backend", "celery", "--queue", "bulk",
        )  # fmt: skip
    assert isinstance(seen["backend"], bulkpool.CeleryExecutor)
    assert seen["backend"].queue == "bulk"


def test_the_resume_hint_keeps_the_queue():
    """The command that resumes sends to the same queue."""
    options = {"func": "f.g", "input": "items.jsonl", "format": None, "backend": "celery", "queue": "bulk"}
    assert command._command_line(options).endswith("--backend celery --queue bulk")
