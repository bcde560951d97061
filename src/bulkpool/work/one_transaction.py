"""``atomic="chunk"``: the chunk in one transaction, with what it takes to keep it so.

Data flow of one chunk (each attempt is ``attempt.attempt``):

    attempt(chunk)         as careful as the Worker's ``Carefulness`` says (FAST: no savepoints)
      an item fails        --> Redo: roll back; run again with a savepoint per item; the
                               failed item keeps its error, is not rerun
      COMMIT refused       --> nothing committed; on PostgreSQL, run again CHECKED: each
      (a deferred FK           item's savepoint ends with its deferred constraint checks,
      dangles)                 so the bad item fails alone
      COMMIT refused again,--> split into halves, each run and committed in its own
      or no per-item checks    transaction with its own journal record, recursively, until
      (SQLite)                 the bad item fails alone; settled by offset in the chunk
      a transient error    --> Retry.again(): back off, fresh connection, same piece again;
                               one budget for the whole chunk
      connection lost in   --> with a journal, the next attempt asks it whether the piece
      COMMIT (in doubt)        committed (AlreadyDone); without one, its items fail with
                               CommitUnknown (never written twice)
      the journal fails    --> roll back; the items fail, saying so

``chunk.each_item`` (SQLite, heavy items; the pool decides): each item a piece of its own,
in its own transaction with its own journal row (and its own retries), begun DEFERRED, so
that what the item does before its first write runs while other workers write; its load
(QuerySet input) runs inside, so that it reads what its write is checked against. A first write that finds the
item's snapshot stale (another worker committed since) fails at once: the item runs again
at once, IMMEDIATE, without spending a retry. Each item's outcome goes to the executor as
it settles (``ChunkRun.item_settled``), so a worker that dies loses only its current item.
"""

from __future__ import annotations

from django.db import DatabaseError

from bulkpool.journal import AlreadyDone
from bulkpool.protocol import Chunk, ChunkResult, ErrorInfo
from bulkpool.retrying import Retry, Transient
from bulkpool.transactions import CommitRefused, checks_constraints_per_item
from bulkpool.work.attempt import CHECKED, FAST, SAVEPOINTS, Carefulness, Redo, attempt
from bulkpool.work.chunk_run import ChunkRun, commit_unknown
from bulkpool.work.journaling import JournalFailed, recorded


