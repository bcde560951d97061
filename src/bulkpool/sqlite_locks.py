"""Whether the calling process holds SQLite's read lock while the run's workers must commit.

In SQLite's rollback-journal mode (Django's default) a read in progress holds the
database's SHARED lock until it ends, and no other connection can COMMIT while it is held.
An input that reads the same database lazily -- a generator over ``QuerySet.iterator()``, an
open cursor -- holds it between the chunks the run reads from it, so every worker would wait
out its busy timeout and fail with "database is locked", chunk after chunk. A ``QuerySet``
given as the input itself does not: bulkpool reads it in pages, each read to its end.

SQLite's unix VFS takes that lock with POSIX locks on bytes of the database file, one set
per process (``PENDING_BYTE`` at 1 GiB, then RESERVED, then the SHARED range: os_unix.c), and
Linux lists the locks a process holds through a file descriptor in ``/proc/self/fdinfo``.
(Not ``/proc/locks``: reading it takes a lock of the whole system's, which costs a grace
period of the kernel's, 5-15 ms, each time.) Elsewhere ``watch`` returns None and nothing is
checked (the backends guide says so). WAL mode needs no watch: its readers never keep a
writer from committing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from django.db import connections

from bulkpool.sqlite_writers import in_wal_mode

OPEN_FILES = Path("/proc/self/fd")
PENDING_BYTE = 0x40000000  # SQLite's lock bytes: PENDING, RESERVED, then 510 SHARED bytes
LOCK_BYTES = range(PENDING_BYTE, PENDING_BYTE + 512)
HELD_SECONDS = 0.2  # a lock held this long is a read left open, not another thread's query


@dataclass(frozen=True)
class ReadLockWatch:
    """Looks for this process's locks on one SQLite database file."""

    database: str  # the alias
    path: str
    file: tuple[int, int]  # its device and inode

    def held(self) -> bool:
        """This process holds a lock on the database now, and still does ``HELD_SECONDS``
        later (a query that another of its threads was running has ended by then)."""
        deadline = time.monotonic() + HELD_SECONDS
        while self.holds_now():
            if time.monotonic() >= deadline:
                return True
            time.sleep(HELD_SECONDS / 4)
        return False

    def explain(self) -> str:
        return (
            f"this process holds SQLite's read lock on database {self.database!r} ({self.path}) "
            "while the run's workers must commit to it: in SQLite's rollback-journal mode no one "
            "can commit while a read is open. The input most likely reads that database lazily "
            "(a generator over QuerySet.iterator(), or a cursor not read to its end). Pass the "
            "QuerySet itself as the input (bulkpool reads it in pages, each to its end), read "
            "the input into a list first, switch the database to WAL mode (PRAGMA "
            "journal_mode=WAL, in which readers never block a commit), or use backend='serial'"
        )

    def holds_now(self) -> bool:
        """Any of this process's descriptors of the database file holds one of SQLite's
        locks: ``lock:\t1: POSIX  ADVISORY  READ 7013 fe:00:2146342 1073741826 1073742335``."""
        for descriptor in self._descriptors():
            try:
                info = (OPEN_FILES.parent / "fdinfo" / descriptor).read_text()
            except OSError:
                continue
            if any(_is_sqlite_lock(line.split()) for line in info.splitlines()):
                return True
        return False

    def _descriptors(self) -> list[str]:
        """This process's file descriptors open on the database file."""
        found = []
        try:
            names = os.listdir(OPEN_FILES)
        except OSError:
            return []
        for name in names:
            try:
                stat = os.fstat(int(name))
            except (OSError, ValueError):
                continue  # closed since it was listed (the listing's own descriptor, say)
            if (stat.st_dev, stat.st_ino) == self.file:
                found.append(name)
        return found


def watch(database: str) -> ReadLockWatch | None:
    """A watch over ``database`` when it is an SQLite file in rollback-journal mode and this
    platform lists its locks; else None: nothing to watch, or no way to."""
    connection = connections[database]
    if connection.vendor != "sqlite" or not OPEN_FILES.exists():
        return None
    if connection.is_in_memory_db():  # type: ignore[attr-defined]
        return None
    if in_wal_mode(connection):
        return None
    path = str(connection.settings_dict["NAME"])
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return ReadLockWatch(database, path, (stat.st_dev, stat.st_ino))


def _is_sqlite_lock(fields: list[str]) -> bool:
    """An fdinfo line's fields -- lock:, its number, POSIX, ADVISORY, READ, pid, file, start,
    end -- name a lock on SQLite's bytes."""
    if len(fields) != 9 or fields[0] != "lock:" or fields[2] != "POSIX" or not fields[7].isdigit():
        return False
    return int(fields[7]) in LOCK_BYTES
