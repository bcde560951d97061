"""The serial executor inside a TestCase, the progress bar, options checking, the public names."""

from __future__ import annotations

import inspect

import pytest
from django.test import TestCase

import bulkpool
from bulkpool import ConfigurationError
from tests import jobs
from tests.testapp.models import AuditLog, Author, Marker


class SerialInsideTestCase(TestCase):
    """The serial executor runs in the caller's thread and transaction."""

    def test_sees_and_writes_the_callers_uncommitted_rows(self):
        """Rows written before the call (uncommitted) are visible; failures roll back alone."""
        Marker.objects.create(key="before", value=-1)
        report = bulkpool.run(jobs.fail_multiples_of_7, range(20), backend="serial", chunk_size=6)
        self.assertEqual(report.failed, 3)
        self.assertEqual(Marker.objects.count(), 1 + 17)
        self.assertTrue(Marker.objects.filter(key="before").exists())

    def test_signals_fire_for_saves_made_by_func(self):
        """Per-object save() in func sends the model's signals (here: an AuditLog row each)."""
        bulkpool.run(lambda i: Author.objects.create(name=f"a{i}"), range(5), backend="serial")
        self.assertEqual(AuditLog.objects.filter(model="testapp.author", action="created").count(), 5)


@pytest.mark.django_db
def test_progress_bar_is_shown_when_asked_with_the_known_total(capsys):
    """progress=True draws a tqdm bar on stderr, with the total when len() is known."""
    bulkpool.run(jobs.identity, list(range(40)), backend="serial", progress=True)
    err = capsys.readouterr().err
    assert "40/40" in err


@pytest.mark.django_db
def test_progress_bar_is_silent_off_a_terminal_by_default(capsys):
    """progress=None shows nothing when stderr is not a terminal (as under pytest)."""
    bulkpool.run(jobs.identity, list(range(40)), backend="serial")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "gpu"}, "is not a backend"),
        ({"workers": 0}, 'workers=0: use "auto" \\(the default\\) or a whole number, 1 or more'),
        ({"chunk_size": "big"}, "chunk_size='big': use \"auto\""),
        ({"atomic": "row"}, "atomic='row'"),
        ({"on_error": "ignore"}, "on_error='ignore'"),
        ({"max_failures": -1}, "max_failures=-1"),
        ({"retries": -2}, "retries=-2"),
        ({"database": "nope"}, "database='nope' is not in settings.DATABASES"),
        ({"rejects": "/no/such/folder/rejects.jsonl"}, "does not exist"),
        ({"wokers": 2}, "Unknown option"),
    ],
)
def test_bad_options_are_refused_with_the_reason(options, message):
    """Every bad option is refused before any item runs, with a message that names it."""
    with pytest.raises(ConfigurationError, match=message):
        bulkpool.run(jobs.identity, range(3), **options)


@pytest.mark.parametrize(
    ("func", "items", "message"),
    [
        (jobs.identity, None, "items must be iterable .* not NoneType"),
        (jobs.identity, 42, "items must be iterable .* not int"),
        (3, range(3), "func must be callable, not int"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(func, items, message):
    with pytest.raises(ConfigurationError, match=message):
        bulkpool.run(func, items, backend="serial")


def test_public_names_match_all():
    """bulkpool's __all__ lists exactly the public names it exports, sorted."""
    public = {
        name
        for name, value in vars(bulkpool).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    } | set(bulkpool._LAZY)  # imported when first used (an optional dependency)
    assert sorted(bulkpool.__all__) == bulkpool.__all__
    assert public == set(bulkpool.__all__)


def test_errors_derive_from_bulkpool_error():
    """Every error bulkpool raises derives from BulkpoolError; misconfiguration from Django's too."""
    from django.core.exceptions import ImproperlyConfigured

    for name in (
        "ConfigurationError",
        "InputError",
        "InputFailed",
        "ItemFailed",
        "ResumeRefused",
        "RunAborted",
        "TooManyFailures",
        "WorkerStartupError",
        "WorkersLost",
        "CommitUnknown",
        "WorkerDied",
        "NotRun",
    ):
        assert issubclass(getattr(bulkpool, name), bulkpool.BulkpoolError)
    assert issubclass(ConfigurationError, ImproperlyConfigured)
    assert issubclass(bulkpool.ResumeRefused, ConfigurationError)
    # Ctrl-C stays a KeyboardInterrupt, so that `except Exception:` in a caller does not swallow it.
    assert issubclass(bulkpool.RunInterrupted, KeyboardInterrupt)
    assert not issubclass(bulkpool.RunInterrupted, Exception)


@pytest.mark.django_db(transaction=True)
def test_ctrl_c_in_the_serial_loop_stops_at_once_keeping_committed_chunks(caplog):
    """Ctrl-C during a serial run rolls back the chunk it hit, keeps earlier chunks, and raises
    RunInterrupted (a KeyboardInterrupt) with the report, which is also logged."""
    with pytest.raises(bulkpool.RunInterrupted) as interrupted:
        bulkpool.run(jobs.interrupt_at_25, range(100), backend="serial", chunk_size=10)
    assert isinstance(interrupted.value, KeyboardInterrupt)
    assert sorted(Marker.objects.values_list("value", flat=True)) == list(range(20))
    report = interrupted.value.report
    assert (report.ok, report.not_run, report.interrupted) == (20, 10, True)
    assert "20 ok" in caplog.text
    assert "pass run_id=" in caplog.text