class OneTransaction:
    """Runs a chunk run's chunk under ``atomic="chunk"``, settling every offset."""

    def __init__(self, run: ChunkRun, careful: Carefulness) -> None:
        self._run = run
        self._careful = careful

    def run(self) -> None:
        run = self._run
        if run.chunk.each_item:
            self._run_each_item()
            return
        retry = Retry(run.task.retries, **run.where())
        self._run_piece(run.chunk, retry, level=self._careful.level, whole=True)
        if not run.result.errors:
            self._careful.relax()

    def _run_each_item(self) -> None:
        chunk = self._run.chunk
        for index in range(chunk.start, chunk.end):
            # Its own retries: N transactions must not share one chunk's budget. No
            # savepoint: an item that fails rolls its transaction back, and its journal row
            # (with its failure) goes in a second one, like a chunk's redo. A retried
            # failure (retry_failed) begins IMMEDIATE: its journal row replaces the old
            # failure instead of refusing a second delivery, so the journal must be asked
            # inside the transaction.
            retry = Retry(self._run.task.retries, **self._run.where())
            piece = chunk.piece(index, index + 1)
            self._run_piece(piece, retry, level=FAST, deferred=not chunk.retry)
            self._run.item_settled(index - chunk.start)

    def _run_piece(
        self, piece: Chunk, retry: Retry, *, level: int, whole: bool = False, deferred: bool = False
    ) -> None:
        """Run ``piece`` (the chunk, or a part of it after a refused COMMIT) to the end:
        committed, or failed, or split further."""
        run = self._run
        in_doubt: tuple[ChunkResult, BaseException] | None = None  # an attempt that may have committed
        while True:
            local = ChunkResult(piece.number, [None] * len(piece) if run.task.keep_values else None)
            try:
                txn = attempt(run, piece, local, level, deferred=deferred)
            except Redo as redo:
                if redo.error is not None:
                    run.failed_before[redo.index] = redo.error
                level = max(level, SAVEPOINTS)
                continue
            except CommitRefused as refused:
                # Nothing was committed. Where each item's deferred checks can run in its
                # savepoint (PostgreSQL), run the chunk so; else (or if that did not find
                # it) split the chunk to find the item COMMIT refuses. Either way the items
                # that failed in this attempt keep their error and are not run again.
                for offset, failure in local.errors.items():
                    run.failed_before.setdefault(piece.start + offset, failure)
                if level < CHECKED and checks_constraints_per_item(run.task.database):
                    level = CHECKED
                    continue
                self._split(piece, refused.error, retry, level)
                return
            except AlreadyDone:
                self._already_done(piece, in_doubt, whole=whole)
                return
            except JournalFailed as failed:
                local.errors = dict.fromkeys(range(len(piece)), failed.failure(piece))
                local.values = None
                run.settle(piece, local)
                return
            except Transient as transient:
                if deferred and not transient.in_doubt:  # a stale snapshot, most likely
                    run.clock.ran_again_stale()
                    deferred = False  # IMMEDIATE: it waits for the lock at BEGIN
                    continue
                if transient.in_doubt:
                    if not run.task.journal:
                        retry.recover()
                        run.settle(piece, commit_unknown(local, range(len(piece)), transient.error))
                        return
                    in_doubt = (local, transient.error)  # the next attempt's journal check tells
                if retry.again():
                    run.result.retried += len(piece)
                    continue
                self._gave_up(piece, local, transient.error, in_doubt)
                return
            if local.errors:  # failures come in runs: the next chunk starts this careful
                self._careful.raise_to(level)
            local.callback_errors = txn.callback_errors
            run.settle(piece, local)
            return

    def _already_done(
        self, piece: Chunk, in_doubt: tuple[ChunkResult, BaseException] | None, *, whole: bool
    ) -> None:
        """The journal says the piece committed: after a COMMIT in doubt, that attempt did."""
        run = self._run
        if in_doubt is not None:
            run.settle(piece, in_doubt[0])
        elif whole or run.chunk.each_item:  # delivered again after it committed: the journal's outcome is its
            outcome = recorded(run.task, piece)
            if outcome is not None:
                run.settle(piece, outcome)
            elif whole:  # the journal cannot say: done, values unknown
                run.result.skipped, run.result.values = True, None
            else:
                run.settle(piece, ChunkResult(piece.number, None))
        else:  # a piece committed by an earlier delivery of this chunk
            run.settle(piece, ChunkResult(piece.number, None))

    def _gave_up(
        self,
        piece: Chunk,
        local: ChunkResult,
        error: BaseException,
        in_doubt: tuple[ChunkResult, BaseException] | None,
    ) -> None:
        """Still failing after every retry."""
        if in_doubt is not None:  # and the journal could not be asked
            self._run.settle(piece, commit_unknown(in_doubt[0], range(len(piece)), in_doubt[1]))
            return
        # Nothing of the piece was written.
        local.errors = dict.fromkeys(range(len(piece)), ErrorInfo.from_exception(error))
        local.values = None
        self._run.settle(piece, local)

    def _split(self, piece: Chunk, error: DatabaseError, retry: Retry, level: int) -> None:
        """COMMIT refused the piece: find the item it refused by running halves on their own
        (as carefully as the piece ran: its failures may be theirs)."""
        run = self._run
        if len(piece) > 1:
            for half in piece.halves():
                self._run_piece(half, retry, level=level)
            return
        index = piece.start
        if index in run.failed_before or not run.task.journal:
            # Nothing of it ran or nothing is left to write: it failed, alone.
            failure = run.failed_before.get(index) or ErrorInfo.from_exception(error)
            run.settle(piece, ChunkResult(piece.number, None, {0: failure}))
            return
        # The item failed alone; its piece still gets its journal record (with the failure).
        run.failed_before[index] = ErrorInfo.from_exception(error)
        self._run_piece(piece, retry, level=level)
