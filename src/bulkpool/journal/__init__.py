"""Journaled runs: the one record of what is done, kept in the ``bulkpool`` tables.

A record (``RunChunk``) is a range of input items -- ``start`` and ``size`` -- written in
the same transaction as those items' work, with a ``RunFailure`` per item that failed in
it. A chunk is one record, or several when it was split (a poison item, a COMMIT refused by
a constraint), so a resumed run skips exactly the ranges that committed and runs the rest.

Data flow for ``run_id="nightly-import"``:

    parent   Journal.open(): read the Run row; refuse another job under the same name.
             Writes nothing: a refused or empty rerun leaves the journal as it was.
    parent   Journal.plan(chunk): the chunk's pieces, each either recorded (skipped, with
             its recorded failures) or to run; refuses input that differs from what was
             recorded (digests per record)
    parent   Journal.begin(): before the first piece runs: status "running", one more
             attempt, and the run's lease taken (``status.py``): refused while another live
             caller holds it; renewed by Journal.beat() while the run goes on
    worker   is_recorded(): first in the piece's own transaction, one look: a range already
             recorded is skipped; one whose attempt is over is refused (RunEnded, the fence)
    worker   record_chunk(): inside the piece's own transaction, lock the Run row, refuse a
             range that overlaps a record (the piece ran before: AlreadyDone) or whose
             attempt is over (RunEnded), write the record
    worker   count_start() (at-least-once executors: celery): in a transaction of its own,
             before the piece runs, one more start of it; past a limit the worker refuses
             it, so a piece that kills every worker stops being redelivered, caller or not
    parent   Journal.record_lost(): the failures no worker could record (an item that kills
             every worker it touches), so a resume reports them instead of running them again
    parent   Journal.close(): the attempt's status and counts, for ``bulkpool runs``; the
             lease let go

The package, one unit a module: ``records`` (the worker's side: a range's record, written
and asked inside the transaction of its work), ``planning`` (a resume's chunks planned
around the records), ``lease`` (one live run per run_id), ``run`` (``Journal``, the
caller's side: open, begin, close).

The fence. A chunk carries its attempt (``JournalRef.attempt``); once ``close()`` ended that
attempt (stopped, interrupted, finished) or a resume began the next, a delivery of it that
comes late -- a broker's message that waited for a consumer -- writes nothing, so the
report's "not run" holds; the resume sends those items again under its own attempt.

Why the Run row is locked: ``records.py`` says.
"""

from bulkpool.journal.planning import InputChanged
from bulkpool.journal.records import (
    AlreadyDone,
    JournalRef,
    RunEnded,
    count_start,
    digest,
    is_recorded,
    record_chunk,
    recorded_failures,
    recorded_result,
)
from bulkpool.journal.run import FIX_INSTALL, Journal, func_name, job_identity, new_run_id
from bulkpool.status import RunStatus

__all__ = [
    "FIX_INSTALL",
    "AlreadyDone",
    "InputChanged",
    "Journal",
    "JournalRef",
    "RunEnded",
    "RunStatus",
    "count_start",
    "digest",
    "func_name",
    "is_recorded",
    "job_identity",
    "new_run_id",
    "record_chunk",
    "recorded_failures",
    "recorded_result",
]
