"""Module-level functions the tests run on workers (process workers import this module)."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from typing import Any

from django.db import connection

from tests.testapp.models import Marker


def write_marker(i: int) -> int:
    """Write one Marker row keyed by the item, and return the item."""
    Marker.objects.create(key=str(i), value=i)
    return i


def fail_multiples_of_7(i: int) -> int:
    """Write a Marker, then fail for multiples of 7 (after writing: the write must roll back)."""
    Marker.objects.create(key=str(i), value=i)
    if i % 7 == 0:
        raise ValueError(f"{i} is a multiple of 7")
    return i


def fail_multiples_of_7_while_flagged(flag_path: str, i: int) -> int:
    """As fail_multiples_of_7, while the file ``flag_path`` exists (remove it: "the fix")."""
    Marker.objects.create(key=str(i), value=i)
    if i % 7 == 0 and os.path.exists(flag_path):
        raise ValueError(f"{i} is a multiple of 7")
    return i


def worker_identity() -> str:
    """A name for the worker this runs in: process id and thread id."""
    return f"{os.getpid()}:{threading.get_ident()}"


def setup_records_worker() -> str:
    """Per-worker setup: write one 'setup' row naming this worker, and return the name."""
    name = worker_identity()
    Marker.objects.create(key=f"setup:{name}", value=0)
    return name


def write_marker_with_state(i: int, state: str) -> int:
    """Write a Marker recording which worker's setup state the item saw."""
    Marker.objects.create(key=str(i), value=i)
    assert state == worker_identity(), f"state {state!r} came from another worker"
    Marker.objects.create(key=f"state:{state}", value=i)
    return i


def failing_setup() -> None:
    raise RuntimeError("setup could not reach the mail server")


def database_name(_: object) -> str:
    """The database the worker's connection points at."""
    return str(connection.settings_dict["NAME"])


def identity(i: int) -> int:
    return i


def read_then_write(i: int) -> int:
    """A read followed by a write in one item: the pattern that upsets deferred SQLite transactions."""
    existing = Marker.objects.filter(key=str(i)).count()
    Marker.objects.create(key=str(i), value=existing)
    sum(range(20_000))  # a little CPU work while the transaction is open
    return i


