"""Ctrl-C (or SIGTERM) while a partial report is being saved: a second signal must not lose what the first
one kept."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Optional


def ignore() -> Optional[Any]:
    """Ignore SIGINT from now on; returns the handler to give back to :func:`restore` (None off the main
    thread, where Python cannot change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.SIG_IGN)


def restore(previous: Optional[Any]) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def shielded(*, sigterm: bool = False) -> Iterator[None]:
    """Ignore SIGINT (and SIGTERM, with ``sigterm``: a scheduler or torchrun that already sent one follows
    it with SIGKILL after a grace period, so the report is written first) for the block's length."""
    previous = ignore()
    term = None
    if sigterm and threading.current_thread() is threading.main_thread():
        term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        restore(previous)
        if term is not None:
            signal.signal(signal.SIGTERM, term)
