"""The worker side of the process executor: what runs inside each worker process.

Data flow over the worker's duplex pipe (``multiprocessing.connection.Connection``):

    parent -> worker   the bootstrap, once: pickled (DjangoEnvironment, cloudpickled Task)
    worker -> parent   ("ready", pid) once setup ran, or ("failed", traceback text)
    parent -> worker   a Chunk, any number of times; None to finish
    worker -> parent   ("committing", None) just before a chunk's COMMIT, if it gets there
    worker -> parent   ("settled", (offset, error, pickled value)) after each item of an
                       each_item chunk (committed with its journal row, or failed)
    worker -> parent   per chunk, ("done", ChunkResult), or ("lost", (reason, in_doubt,
                       traceback)) when the Worker raised outside any item or its result
                       cannot be pickled (then it committed: in doubt)

Inside the worker, a reader thread takes the parent's chunks off the pipe as soon as they
arrive and queues them for the main thread, which runs them. So the parent's send of a
big chunk never waits for the worker to finish sending a big result: without the reader,
each would block on a full pipe, waiting for the other to read. The queue stays small:
the parent sends a chunk only to a worker that has none. Only the main thread handles signals.

A worker never imports the caller's ``__main__``: functions defined there travel by value
(cloudpickle), so scripts without an ``if __name__ == "__main__":`` guard are safe.

Started three ways (``ProcessExecutor(start_method=...)``):

    fork        the parent forks; the child calls ``serve_forked`` directly.
    spawn       ``python -c "...main()" serve FD``: a fresh interpreter per worker.
    forkserver  ``python -c "...main()" zygote FD SOCK``: one fresh interpreter sets Django
                up once, then forks a worker for every pipe end the parent passes it
                over SOCK (``socket.send_fds``).

Workers ignore SIGINT (the parent decides what Ctrl-C means). A SIGTERM (systemd stops a
service by signalling every process of it) lets the chunk in hand commit and be reported,
then ends the worker; idle, it ends at once; a second SIGTERM ends it at once. The
forkserver ignores SIGTERM: it holds no work. Workers exit
quietly when the parent hangs up on them, and on their own when the parent dies, so no
worker outlives the run with a connection open.

A forked worker (fork, and the forkserver's children) starts with a copy of the parent's
open database connections, sharing their sockets with the parent. It never uses them nor
closes them -- closing one, or letting the driver close it when it is garbage-collected,
would end the parent's session, its locks and temporary tables: right after the fork, it
sets Django's per-thread connection storage aside (kept referenced until the process
ends, which never runs finalizers) and opens connections of its own.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

ORPHAN_CHECK_INTERVAL = 0.5
# In a forked worker: the parent's connections, referenced so that they are never
# garbage-collected here (the driver would close the parent's session on its way out).
_INHERITED: list[Any] = []


def serve(conn: Connection) -> None:
    """Bootstrap from the first message, then run chunks until told to stop."""
    try:
        task = _bootstrap(conn)
    except (BrokenPipeError, ConnectionResetError):  # the parent gave up on us: nobody to tell
        return
    if task is not None:
        run_worker(conn, task)


def run_worker(conn: Connection, task: Any) -> None:
    from bulkpool.executors.base import CommitWatch
    from bulkpool.work import Worker

    commit = CommitWatch(then=lambda: conn.send(("committing", None)))
    worker = Worker(task, before_commit=commit, progress=_telling_progress(conn))
    try:
        try:
            worker.start()
        except BaseException:
            conn.send(("failed", traceback.format_exc()))
            return
        conn.send(("ready", os.getpid()))
        inbox = _Inbox(conn)
        termination = _Termination()
        while not termination.requested:
            chunk = inbox.get()
            if chunk is None:  # told to finish, or the parent is gone
                return
            with termination.deferred():
                commit.reset()
                _run_and_report(conn, worker, commit, chunk)
    except (BrokenPipeError, ConnectionResetError, _Terminated):
        return  # the parent is gone or gave up on this worker, or SIGTERM found us idle
    finally:
        worker.close()


def _telling_progress(conn: Connection) -> Any:
    """Tell the parent each item of an each_item chunk as it settles. The value travels
    pickled on its own, so that a value the parent cannot rebuild fails that item there,
    not the message (which would leave the parent unsure how far the chunk got)."""

    def settled(offset: int, error: Any, value: Any) -> None:
        blob = None if value is None else pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        conn.send(("settled", (offset, error, blob)))

    return settled


def _run_and_report(conn: Connection, worker: Any, commit: Any, chunk: Any) -> None:
    """Run one chunk and send its result; whatever goes wrong is that chunk's loss, reported."""
    from bulkpool.executors.base import crashed

    where = f"the worker process (pid {os.getpid()})"
    if isinstance(chunk, _Unreadable):  # nothing ran; the parent knows which chunk it sent
        reason = f"{where} could not read the chunk it was sent ({chunk.error})"
        conn.send(("lost", (reason, False, chunk.traceback)))
        return
    try:
        result = worker.run(chunk)
    except BaseException as error:
        lost = crashed(chunk, error, in_doubt=commit.in_doubt(worker), where=where)
        conn.send(("lost", (lost.reason, lost.in_doubt, lost.traceback)))
        worker.close()  # the next chunk starts on a fresh connection, whatever state this one was left in
        return
    try:
        message = pickle.dumps(("done", result), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        reason = (
            f"{where} could not send back the result of a chunk it ran, which may have "
            f"committed ({type(error).__name__}: {error})"
        )
        conn.send(("lost", (reason, True, traceback.format_exc())))
        return
    conn.send_bytes(message)


class _Inbox:
    """The parent's chunks, taken off the pipe by a thread of their own as soon as they come.

    ``get`` waits in short slices: a signal handler (SIGTERM) runs only in the main thread,
    between bytecodes, and a wait on a lock is not interrupted by a signal.
    """

    WAIT_SLICE = 0.2  # seconds

    def __init__(self, conn: Connection) -> None:
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(conn,), name="bulkpool-inbox", daemon=True).start()

    def get(self) -> Any:
        """The next chunk; None once the parent said to finish, or hung up."""
        while True:
            try:
                data = self._queue.get(timeout=self.WAIT_SLICE)
            except queue.Empty:
                continue
            if data is None:
                return None
            try:
                return pickle.loads(data)
            except Exception as error:  # e.g. an item of a class only the parent can import
                return _Unreadable(f"{type(error).__name__}: {error}", traceback.format_exc())

    def _read(self, conn: Connection) -> None:
        _leave_signals_to_the_main_thread()
        try:
            while True:
                self._queue.put(conn.recv_bytes())
        except (EOFError, OSError):
            self._queue.put(None)


