"""Functions the command tests run by dotted path (``bulkpool run tests.command_jobs.NAME``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tests.testapp.models import Marker


def write_row(item: Any) -> None:
    """Write one Marker per item: ``key`` is the item's "key" (a dict) or the item itself."""
    key = item["key"] if isinstance(item, dict) else item
    Marker.objects.create(key=str(key), value=0)


def write_row_unless_bad(item: dict[str, Any]) -> None:
    """Like ``write_row``, then fail for rows marked bad (the write rolls back with the item)."""
    write_row(item)
    if item.get("bad") in (True, "yes"):
        raise ValueError(f"row {item['key']} is marked bad")


def setup_state() -> str:
    return "ready"


def write_row_with_state(item: dict[str, Any], state: str) -> None:
    """Write a Marker whose key records the state ``setup_state`` gave the worker."""
    Marker.objects.create(key=f"{state}:{item['key']}", value=0)


def record_debug_logging(item: Any) -> None:
    """Write a Marker saying whether the "bulkpool" logger is at DEBUG while the item runs."""
    enabled = logging.getLogger("bulkpool").isEnabledFor(logging.DEBUG)
    Marker.objects.create(key=f"debug:{enabled}", value=0)


def fail_odd(item: int) -> int:
    """Fail for odd numbers; touches no database."""
    if item % 2:
        raise ValueError(f"{item} is odd")
    return item


def nap_and_flag(item: dict[str, Any]) -> None:
    """Touch the file named by the item's "flag" (the run is under way), then nap; no database."""
    Path(item["flag"]).touch()
    time.sleep(0.05)


NOT_A_FUNCTION = 42


def press_ctrl_c_at_first_item(item: Any) -> None:
    """Write the row, then send this process SIGINT (Ctrl-C) once, at the first item."""
    import os
    import signal

    write_row(item)
    if Marker.objects.count() == 1:
        os.kill(os.getpid(), signal.SIGINT)


def slow_write_row(item: Any) -> None:
    """``write_row``, taking 10 ms: a run long enough to interrupt by hand."""
    time.sleep(0.01)
    write_row(item)


def prepare_row(item: dict[str, Any]) -> dict[str, Any]:
    """--prepare: the row with its key marked as prepared."""
    return {**item, "key": f"prepared:{item['key']}"}


def write_row_unless_bad_slowly(item: dict[str, Any]) -> None:
    """``write_row_unless_bad``, taking 10 ms: a run long enough to interrupt."""
    time.sleep(0.01)
    write_row_unless_bad(item)
