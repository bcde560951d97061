"""The process executor: a pool of worker processes that the parent feeds chunk by chunk.

Data flow: every worker has one duplex pipe to the parent (see ``process_worker`` for the
messages). A worker is sent one chunk at a time, when it has none: the parent holds the
chunks submitted beyond those (``AHEAD`` per worker in all) ready, pickled, and sends the
next the moment a worker reports its last one. (Sent ahead into a busy worker's pipe, a
chunk would wait there while another worker sat idle: at the end of a run, up to a
chunk's time of one worker alone.) A stopping run still runs the chunks it submitted, as
the chunks in flight. ``events`` waits on every pipe at once; end-of-file on a pipe means
its worker died: the chunk it held comes back as ``ChunkLost`` (and those ready with no
worker left to run them) and a new worker takes its place (when work is next sent). A
worker says "committing" just before it commits a chunk, so a chunk whose worker died
during COMMIT comes back ``in_doubt``; a worker that crashed outside any item, or could
not send a result, says "lost" with the traceback, and goes on with the next chunk. In a
chunk of ``each_item`` transactions the worker says "settled" with each item's outcome as
it commits, so a chunk whose worker died comes back with the items it settled
(``ChunkLost.settled``): only the rest is lost.

The parent never closes its own connections for the workers' sake: a forked worker sets
the copies it inherits aside, untouched (see ``process_worker``), so the caller's session
-- its locks, its temporary tables -- outlives any number of workers forked mid-run.

Why not ``concurrent.futures.ProcessPoolExecutor``: one dead worker breaks the whole pool,
and under spawn/forkserver its workers re-run the caller's ``__main__``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import cloudpickle

from bulkpool.errors import ConfigurationError, WorkerStartupError
from bulkpool.executors.base import Delivery, Executor
from bulkpool.executors.environment import DjangoEnvironment
from bulkpool.executors.process_worker import serve_forked
from bulkpool.protocol import PICKLE, Chunk, ChunkDone, ChunkLost, ChunkResult, ErrorInfo, Event, Task

START_METHODS = ("fork", "forkserver", "spawn")
START_TIMEOUT = 120.0  # seconds for a worker to import Django and run setup
STOP_TIMEOUT = 30.0  # seconds for a worker to close its connections and exit
EXIT_WAIT = 5.0  # seconds for a process whose pipe closed to end, so that it says how
AHEAD = 2  # chunks submitted per worker: one running, one ready in the parent to send when it ends
START_ATTEMPTS = 3  # starts in all of a worker that keeps being killed before it is ready
_LAUNCH_CODE = "from bulkpool.executors.process_worker import main; main()"

logger = logging.getLogger("bulkpool")


class _DiedStarting(WorkerStartupError):
    """A worker or the forkserver was killed before it was ready (or a worker's forkserver
    was): unlike a setup that raised, worth starting again."""


@dataclass(eq=False)
class _WorkerHandle:
    conn: Connection
    reap: Callable[[float], str]  # wait for the process to end; says how it ended
    pid: int = 0
    in_flight: deque[Chunk] = field(default_factory=deque)
    committing: bool = False  # the first chunk in flight is being committed
    # each_item: the first chunk's items settled so far, as (offset, error, pickled value)
    settled: list[tuple[int, ErrorInfo | None, bytes | None]] = field(default_factory=list)

    def lose_first(self, reason: str, *, in_doubt: bool, traceback: str = "") -> ChunkLost:
        """The first chunk in flight, lost, with what it settled of it."""
        chunk = self.in_flight.popleft()
        settled, self.settled = self.settled, []
        return ChunkLost(
            chunk, reason, in_doubt=in_doubt, traceback=traceback, settled=_result(chunk, settled)
        )

    def finish_first(self, result: ChunkResult) -> ChunkDone:
        self.settled = []
        return ChunkDone(self.in_flight.popleft(), result)

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ProcessExecutor(Executor):
    """Worker processes started with ``start_method`` (default: multiprocessing's)."""

    name = "process"
    delivery: Delivery = "exactly_once"
    detects_loss = True
    local = True
    grows = True

    def __init__(self, workers: int | None = None, *, start_method: str | None = None) -> None:
        super().__init__(workers)
        available = multiprocessing.get_all_start_methods()
        method = start_method or multiprocessing.get_start_method(allow_none=True) or available[0]
        if method not in START_METHODS or method not in available:
            raise ConfigurationError(
                f"start_method={method!r} is not available here; use one of {', '.join(available)}."
            )
        self.start_method = method

    @property
    def start_seconds(self) -> float:  # type: ignore[override]
        """A fork is cheap; a fresh interpreter imports and sets Django up."""
        return 0.1 if self.start_method == "fork" else 1.0

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers!r}, start_method={self.start_method!r})"

    def check(self, task: Task) -> None:
        self._bootstrap_for(task)

    def _bootstrap_for(self, task: Task) -> bytes:
        """The first message every worker gets: the caller's Django, and the task."""
        if task.keep_values:  # a value that cannot cross the pipe fails its item, before COMMIT
            task = replace(task, check_value=PICKLE.check_value)
        try:
            task_bytes = cloudpickle.dumps(task)
        except Exception as error:
            raise ConfigurationError(
                f"The function {_name(task.func)} (or its setup or prepare) cannot be sent to worker "
                f"processes: {type(error).__name__}: {error}. Define it at module level, or "
                "make it use only picklable values; backend='thread' runs any callable."
            ) from error
        # A forked worker inherits the settings; only fresh interpreters need them shipped.
        environment = DjangoEnvironment.capture(ship_settings=self.start_method != "fork")
        return pickle.dumps((environment, task_bytes))

    def start(self, task: Task, workers: int) -> None:
        self._bootstrap = self._bootstrap_for(task)
        self._local_events: list[Event] = []
        self._zygote: tuple[subprocess.Popen[bytes], Connection, socket.socket] | None = None
        self._size = workers
        self._handles: list[_WorkerHandle] = []
        self._ready: deque[tuple[Chunk, bytes]] = deque()  # submitted, pickled, not sent yet
        try:
            self._replace_the_dead()
        except BaseException:  # Ctrl-C during a long setup, too
            self.stop(cancel=True)
            raise

    def grow(self, workers: int) -> None:
        previous, self._size = self._size, max(self._size, workers)
        try:
            self._replace_the_dead()
        except BaseException:
            self._size = previous
            raise  # (the new workers get chunks at the next submit or events: not under Ctrl-C's raising)

    def capacity(self) -> int:
        return AHEAD * self._size

    def submit(self, chunk: Chunk) -> None:
        self._replace_the_dead()
        try:
            payload = pickle.dumps(chunk)
        except Exception as error:
            self._local_events.append(ChunkDone(chunk, _unpicklable_chunk(chunk, error)))
            return
        self._ready.append((chunk, payload))
        self._send_ready()

    def events(self, timeout: float | None = None) -> list[Event]:
        found, self._local_events = self._local_events, []
        if found:
            timeout = 0
        by_conn = {handle.conn: handle for handle in self._handles}
        for conn in wait(list(by_conn), timeout):
            handle = by_conn[conn]  # type: ignore[index]
            try:
                data = handle.conn.recv_bytes()
            except (EOFError, OSError):
                found.extend(self._bury(handle))
                continue
            found.extend(self._receive(handle, data))
        if self._ready and not self._handles:
            # Every worker died: the chunks ready for them come back unstarted, to be sent
            # again, which starts new workers (or stops the run, saying why none can start).
            found.extend(
                ChunkLost(chunk, "no worker is left to run it", started=False) for chunk, _ in self._ready
            )
            self._ready.clear()
        self._send_ready()
        return found

    def _send_ready(self) -> None:
        """Each worker with no chunk gets the next one ready, in the order they were submitted."""
        for handle in self._handles:
            if not self._ready:
                return
            if handle.in_flight:
                continue
            chunk, payload = self._ready.popleft()
            handle.in_flight.append(chunk)
            try:
                handle.conn.send_bytes(payload)
            except OSError:
                pass  # the worker is dead; events() notices and hands the chunk back as lost

    def _receive(self, handle: _WorkerHandle, data: bytes) -> list[Event]:
        """What one message from a worker means for the chunk it is running."""
        try:
            kind, detail = PICKLE.decode(data)
        except Exception as error:  # a result this process cannot rebuild (a class it cannot import)
            handle.committing = False
            reason = (
                f"the result sent by the worker process (pid {handle.pid}) could not be read "
                f"here ({type(error).__name__}: {error})"
            )
            return [handle.lose_first(reason, in_doubt=True)]
        handle.committing = kind == "committing"
        if kind == "settled":
            handle.settled.append(detail)
        if kind == "done":
            return [handle.finish_first(detail)]
        if kind == "lost":
            reason, in_doubt, traceback = detail
            return [handle.lose_first(reason, in_doubt=in_doubt, traceback=traceback)]
        return []

    def stop(self, *, cancel: bool = False) -> None:
        for handle in self._handles:
            if cancel:
                handle.kill()
                if not handle.pid:  # a forkserver worker still starting: it exits on the hang-up
                    handle.conn.close()
            else:
                try:
                    handle.conn.send(None)
                except OSError:
                    pass
        for handle in self._handles:
            if handle.reap(STOP_TIMEOUT) == "still running":
                handle.kill()
                handle.reap(STOP_TIMEOUT)
            handle.conn.close()
        self._handles = []
        if self._zygote is not None:
            self._stop_zygote()

    # -- starting and replacing workers ---------------------------------------------------

    def _launch(self) -> _WorkerHandle:
        """Start a worker; it is ready to work once ``_await_ready`` has returned."""
        parent_end, child_end = multiprocessing.Pipe()
        if self.start_method == "fork":
            process = multiprocessing.get_context("fork").Process(
                target=serve_forked, args=(child_end,), name="bulkpool-worker", daemon=True
            )
            process.start()
            pid = process.pid or 0
            reap = _reaper_of_process(process)
        elif self.start_method == "spawn":
            popen = _spawn_interpreter(["serve", str(child_end.fileno())], [child_end.fileno()])
            pid = popen.pid
            reap = lambda timeout: _reap_popen(popen, timeout)  # noqa: E731
        else:  # the zygote was bootstrapped once; its children start ready to work
            self._send_to_zygote(child_end)
            pid = 0  # known once it says it is ready
            reap = _reaper_of_forked_by_zygote(parent_end)
        child_end.close()
        if self.start_method != "forkserver":
            parent_end.send_bytes(self._bootstrap)
        return _WorkerHandle(parent_end, reap, pid)

    def _await_ready(self, handle: _WorkerHandle) -> None:
        kind, detail = _first_message(handle.conn, handle.reap)
        if kind == "failed":
            raise WorkerStartupError("A worker process failed to start.", detail)
        handle.pid = detail

    def _send_to_zygote(self, child_end: Connection) -> None:
        """Have the zygote fork a worker on ``child_end``; start the zygote first if there is
        none yet or it died."""
        if self._zygote is None:
            self._zygote = self._start_zygote()
        try:
            socket.send_fds(self._zygote[2], [b"F"], [child_end.fileno()])
        except OSError:  # it died: bury it, start another
            self._stop_zygote()
            self._zygote = self._start_zygote()
            socket.send_fds(self._zygote[2], [b"F"], [child_end.fileno()])

    def _replace_the_dead(self) -> None:
        """Top the pool up to its size: only when work is sent (or the pool grows), so none
        starts while draining. A worker killed while it started (or whose forkserver was)
        is started again, ``START_ATTEMPTS`` starts in all; a setup that raised is not."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._top_up()
                return
            except _DiedStarting as error:
                if attempt == START_ATTEMPTS:
                    raise WorkerStartupError(f"{error} It was started {START_ATTEMPTS} times.") from None
                logger.warning("%s Starting it again (start %d of %d).", error, attempt + 1, START_ATTEMPTS)

    def _top_up(self) -> None:
        """Start the missing workers side by side. One that fails to start takes those still
        starting with it; one that was killed lets them finish, and is raised after."""
        launched: list[_WorkerHandle] = []
        killed: _DiedStarting | None = None
        try:
            launched.extend(self._launch() for _ in range(self._size - len(self._handles)))
            for handle in list(launched):
                try:
                    self._await_ready(handle)
                except _DiedStarting as error:  # reaped: nothing left to kill
                    killed = killed or error
                    handle.conn.close()
                    launched.remove(handle)
                    continue
                self._handles.append(handle)
        except BaseException:
            for handle in launched:
                if handle not in self._handles:
                    handle.kill()
                    handle.conn.close()  # a forkserver worker still starting exits on the hang-up
                    handle.reap(STOP_TIMEOUT)
            raise
        if killed is not None:
            raise killed

    def _bury(self, dead: _WorkerHandle) -> list[Event]:
        """Reap a dead worker and hand back its chunks; ``submit`` starts its replacement."""
        ended = dead.reap(STOP_TIMEOUT)
        dead.conn.close()
        self._handles.remove(dead)
        reason = f"the worker process (pid {dead.pid}) died: {ended}"
        # A worker holds one chunk at a time (``_send_ready``): the one it had started.
        return [dead.lose_first(reason, in_doubt=dead.committing)] if dead.in_flight else []

    def _stop_zygote(self) -> None:
        assert self._zygote is not None
        process, conn, fd_socket = self._zygote
        fd_socket.close()  # tells the zygote to exit
        conn.close()
        if _reap_popen(process, STOP_TIMEOUT) == "still running":
            process.kill()
            process.wait()
        self._zygote = None

    def _start_zygote(self) -> tuple[subprocess.Popen[bytes], Connection, socket.socket]:
        parent_end, child_end = multiprocessing.Pipe()
        our_socket, its_socket = socket.socketpair()
        fds = [child_end.fileno(), its_socket.fileno()]
        popen = _spawn_interpreter(["zygote", *map(str, fds)], fds)
        child_end.close()
        its_socket.close()
        try:
            parent_end.send_bytes(self._bootstrap)
            kind, detail = _first_message(parent_end, lambda timeout: _reap_popen(popen, timeout))
            if kind == "failed":
                raise WorkerStartupError("The forkserver process failed to start.", detail)
        except BaseException:  # killed, timed out, Ctrl-C: leave nothing running or open
            our_socket.close()
            parent_end.close()
            popen.kill()
            popen.wait()
            raise
        return popen, parent_end, our_socket


def _first_message(conn: Connection, ended: Callable[[float], str]) -> tuple[str, Any]:
    """The process's first message; raise if it ended first (``ended`` waits to say how)."""
    if not conn.poll(START_TIMEOUT):
        raise WorkerStartupError(f"A worker process did not start within {START_TIMEOUT:.0f}s.")
    try:
        message: tuple[str, Any] = conn.recv()
    except (EOFError, OSError):
        how = ended(EXIT_WAIT)  # its pipe closes a moment before it can be reaped
        raise (_DiedStarting if how in _KILLED else WorkerStartupError)(
            f"A worker process exited before it was ready ({how}); its error output, if any, is above."
        ) from None
    return message


