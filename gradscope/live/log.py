"""The live log: a Monitor's figures streamed to a dashboard while the run goes on.

``Monitor(model, log=sink)`` (and ``log=`` on the Lightning and Trainer callbacks and the Accelerate helper)
sends each observed step's metrics (see :mod:`gradscope.live.keys`) to ``sink`` (see
:mod:`gradscope.live.sinks`), and the findings as they happen (see :mod:`gradscope.live.findings`).

When: at the Monitor's flush, when the figures reach the host anyway (every ``flush_every`` steps, 16 by
default, or when a figure is read). It adds no host sync to any step. The step numbers are the
optimizer's, counted from ``start`` (a callback passes its trainer's global step). A step goes out
with the flush after the next one is recorded, or at ``report()``, ``close()`` or the end of the ``with``
block, so that a loss noted after its step (``note_loss``) goes with it.

Under several processes only rank 0 logs: the figures are the same on every rank.

It never stops training: a sink that raises is one warning, and the live log stops for the rest of the
run; the report is unaffected.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, List, Optional, Sequence

from ..analyse.profile import Profile
from ..collect import distributed
from ..collect.ledger import StepListener, StepRecord
from ..errors import GradscopeError
from .findings import EVERY_S, Event, LiveFindings, check
from .keys import LAYERS, TOP, Keys
from .sinks import Rows, Sink, sink_of


class LiveLog(StepListener):
    """Stream a Monitor's figures to ``sink`` (a function ``sink(metrics, step)``, ``"wandb"``,
    ``"mlflow"``, ``"tensorboard"``, a ``SummaryWriter`` or a :class:`~gradscope.live.sinks.Sink`).

    ``layers``: log every layer's norm up to this many layers; past it the ``top`` largest of each step and
    the per-group norms. ``findings``: the least severity sent as an event (None: none). ``findings_every``:
    the seconds between two evaluations of the rules (a non-finite figure evaluates at once). ``start``: the
    optimizer step the Monitor's first step is (a resumed run's global step).

    ``Monitor(model, log=...)`` takes any of these, or a LiveLog for the options.
    """

    def __init__(self, sink: Any, *, layers: int = LAYERS, top: int = TOP, findings: Optional[str] = "warning",
                 findings_every: float = EVERY_S, start: int = 0) -> None:
        self.sink: Sink = sink_of(sink)
        self.options = {"every_layer": layers, "top": top}
        self.findings_level, self.findings_every, self.start = findings, findings_every, int(start)
        check(findings, findings_every)  # a bad option fails here, not at the first flush
        for name, value, least in (("layers", layers, 0), ("top", top, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise GradscopeError(f"{name}={value!r}", f"give a whole number of layers, at least {least}")
        self._keys: Optional[Keys] = None
        self._findings: Optional[LiveFindings] = None
        self._recorded: Callable[[], Profile] = lambda: None
        self._clipper: Any = None
        self._held: Optional[StepRecord] = None
        self._last = -1  # the last step recorded
        self._steps = 0  # steps recorded
        self._rows: Rows = []
        self._failing = False
        self.on = True

    @classmethod
    def of(cls, log: Any) -> Optional["LiveLog"]:
        """``log`` as a LiveLog (None stays None)."""
        return log if log is None or isinstance(log, cls) else cls(log)

    def attach(self, layers: Sequence[str], recorded: Callable[[], Profile], rules: Any = None,
               clipper: Any = None) -> None:
        """Start logging the layers ``layers`` (the Monitor's active layers); ``recorded`` gives the profile
        recorded so far, for the findings under ``rules`` (a RuleSet, a path, or None for the default);
        ``clipper``: the Clipper whose guard's skips are logged."""
        from ..analyse.ruleset import RuleSet, load_rules  # the rule files load with a live log, not the Monitor
        if self._keys is not None:
            raise GradscopeError("this LiveLog already logs a Monitor", "give each Monitor a LiveLog of its own")
        self._keys = Keys(layers, **self.options)
        rule_set = rules if isinstance(rules, RuleSet) else load_rules(rules)
        self._findings = LiveFindings(rule_set, self.findings_level, self.findings_every)
        self._recorded, self._clipper = recorded, clipper
        ctx = distributed.context()
        self.on = ctx is None or ctx.rank == 0

    # -- the Ledger's listener -------------------------------------------------------------------------
    def step(self, record: StepRecord) -> None:
        if not self.on:
            return
        self._failing |= not (math.isfinite(record.global_norm) or record.amp_skipped) or (
            record.loss_given and not math.isfinite(record.loss))
        self._release()
        self._held, self._last, self._steps = record, record.step, self._steps + 1

    def loss(self, step: int, value: float) -> None:
        held = self._held
        if held is not None and held.step == step:
            self._held = held._replace(loss=value, loss_given=True)

    def flushed(self) -> None:
        if not self.on or (self._held is None and not self._rows):
            return
        failing, self._failing = self._failing, False
        events: List[Event] = []
        if self._findings is not None and self._findings.due(failing, self._steps):
            events = self._guarded(lambda: self._findings.new(self._recorded(), self.start + self._last), [])
        self._send(events)

    def end(self, closing: bool) -> None:
        """The Monitor reported (send the step held back) or closed (that, and the sink makes its log durable;
        the live log is over)."""
        if not self.on:
            return
        self._release()
        self._send([])
        if closing:
            self._guarded(self.sink.finish)
            self.on = False

    # -- inside ------------------------------------------------------------------------------------------
    def _release(self) -> None:
        """The held step goes into the rows to send."""
        held, self._held = self._held, None
        if held is not None and self._keys is not None:
            self._rows.append((self._keys.metrics(held), self.start + held.step))

    def _send(self, events: List[Event]) -> None:
        rows, self._rows = self._rows, []
        if rows:
            self._guarded(lambda: self.sink.metrics(self._with_guard(rows)))
        for event in events:
            self._guarded(lambda: self.sink.event(event))

    def _with_guard(self, rows: Rows) -> Rows:
        """The Clipper's skips so far on the last row: one copy to the host per flush, not per step."""
        if self._clipper is not None and self._clipper.skip is not None:
            rows[-1][0]["guard/skipped"] = float(self._clipper.counts().get("skipped", 0))
        return rows

    def _guarded(self, call: Callable[[], Any], default: Any = None) -> Any:
        """Call into the sink or the rules; a failure is one warning and the end of the live log."""
        if not self.on:
            return default
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - a dashboard must never stop a training run
            self.on = False
            what = str(error).splitlines()[0] if str(error) else type(error).__name__
            warnings.warn(f"gradscope: the live log to {self.sink!r} stopped: {what}. Training goes on, and the "
                          "report at the end is unaffected.", RuntimeWarning, stacklevel=2)
            return default
