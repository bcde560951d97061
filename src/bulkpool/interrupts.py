"""Ctrl-C and SIGTERM while a run goes on: a flag for the engine, not an exception anywhere."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM while a run goes on, in the main thread.

    The first sets ``received``, which the engine reads between events: it stops sending
    work and drains the chunks in flight. A second raises ``KeyboardInterrupt`` where the
    caller's thread is, which abandons them. Elsewhere than the main thread no handler can
    be installed, and nothing changes.
    """

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self) -> None:
        self.received = ""
        self._raise = False
        self._previous: dict[int, Any] = {}

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Meanwhile, the first signal raises at once too (while workers start: nothing to wait for)."""
        self._raise = True
        try:
            if self.received:
                raise KeyboardInterrupt
            yield
        finally:
            self._raise = False

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in self.NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        first = not self.received
        self.received = self.received or self.NAMES.get(signal.Signals(signum), signal.Signals(signum).name)
        if self._raise or not first:
            raise KeyboardInterrupt
