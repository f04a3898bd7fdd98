"""Ctrl-C while a partial report is being saved: a second press must not lose what the first one kept."""
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
def shielded() -> Iterator[None]:
    previous = ignore()
    try:
        yield
    finally:
        restore(previous)