def _spawn_interpreter(args: list[str], fds: list[int]) -> subprocess.Popen[bytes]:
    """A fresh Python that can import bulkpool; it never imports the caller's ``__main__``."""
    package_root = str(Path(__file__).resolve().parents[2])  # the folder bulkpool/ is in
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCH_CODE, *args],
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # Ctrl-C at the terminal reaches the parent only
    )


def _reaper_of_process(process: Any) -> Callable[[float], str]:
    def reap(timeout: float) -> str:
        process.join(timeout)
        return _describe_exit(process.exitcode)

    return reap


def _result(chunk: Chunk, settled: list[tuple[int, ErrorInfo | None, bytes | None]]) -> ChunkResult | None:
    """The outcome of a lost chunk's first items, settled before it was lost (each_item)."""
    if not settled:
        return None
    result = ChunkResult(chunk.number, [])
    for offset, error, blob in settled:
        value = None
        try:
            value = None if blob is None else pickle.loads(blob)
        except Exception as unreadable:
            error = error or _unreadable_value(unreadable)
        if error is not None:
            result.errors[offset] = error
        assert result.values is not None
        result.values.append(value)
    return result


def _unreadable_value(error: Exception) -> ErrorInfo:
    info = ErrorInfo.from_exception(error)
    message = f"it was written, but its return value could not be read here: {info.exc_type}: {info.message}"
    return ErrorInfo(info.exc_type, message, info.traceback, unsafe=True)


