"""The Monitor's flight recorder: with ``output=``, the report is written when the run ends, however it ends.

``with Monitor(model, output="gradscope.json") as monitor:`` writes the report at the end of the block:
the whole report after a normal end, and a partial one, marked with the reason and the last step
observed, when the loop raised, was interrupted by Ctrl-C, or was sent SIGTERM (as a scheduler does on
preemption; inside the block SIGTERM raises :class:`Terminated`, which exits 143 once the report is
written). The file is replaced atomically, and a second Ctrl-C while it is written does not lose it.
Under several ranks every rank builds the report after a normal end and rank 0 writes it; after a
failure nothing is written there, since building it takes collectives a dead rank would never join.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional, Union

from . import interrupts, outputs  # no torch here: the callbacks' display side imports this module
from .errors import EXIT_INTERRUPTED, EXIT_USAGE

PathLike = Union[str, Path]


class Terminated(SystemExit):
    """SIGTERM inside a recording Monitor's block: ends the process with 143, as the signal itself would
    (128 + 15), after the report is written."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def arm() -> Optional[Any]:
    """Make SIGTERM raise :class:`Terminated`; returns the handler to give back to :func:`disarm` (None off
    the main thread, where Python cannot set handlers, or where SIGTERM is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return None

    def terminated(signum, frame) -> None:
        raise Terminated()
    signal.signal(signal.SIGTERM, terminated)
    return previous


def disarm(previous: Optional[Any]) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def terminated(exc_type: Optional[type]) -> bool:
    """Whether the run ended on SIGTERM: our :class:`Terminated`, or Lightning's ``SIGTERMException``, which
    its loops raise after its own SIGTERM handler has run (matched by name: no Lightning import here)."""
    return exc_type is not None and (issubclass(exc_type, Terminated) or
                                     any(k.__name__ == "SIGTERMException" for k in exc_type.__mro__))


def reason(exc_type: Optional[type], exc: Optional[BaseException], steps: int) -> Optional[str]:
    """Why the run stopped, in words (None after a normal end)."""
    if exc_type is None:
        return None
    if terminated(exc_type):
        why = "terminated by SIGTERM"
    elif issubclass(exc_type, KeyboardInterrupt):
        why = "interrupted by Ctrl-C"
    else:
        message = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
        why = f"the training loop raised {exc_type.__name__}" + (f": {message}" if message else "")
    return f"{why}, after {steps} observed step{'s' if steps != 1 else ''}"


def exit_code(exc_type: Optional[type]) -> int:
    """The exit code a partial report's verdict carries: the process's own, as far as it is known."""
    if terminated(exc_type):
        return 128 + signal.SIGTERM
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_USAGE


def record(monitor: Any, output: PathLike, rules: Any, exc_type: Optional[type], exc: Optional[BaseException]) -> None:
    """Write ``monitor``'s report to ``output`` in the format its suffix names (see ``formats.format_for``)."""
    from . import distributed
    from .formats import FORMATS, format_for
    from .gate import decide, unfinished
    ctx = distributed.context()
    why = reason(exc_type, exc, monitor.steps)
    if monitor.steps == 0 or (ctx is not None and why is not None):
        return
    with interrupts.shielded():  # the run is over; what it measured is saved whatever is pressed now
        report = monitor.report(rules, stopped_reason=why)
        if ctx is not None and ctx.rank != 0:
            return
        verdict = decide(report, "never") if why is None else unfinished(report, "never", why, exit_code(exc_type))
        outputs.write(output, FORMATS[format_for(str(output))](report, verdict), "report")