@dataclass(frozen=True)
class _Unreadable:
    """A chunk that came over the pipe but could not be unpickled here."""

    error: str
    traceback: str


def _leave_signals_to_the_main_thread() -> None:
    # A process-directed signal goes to any thread that does not block it, and one that
    # lands on a helper thread would not wake the main thread to run its handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


class _Terminated(BaseException):
    """Raised by the SIGTERM handler of a worker that holds no chunk."""


class _Termination:
    """SIGTERM in a working worker: end at once when idle, after the chunk in hand when busy.

    Dying mid-chunk would roll the chunk back, or leave it in doubt during COMMIT, while the
    parent (which treats SIGTERM as Ctrl-C) is waiting for exactly those chunks to finish.
    """

    def __init__(self) -> None:
        self.requested = False
        self.busy = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.siginterrupt(signal.SIGTERM, False)  # don't break the database driver's I/O

    def _handle(self, signum: int, frame: Any) -> None:
        if self.busy and not self.requested:
            self.requested = True
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from now on, SIGTERM just ends us
        if self.busy:  # asked twice
            os.kill(os.getpid(), signal.SIGTERM)
        raise _Terminated

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold SIGTERM back until the chunk is done and reported."""
        self.busy = True
        try:
            yield
        finally:
            self.busy = False


def _bootstrap(conn: Connection) -> Any:
    """Set Django up from the parent's bootstrap; report a failure instead of dying silently."""
    try:
        import cloudpickle

        environment, task_bytes = pickle.loads(conn.recv_bytes())
        environment.apply()
        return cloudpickle.loads(task_bytes)
    except EOFError:
        return None
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        return None


def _serve_zygote(conn: Connection, fd_socket: socket.socket) -> None:
    """Set Django up once, then fork a worker for every pipe end received on ``fd_socket``."""
    task = _bootstrap(conn)
    if task is None:
        return
    conn.send(("ready", os.getpid()))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps our workers
    # It holds no work, and ends when the parent closes the socket or dies; dying of a
    # SIGTERM to every process (systemd stopping a service) would take the workers with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(fd_socket, 16, 1)
        except OSError:
            return
        if not fds:  # the parent closed the socket: no more workers wanted
            return
        if os.fork() == 0:
            _forget_inherited_connections()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            fd_socket.close()
            conn.close()
            _watch_parent()
            run_worker(Connection(fds[0]), task)
            os._exit(0)
        os.close(fds[0])


def _watch_parent() -> None:
    """Exit when the parent dies (we get re-parented), even in the middle of a chunk."""
    parent = os.getppid()

    def watch() -> None:
        _leave_signals_to_the_main_thread()
        while True:
            time.sleep(ORPHAN_CHECK_INTERVAL)
            if os.getppid() != parent:
                os._exit(70)

    threading.Thread(target=watch, name="bulkpool-orphan-watch", daemon=True).start()


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A forked worker inherits the engine's SIGTERM-as-Ctrl-C handler, which would raise
    # KeyboardInterrupt inside the user's function; until ``_Termination`` takes over
    # (once set up), SIGTERM ends the worker. Never ignored: multiprocessing's exit-time
    # terminate() and join() of a worker left running would hang.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _forget_inherited_connections() -> None:
    """Give a freshly forked process Django connection storage of its own (see the module docstring)."""
    from asgiref.local import Local
    from django.db import connections

    _INHERITED.append(connections._connections)  # type: ignore[attr-defined]
    _INHERITED.extend(connections.all(initialized_only=True))
    connections._connections = Local(connections.thread_critical)  # type: ignore[attr-defined]


def serve_forked(conn: Connection) -> None:
    """Entry point of a worker forked from the parent."""
    _forget_inherited_connections()
    _ignore_interrupts()
    _watch_parent()
    serve(conn)


def main(argv: list[str] | None = None) -> None:
    """Entry point of a fresh interpreter: ``serve FD`` or ``zygote FD SOCK``."""
    argv = sys.argv[1:] if argv is None else argv
    _ignore_interrupts()
    _watch_parent()
    conn = Connection(int(argv[1]))
    if argv[0] == "zygote":
        _serve_zygote(conn, socket.socket(fileno=int(argv[2])))
    else:
        serve(conn)
