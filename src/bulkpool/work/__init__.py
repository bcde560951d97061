"""What runs inside a worker: per-worker setup, then chunks, each in its transactions.

A ``Worker`` knows nothing of executors: the serial executor drives one in the caller's
thread, the thread executor one per thread, the process executor one per process, the
Celery executor one per job and process, which threads of a pool may share.
``Worker.run(chunk)`` always returns a ``ChunkResult`` that says how each item went; it
never raises, except ``KeyboardInterrupt`` when it runs in the caller's own thread
(``in_caller_thread=True``: Ctrl-C is the caller's).

The modules, one policy each:

    worker.py           Worker: set up once (setup, bound callables, carefulness); run()
    chunk_run.py        ChunkRun: one chunk's state while it runs; settling, crashes, doubt
    one_transaction.py  atomic="chunk": redo, refused COMMIT (checked, split), retries, doubt
    attempt.py          one transaction over a piece: journal check, items or batch, record
    journaling.py       the journal as a transaction asks and writes it
    item_by_item.py     atomic="item" and atomic=False
    inputs.py           prepare and load: func's arguments
    calling.py          calling func on one item; what an item's error becomes
    timing.py           where a chunk run's time goes

Data flow of one chunk under ``atomic="chunk"`` (the default):

    chunk --> prepare     with ``task.prepare``: each item prepared, outside any
                          transaction (no write lock held); func gets the values; a
                          failing item fails here and never reaches func. Done once per
                          run(): the redos, retries and splits below reuse the values
          --> attempts, each one transaction (one_transaction.py tells what follows what)
              <-- ChunkResult (errors, values, callback_errors, timings)

An ``on_commit`` callback that raises after COMMIT leaves the chunk committed and its
items ok; the error goes to ``callback_errors[offset of the item that registered it]``
(inside the caller's transaction, callbacks are the caller's).

So ``func`` may run more than once for an item, as after any retry: keep side effects
outside the database in ``transaction.on_commit()``. The worker stays careful (savepoints)
while chunks keep failing, since failures come in runs.

Errors from user code -- ``BaseException`` too (``SystemExit``, a ``KeyboardInterrupt``
raised by ``func`` in a worker thread, ``GeneratorExit``) -- are the item's failure. A
return value the executor cannot send back (``Task.check_value``) fails its item before
COMMIT, so it is rolled back like any failure.
"""

from __future__ import annotations

from bulkpool.work.worker import SQLITE_BUSY_TIMEOUT, Worker

__all__ = ["SQLITE_BUSY_TIMEOUT", "Worker"]
