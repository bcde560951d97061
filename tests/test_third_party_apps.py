"""Real third-party apps whose signal receivers write rows: django-simple-history, django-auditlog.

Their receivers run in every worker, because workers set Django up as the caller does (the
apps register them when Django starts), and what they write is part of the item's own
work: an item that fails leaves no historical row and no log entry behind.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from auditlog.models import LogEntry

import bulkpool
from tests.params import EXECUTORS
from tests.thirdparty.models import Customer

RUN: dict[str, Any] = {"workers": 2, "chunk_size": 4, "progress": False}
FAILING = 7


def create_customer_then_fail_on_7(number: int) -> int:
    """Everything is written, history and log entry included, before item 7 fails."""
    customer = Customer.objects.create(name=f"customer-{number}")
    if number == FAILING:
        raise ValueError("customer 7 is refused after its save")
    return customer.pk


def log_entries(action: int) -> Counter[str]:
    """Object pk -> number of auditlog entries with that action."""
    entries = LogEntry.objects.get_for_model(Customer).filter(action=action)
    return Counter(entries.values_list("object_pk", flat=True))


def history_pks(history_type: str) -> list[int]:
    return sorted(Customer.history.filter(history_type=history_type).values_list("id", flat=True))


@pytest.mark.parametrize("backend", EXECUTORS)
def test_a_failing_item_leaves_no_history_or_log_entry(backend):
    report = bulkpool.run(create_customer_then_fail_on_7, range(20), backend=backend, **RUN)

    assert [failure.index for failure in report.failures] == [FAILING]
    names = set(Customer.objects.values_list("name", flat=True))
    assert names == {f"customer-{n}" for n in range(20) if n != FAILING}
    pks = sorted(Customer.objects.values_list("pk", flat=True))
    assert history_pks("+") == pks  # one historical row per customer, none for item 7
    assert log_entries(LogEntry.Action.CREATE) == {str(pk): 1 for pk in pks}
    assert not Customer.history.filter(name=f"customer-{FAILING}").exists()


@pytest.mark.parametrize("backend", EXECUTORS)
def test_create_is_recorded_by_both_apps(backend):
    rows: list[dict[str, Any]] = [{"name": f"c{n}", "email": f"c{n}@example.com"} for n in range(12)]
    rows[5]["email"] = "not an email"  # that row alone fails full_clean()

    report = bulkpool.create(Customer, rows, validate=True, backend=backend, **RUN)

    assert [(failure.index, failure.exc_type) for failure in report.failures] == [
        (5, "django.core.exceptions.ValidationError")
    ]
    assert report.results is not None
    created = [pk for index, pk in enumerate(report.results) if index != 5]
    assert sorted(created) == sorted(Customer.objects.values_list("pk", flat=True))
    assert history_pks("+") == sorted(created)
    assert log_entries(LogEntry.Action.CREATE) == {str(pk): 1 for pk in created}


@pytest.mark.parametrize("backend", EXECUTORS)
def test_update_is_recorded_with_its_changes(backend):
    customers = [Customer.objects.create(name=f"c{n}", email=f"c{n}@example.com") for n in range(10)]
    changed = Customer.objects.filter(name__in=[f"c{n}" for n in range(0, 10, 2)])

    report = bulkpool.update(changed, values={"email": "new@example.com"}, backend=backend, **RUN)

    assert (report.ok, report.failed) == (5, 0)
    expected = sorted(c.pk for c in customers[::2])
    assert history_pks("~") == expected
    assert (
        sorted(Customer.history.filter(history_type="~").values_list("email", flat=True))
        == ["new@example.com"] * 5
    )
    updates = LogEntry.objects.get_for_model(Customer).filter(action=LogEntry.Action.UPDATE)
    assert sorted(int(entry.object_pk) for entry in updates) == expected
    for entry in updates:
        old, new = entry.changes_dict["email"]
        assert (old.endswith("@example.com"), new) == (True, "new@example.com")


@pytest.mark.parametrize("backend", EXECUTORS)
def test_delete_is_recorded_by_both_apps(backend):
    customers = [Customer.objects.create(name=f"c{n}") for n in range(9)]
    doomed = sorted(c.pk for c in customers if c.pk % 3)

    report = bulkpool.delete(Customer.objects.filter(pk__in=doomed), backend=backend, **RUN)

    assert (report.ok, report.failed) == (len(doomed), 0)
    assert sorted(Customer.objects.values_list("pk", flat=True)) == sorted(
        c.pk for c in customers if c.pk not in doomed
    )
    assert history_pks("-") == doomed
    assert log_entries(LogEntry.Action.DELETE) == {str(pk): 1 for pk in doomed}