def _reap_popen(popen: subprocess.Popen[bytes], timeout: float) -> str:
    try:
        return _describe_exit(popen.wait(timeout))
    except subprocess.TimeoutExpired:
        return "still running"


def _reaper_of_forked_by_zygote(conn: Connection) -> Callable[[float], str]:
    # The zygote reaps its own children; the parent only sees the pipe close.
    def reap(timeout: float) -> str:
        try:
            if conn.closed or not conn.poll(timeout):
                return "still running" if not conn.closed else "exited"
            while conn.poll(0):
                conn.recv_bytes()
        except (EOFError, OSError):
            return "exited"
        return "still running"

    return reap


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


# How a process killed from outside ends (the OOM killer, kill, a closed terminal); a crash
# (SIGSEGV, SIGABRT) or an exit code of its own would happen again. A forkserver's worker
# ends unseen by us ("exited"): its parent died, most likely.
_KILLED = {_describe_exit(-signum) for signum in (signal.SIGKILL, signal.SIGTERM, signal.SIGHUP)} | {"exited"}


def _unpicklable_chunk(chunk: Chunk, error: Exception) -> ChunkResult:
    """Fail, without running it, a chunk that cannot be sent to a worker; the message says why."""
    problem = ErrorInfo(
        "bulkpool.NotRun",
        f"not run: this item's chunk cannot be sent to a worker process "
        f"({type(error).__name__}: {error}); items must be picklable",
        "",
    )
    return ChunkResult(chunk.number, None, dict.fromkeys(range(len(chunk)), problem))


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
