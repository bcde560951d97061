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


# -- func's signature, checked before item one (issue 15, point 7) -------------------------


def import_with_extra(row, category):
    Marker.objects.create(key=str(row), value=0)


def import_one(row):
    Marker.objects.create(key=str(row), value=0)


def takes_nothing():
    return None


def needs_a_keyword(row, *, category):
    return None


def make_state():
    return "state"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("func", "options", "message"),
    [
        (
            import_with_extra,
            {},
            r"import_with_extra\(row, category\) takes 2 arguments but bulkpool calls it with 1 "
            r"\(the item\): pass setup=.*, or use functools.partial",
        ),
        (
            import_one,
            {"setup": make_state},
            r"import_one\(row\) takes 1 argument but bulkpool calls it with 2 \(the item, and the "
            r"state setup= returned\): give it a parameter for the state",
        ),
        (takes_nothing, {}, r"takes_nothing\(\) takes 0 arguments but bulkpool calls it with 1"),
        (needs_a_keyword, {}, r"needs_a_keyword\(row, \*, category\) cannot be called as .*category"),
        (import_one, {"prepare": import_with_extra}, r"prepare: import_with_extra\(row, category\) takes 2"),
    ],
)
def test_a_function_that_cannot_take_the_call_is_refused_before_item_one(func, options, message):
    """func (and prepare) are checked against the call they will get: a ConfigurationError that
    says what is wrong and how to fix it, and nothing runs."""
    with pytest.raises(ConfigurationError, match=message):
        bulkpool.run(func, range(300), backend="serial", **options)
    assert not Marker.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_update_checks_the_users_func_not_its_own():
    """update(func=...) checks the user's function, which gets the object (and the state)."""
    Author.objects.create(name="a")
    with pytest.raises(ConfigurationError, match=r"update's func: import_with_extra\(row, category\)"):
        bulkpool.update(Author.objects.all(), func=import_with_extra, backend="serial")
    report = bulkpool.update(Author.objects.all(), func=import_one, backend="serial")
    assert (report.ok, report.failed) == (1, 0)
    report = bulkpool.create(Author, [{"name": "b"}], backend="serial")  # its own callable passes
    assert (report.ok, report.failed) == (1, 0)


@pytest.mark.django_db(transaction=True)
def test_callables_whose_signature_cannot_be_read_are_let_through():
    """A builtin without a readable signature is not refused (its errors come per item)."""
    import functools

    report = bulkpool.run(max, [[1, 2]], backend="serial")  # inspect.signature(max) raises
    assert report.ok == 1
    partial = functools.partial(import_with_extra, category="x")
    assert bulkpool.run(partial, range(2), backend="serial").ok == 2
    assert bulkpool.run(lambda *args: None, range(2), backend="serial", setup=make_state).ok == 2


# -- failures in input order (issue 15, point 9) -------------------------------------------


def test_failures_are_kept_and_listed_in_input_order_whatever_order_they_came_in(monkeypatch):
    """Chunks finish in any order: the report keeps and prints the first failures by index."""
    from bulkpool import outcomes

    monkeypatch.setattr(outcomes, "KEPT_FAILURES", 4)
    report = outcomes.Report()
    for index in [7, 2, 9, 0, 5, 1]:
        report.add_failure(outcomes.Failure(index, f"row{index}", "ValueError", "no", ""))
    assert [failure.index for failure in report.failures] == [0, 1, 2, 5]
    assert report.failures_left_out == 2
    listed = [line.split()[2] for line in str(report).splitlines() if line.startswith("  - item")]
    assert listed == ["0", "1", "2", "5"]