def die_once_at(flag_path: str, target: int, i: int) -> int:
    """Kill the worker process (SIGKILL) the first time item ``target`` runs."""
    if i == target and not os.path.exists(flag_path):
        open(flag_path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return write_marker(i)


def die_always_at(target: int, i: int) -> int:
    """Kill the worker process every time item ``target`` runs."""
    if i == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_marker(i)


def fail_once_at(flag_path: str, target: int, i: int) -> int:
    """Write a Marker, but fail item ``target`` the first time it runs (then it succeeds)."""
    if i == target and not os.path.exists(flag_path):
        open(flag_path, "w").close()
        raise RuntimeError(f"item {i} fails on its first run")
    return write_marker(i)


def write_marker_on_commit(flag_path: str, i: int) -> int:
    """Write a Marker and, once the transaction commits, a file: a dry run must never create it."""
    from django.db import transaction

    Marker.objects.create(key=str(i), value=i)
    transaction.on_commit(lambda: open(flag_path, "a").close())
    if i == 3:
        raise ValueError("item 3 is bad")
    return i


def interrupt_at_25(i: int) -> int:
    """Behave like a Ctrl-C arriving while item 25 runs."""
    if i == 25:
        raise KeyboardInterrupt
    return write_marker(i)


def count_calls_then_fail_multiples_of_7(calls_dir: str, i: int) -> int:
    """Note each call in a file (outside any transaction), then act as fail_multiples_of_7."""
    with open(os.path.join(calls_dir, f"{i}.calls"), "a") as calls:
        calls.write("x")
    return fail_multiples_of_7(i)


def write_then_busy_once(flag_path: str, i: int) -> int:
    """Write a Marker, then meet "database is locked" the first time item 3 runs."""
    from django.db import OperationalError

    write_marker(i)
    if i == 3 and not os.path.exists(flag_path):
        open(flag_path, "w").close()
        raise OperationalError("database is locked")
    return i


def fail_always(i: int) -> int:
    raise ValueError(f"item {i} always fails")


def setup_fails_once_flagged(flag_path: str) -> None:
    """A worker setup that works until ``flag_path`` exists: replacements then cannot start."""
    if os.path.exists(flag_path):
        raise RuntimeError("setup refuses: the flag file exists")


def hang_in_the_first_setup(flag_path: str) -> None:
    """A worker setup that, the first time, writes its pid to ``flag_path`` and hangs
    (until killed); every later setup, even one beside it, returns at once."""
    try:
        flag = os.open(flag_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # one setup wins
    except FileExistsError:
        return
    os.write(flag, str(os.getpid()).encode())
    os.close(flag)
    time.sleep(120)


def pid_with_state(i: int, state: None) -> int:
    """The pid of the worker that ran the item (a job with a setup is passed its state)."""
    return os.getpid()


def setup_that_ends_its_process(log_path: str, how: str) -> None:
    """A worker setup that notes each start in ``log_path``, then ends its own process:
    ``"exit"`` with exit code 3, else with the signal named (no word to the parent either way)."""
    with open(log_path, "a") as file:
        file.write(f"{os.getpid()}\n")
    if how != "exit":
        faulthandler.disable()  # pytest's would print a traceback for a SIGSEGV
        os.kill(os.getpid(), getattr(signal, how))
    os._exit(3)


def write_marker_with_state_then_die_at(flag_path: str, target: int, i: int, state: None) -> int:
    """With ``setup_fails_once_flagged``: at item ``target``, set the flag, then die (SIGKILL)."""
    if i == target:
        open(flag_path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return write_marker(i)


def prepare_outside_transaction(i: int) -> tuple[int, bool]:
    """prepare: the item, and whether it runs inside a transaction (it must not)."""
    if i == 13:
        raise ValueError("13 cannot be prepared")
    return i, connection.in_atomic_block


def write_prepared(value: tuple[int, bool]) -> tuple[int, bool, bool]:
    """func after prepare_outside_transaction: write a Marker for the item; return what
    prepare saw and whether func itself runs in a transaction."""
    i, prepared_in_transaction = value
    Marker.objects.create(key=str(i), value=i)
    return i, prepared_in_transaction, connection.in_atomic_block


def prepare_with_state(i: int, state: str) -> str:
    return f"{i}@{state}"


def echo_with_state(value: str, state: str) -> str:
    assert value.endswith(f"@{state}"), (value, state)
    return value


def marker_row(i: int) -> dict[str, object]:
    return {"key": f"m{i}", "value": i * 10}


def refuse_c3(customer: Any) -> None:
    """update func: set the email, and refuse the customer named c3."""
    if customer.name == "c3":
        raise ValueError("c3 is refused")
    customer.email = "done@example.com"


def rename(obj: Any) -> None:
    obj.name += "!"


def write_book_dying_on_second_run(flag_dir: str, poison: int, author_id: int) -> int:
    """Write a Book by ``author_id`` (which may dangle); SIGKILL the worker the second time
    ``poison`` runs (the first run is the chunk's fast attempt, refused at COMMIT)."""
    from pathlib import Path

    from tests.testapp.models import Book

    if author_id == poison:
        runs = Path(flag_dir, "runs")
        runs.write_text(str(int(runs.read_text() or "0") + 1) if runs.exists() else "1")
        if runs.read_text() == "2":
            os.kill(os.getpid(), signal.SIGKILL)
    return Book.objects.create(title=f"by {author_id}", author_id=author_id).pk


def write_marker_pid(i: int) -> int:
    """Write one Marker keyed by the item, its value the id of the process that wrote it."""
    Marker.objects.create(key=str(i), value=os.getpid())
    return i


def wait_then_write_marker_pid(seconds: float, i: int) -> int:
    """Wait as for a slow service, then write_marker_pid."""
    time.sleep(seconds)
    return write_marker_pid(i)


def wait_then_pass(seconds: float, i: int) -> int:
    """prepare: wait as for a slow service (outside any transaction), then pass the item on."""
    time.sleep(seconds)
    return i


def setup_fails_outside(pid: int) -> None:
    """setup: works in process ``pid`` (the caller), fails in any other (pool workers)."""
    if os.getpid() != pid:
        raise RuntimeError("this setup works in the calling process only")


def setup_works_in_the_first(workers: int, flag_dir: str) -> None:
    """setup: works in the first ``workers`` processes to run it (each creates a file in
    ``flag_dir``), fails in any other."""
    for n in range(workers):
        try:
            os.close(os.open(os.path.join(flag_dir, str(n)), os.O_CREAT | os.O_EXCL))
            return
        except FileExistsError:
            continue
    raise RuntimeError(f"this setup works in the first {workers} workers only")


def busy_then_write_marker_pid(i: int) -> int:
    """About 1 ms of CPU, then write_marker_pid."""
    deadline = time.thread_time() + 0.001
    while time.thread_time() < deadline:
        pass
    return write_marker_pid(i)


def wait_then_pass_with_state(seconds: float, i: int, state: Any) -> int:
    """wait_then_pass, as prepare with a setup (which passes its state)."""
    return wait_then_pass(seconds, i)


def write_marker_pid_with_state(i: int, state: Any) -> int:
    return write_marker_pid(i)


def worker_pid_of(i: int) -> int:
    """The process that ran the item; items 0-2 wait half a second first."""
    if i < 3:
        time.sleep(0.5)
    return os.getpid()
