"""``atomic="item"`` and ``atomic=False``: a chunk's items one by one.

Data flow of one chunk:

    load (task.load)     outside any transaction; a transient error is retried on its own
    atomic="item"        each item in its own transaction, retried alone; a COMMIT lost
                         in doubt fails it with CommitUnknown (never run twice)
    atomic=False         autocommit: nothing is retried (what an item wrote before its
                         error stays written); an on_commit callback runs at once, inside
                         func, so one that raises is that item's failure
"""

from __future__ import annotations

import contextlib
from typing import Any

from bulkpool.protocol import ErrorInfo
from bulkpool.retrying import Retry, Transient
from bulkpool.transactions import open_transaction
from bulkpool.work.chunk_run import ChunkRun, commit_unknown


class ItemByItem:
    """Runs a chunk run's items each on its own, settling each offset as it ends."""

    def __init__(self, run: ChunkRun) -> None:
        self._run = run

    def run(self) -> None:
        run = self._run
        result, chunk = run.result, run.chunk
        retry = Retry(run.task.retries, **run.where())
        while True:  # loading runs outside any transaction: retried on its own
            try:
                inputs = run.inputs.for_piece(chunk, result)
                break
            except Transient as transient:
                if not retry.again():
                    failure = ErrorInfo.from_exception(transient.error)
                    result.errors = dict.fromkeys(range(len(chunk)), failure)
                    run.settle_offsets(range(len(chunk)))
                    return
        run.settle_offsets(result.errors)  # items that failed to load
        for offset, item in inputs:
            if run.task.atomic == "item":
                self._in_its_transaction(offset, item)
            else:
                self._in_autocommit(offset, item)
            run.settle_offsets([offset])

    def _in_its_transaction(self, offset: int, item: Any) -> None:
        run = self._run
        result, task = run.result, run.task
        retry = Retry(task.retries, **run.where())
        while True:
            run.begin(range(offset, offset + 1))
            scope = open_transaction(
                task.database,
                dry_run=task.dry_run,
                before_commit=run.about_to_commit,
                in_caller_thread=run.calls.in_caller_thread,
                writer_queue=task.writer_queue,
            )
            try:
                ok, txn = run.caller.run_item(result, offset, item, scope, atomic=True)
            except Transient as transient:
                if result.values is not None:
                    result.values[offset] = None
                if transient.in_doubt:
                    retry.recover()
                    result.errors.pop(offset, None)  # an earlier attempt's error
                    commit_unknown(result, [offset], transient.error)
                    return
                result.errors[offset] = ErrorInfo.from_exception(transient.error)
                if retry.again():
                    result.retried += 1
                    continue
                return
            if txn is not None:
                run.clock.ended_transaction(txn.commit_seconds)
                if ok:
                    # Callbacks registered outside any savepoint of its own are still its.
                    for error in txn.callback_errors.values():
                        result.callback_errors.setdefault(offset, error)
            return

    def _in_autocommit(self, offset: int, item: Any) -> None:
        run = self._run
        try:
            run.caller.run_item(run.result, offset, item, contextlib.nullcontext(), atomic=False)
        except Transient as transient:
            # What the item wrote before the error stays written: running it again could
            # write that twice, so it is not retried; the next item gets a fresh connection.
            run.result.errors[offset] = ErrorInfo.from_exception(transient.error)
            Retry(0, **run.where()).recover(back_off=False)
