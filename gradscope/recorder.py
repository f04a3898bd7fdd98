"""The Monitor's flight recorder: with ``output=``, the report is written when the run ends, however it ends.

``with Monitor(model, output="gradscope.json") as monitor:`` writes the report at the end of the block:
the whole report after a normal end, and a partial one, marked with the reason and the last step
observed, when the loop raised, was interrupted by Ctrl-C, or was sent SIGTERM (as a scheduler does on
preemption; inside the block SIGTERM raises :class:`Terminated`, which exits 143 once the report is
written). The file is replaced atomically, and a second Ctrl-C while it is written does not lose it.
Under several ranks every rank builds the report after a normal end and rank 0 writes it. After a
failure no rank can count on the others joining a collective: a rank other than 0 leaves its reason in
the process group's store, and rank 0 builds its report alone (the steps observed so far were reduced
over the ranks as they went; see ``Monitor.profile(alone=True)``), naming every rank that stopped.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Union

from . import interrupts, outputs  # no torch here: the callbacks' display side imports this module
from .errors import EXIT_INTERRUPTED, EXIT_USAGE

PathLike = Union[str, Path]
MESSAGE_CHARS = 160  # an error's first line is kept to this length in the stopped reason


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


def hold(previous: Optional[Any]) -> None:
    """Replace an armed handler (``previous``: what :func:`arm` returned) with SIGTERM ignored, in one step:
    the report is being written, and torchrun or a scheduler that sent SIGTERM follows it with SIGKILL
    after a grace period. Swapping the handler straight for the ignore leaves no moment in which the
    signal's default action would end the process before the report is written."""
    if previous is not None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
        message = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 1].rstrip() + "…"
        why = f"the training loop raised {exc_type.__name__}" + (f": {message}" if message else "")
    return f"{why}, after {steps} observed step{'s' if steps != 1 else ''}"


def exit_code(exc_type: Optional[type]) -> int:
    """The exit code a partial report's verdict carries: the process's own, as far as it is known."""
    if terminated(exc_type):
        return 128 + signal.SIGTERM
    if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_USAGE


def partial_report(monitor: Any, rules: Any, exc_type: type, exc: Optional[BaseException],
                   name: Optional[str] = None) -> Optional[Any]:
    """The report of a run that ``exc`` ended, marked partial with the reason; None where this process
    writes none: under several ranks, a rank other than 0 leaves its reason in the store for rank 0,
    which builds its report alone (no collective: a peer may be dead) and names every rank that stopped."""
    import time

    from .collect import distributed
    ctx = distributed.context()
    why = reason(exc_type, exc, monitor.steps)
    if ctx is not None and ctx.rank != 0:
        distributed.post_stopped(ctx, why)
        return None
    if ctx is not None:  # every rank that stopped, the first first: usually the cause of the others' errors
        stopped = sorted([(time.time(), 0, why), *distributed.stopped_peers(ctx)])
        why = "; then ".join(f"rank {rank}{' stopped first' if k == 0 else ''}: {words}"
                             for k, (_, rank, words) in enumerate(stopped))
    return monitor.report(rules, name=name, stopped_reason=why, alone=ctx is not None)


def record(monitor: Any, output: PathLike, rules: Any, exc_type: Optional[type], exc: Optional[BaseException]) -> None:
    """Write ``monitor``'s report to ``output`` in the format its suffix names (see ``formats.format_for``)."""
    from .collect import distributed
    from .gate import decide, unfinished
    if monitor.steps == 0:
        return
    with interrupts.shielded(sigterm=True):  # the run is over; what it measured is saved whatever is sent now
        if exc_type is None:
            report = monitor.report(rules)  # every rank builds it (collectives); rank 0 writes it
            ctx = distributed.context()
            if ctx is not None and ctx.rank != 0:
                return
            verdict = decide(report, "never")
        else:
            report = partial_report(monitor, rules, exc_type, exc)
            if report is None:
                return
            verdict = unfinished(report, "never", report.stopped_reason, exit_code(exc_type))
        outputs.write_reports(output, [report], [verdict])


class Flight:
    """A Monitor's flight recorder: where its report goes (``output``, under ``rules``) however its
    ``with`` block ends. A destination that cannot be written fails at once, not at the end of the run."""

    def __init__(self, output: Optional[PathLike], rules: Any) -> None:
        if output is not None:
            outputs.check(output, "report")
        self.output, self.rules = output, rules
        self._previous: Optional[Any] = None  # the SIGTERM handler armed over

    def take_off(self) -> None:
        """The block begins: SIGTERM raises from here (with an output), so that the report is written."""
        if self.output is not None:
            self._previous = arm()

    def land(self, monitor: Any, exc_type: Optional[type], exc: Optional[BaseException]) -> None:
        """The block ended: write the report, whole or marked partial. A failure to write it is one line on
        stderr when the run raised (its own exception goes on), and raises after a normal end."""
        previous, self._previous = self._previous, None
        if self.output is None:
            disarm(previous)
            return
        hold(previous)  # SIGTERM ignored from here, with no moment in which it would kill
        try:
            record(monitor, self.output, self.rules, exc_type, exc)
        except Exception as error:
            if exc_type is None:
                raise
            sys.stderr.write(f"gradscope: the report could not be written to {self.output}: {error}\n")
        finally:
            disarm(previous)
