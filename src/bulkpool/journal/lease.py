"""The caller's hold on a run_id: one live run at a time (the vocabulary is in ``status.py``).

    begin()   the Run row, locked: ``require_free`` refuses it while another live caller
              holds it; ``Lease.stamp`` makes this caller the holder (host, pid, a token)
    beat()    ``Lease.renew``: every HEARTBEAT_SECONDS, a new ``heartbeat_at`` -- if the row
              is still this caller's (else another took over a lapsed lease: say so)
    close()   the owner cleared: another caller may resume the run at once

A lease holds while it is renewed; one not renewed for STALE_AFTER_SECONDS, or held by a
process of this machine that no longer exists, holds nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError, connections
from django.utils import timezone

from bulkpool.errors import RunInProgress
from bulkpool.status import HEARTBEAT_SECONDS, STALE_AFTER_SECONDS

logger = logging.getLogger("bulkpool")
RETRY_SECONDS = 0.5  # after a renewal that failed


class Lease:
    """This caller's lease on one run: taken with the Run row, then renewed."""

    def __init__(self, database: str, run_id: str) -> None:
        self.database = database
        self.run_id = run_id
        self.owner = f"{socket.gethostname()} pid {os.getpid()} ({secrets.token_hex(3)})"
        self._renewed = 0.0  # time.monotonic() of the latest renewal

    def stamp(self, run: Any) -> None:
        """Make this caller the holder of ``run`` (saved by the caller, with the row)."""
        run.owner, run.heartbeat_at = self.owner, timezone.now()
        self._renewed = time.monotonic()

    def renew(self, run_pk: int) -> None:
        """A new heartbeat, at most every HEARTBEAT_SECONDS: call it often while the run goes on."""
        if time.monotonic() - self._renewed < HEARTBEAT_SECONDS:
            return
        from bulkpool.models import Run

        self._renewed = time.monotonic()
        try:
            with _not_waiting_for_sqlites_writer(self.database):
                held = (
                    Run.objects.using(self.database)
                    .filter(pk=run_pk, owner=self.owner)
                    .update(heartbeat_at=timezone.now())
                )
        except DatabaseError as error:  # tried again soon; the lease is generous
            logger.debug("Could not renew the lease of run %r: %s", self.run_id, error)
            # SQLite: the run's workers pass the write lock from one to the next (sqlite_writers),
            # so a renewal that gives up at once finds it free only now and then: try again soon.
            self._renewed -= HEARTBEAT_SECONDS - RETRY_SECONDS
            return
        if not held:
            logger.warning(
                "Run %r was taken over by another caller after this one's lease lapsed: both "
                "now run it. The journal still writes each item once.",
                self.run_id,
            )


@contextlib.contextmanager
def _not_waiting_for_sqlites_writer(database: str) -> Iterator[None]:
    """On SQLite, a renewal that finds a worker holding the write lock gives up at once (the
    next one will do) instead of stalling the caller's loop for the busy timeout."""
    connection = connections[database]
    if connection.vendor != "sqlite" or connection.in_atomic_block:
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA busy_timeout")
        (waits,) = cursor.fetchone()
        cursor.execute("PRAGMA busy_timeout = 50")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA busy_timeout = {int(waits)}")


def require_free(run: Any) -> None:
    """Refuse a run_id whose run is live: marked running, by a caller whose lease holds."""
    if run.status != run.Status.RUNNING or not run.owner or run.lease_lapsed() or _gone(run.owner):
        return
    renewed = (timezone.now() - run.heartbeat_at).total_seconds()
    raise RunInProgress(
        f"run_id={run.run_id!r} is being run now by {run.owner} (its lease was renewed "
        f"{renewed:.0f} s ago): wait for it to end, or stop it. If that caller is gone, the run "
        f"can be resumed {STALE_AFTER_SECONDS:.0f} s after its last renewal."
    )


def _gone(owner: str) -> bool:
    """Whether the caller named by ``owner`` ("host pid N (token)") is a process of this
    machine that no longer exists: then its lease means nothing, whatever its age."""
    host, _, rest = owner.partition(" pid ")
    pid = rest.split(" ", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
