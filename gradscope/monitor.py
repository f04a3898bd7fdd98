"""The Monitor: the Observer of the hot path, with the report and the flight recorder at the edge.

:class:`~gradscope.collect.observer.Observer` measures inside the training loop and writes nothing. This
class adds what happens at the end: ``report()`` (the analysis loads when it is asked for) and, with
``output=``, the flight recorder that writes the report however the run ends (``gradscope.recorder``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import recorder
from .collect.layers import unwrap
from .collect.observer import Observer
from .collect.options import MonitorOptions
from .live import LiveLog


class Monitor(Observer):
    """Observe a model's gradients in your own training loop.

    Call ``observe()`` once per optimizer step, after ``backward()`` and before clipping and
    ``optimizer.step()``; call ``report()`` at the end.

    Its options are one :class:`~gradscope.collect.options.MonitorOptions` (``Monitor(model,
    MonitorOptions(every=4))``), or the same keywords given to the Monitor itself (``Monitor(model,
    every=4)``), the short form.

    What is exact and what is sampled: norms, max |g|, sums and non-finite counts use every element at
    every step. The |g| histogram (quantiles, kurtosis, zero fraction) and the step-to-step cosine read
    every element of parameters under 65,536 elements and one block of 1024 in ``histogram_sample`` of
    larger ones (1 reads every element); the histogram is counted every ``histogram_every`` steps.
    Weight norms and the update-to-weight ratio are read every ``update_every`` steps, the update as
    the change in the weights from that observation to the next one (or to ``report()`` for the last
    step); 1 reads them every step.

    When the figures reach the host: each step's stay on the device, and every ``flush_every`` steps
    they move in one copy, so a step in between never waits for the device. Reading a figure off an
    :class:`Observation`, ``report()``, ``profile()``, ``flush()`` and an enabled GradScaler flush at once.
    The figures are the same whatever ``flush_every`` is.

    ``optimizer``, when given, tells the report whether the optimizer keeps a second moment of the
    gradient (Adam's family), for which the advice arms the skip-step guard, as diagnose's does.

    ``nonfinite_window``: when a gradient or the global norm first goes non-finite, the report keeps the
    per-layer norms, max |g| and non-finite counts of that step and the ``nonfinite_window - 1`` before
    it, every one of them however long the run was (0 keeps none).

    ``clip``: how your loop clips, to report what it did over the run (see ``gradscope.collect.clipping``): a
    number (a norm threshold, as ``clip_grad_norm_(params, 1.0)`` or ``max_grad_norm``), a pair such as
    ``("value", 0.5)`` or ``("agc", 0.01)``, or the :class:`~gradscope.Clipper` that clips (whose guard's
    counts join the report). The Monitor still measures the gradients before clipping: the post-clip
    norm, the clip rate and, by value or AGC, the share capped and the cosine follow from them.

    ``output`` (a path; its suffix picks the format, as the callbacks' does) makes it a flight
    recorder: ``with Monitor(model, output="gradscope.json") as monitor:`` writes the report (under
    ``rules``) when the block ends, whole after a normal end and marked partial, with the reason and the
    last step, when the loop raised, was interrupted, or got SIGTERM (see ``gradscope.recorder``).

    ``log`` (an option) streams each step's figures to a dashboard while the run goes on, and the findings
    (under ``rules``) as they happen: a function ``sink(metrics, step)``, ``"wandb"``, ``"mlflow"``,
    ``"tensorboard"``, a ``SummaryWriter``, or a :class:`~gradscope.LiveLog` for its options. They go out
    at the flush, with no host sync of their own; see ``gradscope.live``.

    What it leaves on your model: it registers one gradient hook per parameter for the first backward
    only (to learn the backward order), and removes them at the first ``observe()`` or at ``close()``.
    It never changes weights, gradients, modes or ``requires_grad``. It keeps one copy of the weights
    and two float32 gradient samples (2/histogram_sample of the gradient's size, or less).
    """

    def __init__(self, model: nn.Module, options: Optional[MonitorOptions] = None, *, parameters=None,
                 optimizer: Optional[torch.optim.Optimizer] = None, clip=None,
                 output: Optional[Union[str, Path]] = None, rules=None, **short) -> None:
        self._flight = recorder.Flight(output, rules)  # a destination that cannot be written fails now
        options = MonitorOptions.of(options, short)
        live = LiveLog.of(options.log)  # a destination gradscope cannot log to fails now too
        super().__init__(model, options, parameters=parameters, optimizer=optimizer, clip=clip)
        if live is not None:
            live.attach([self.layers[i].name for i in self._active], self.recorded, rules,
                        None if self._watched is None else self._watched.clipper)
            self._ledger.listener = live

    output = property(lambda self: self._flight.output)
    rules = property(lambda self: self._flight.rules)

    def report(self, rules=None, *, name: Optional[str] = None, stopped_reason: Optional[str] = None,
               alone: bool = False):
        """Statistics, findings and a recommendation for everything observed: a :class:`Report`
        (``stopped_reason`` marks it partial: why the run ended early; ``alone``: see ``profile``)."""
        from .pipeline import build_report  # the analysis (rules, scipy) loads when a report is asked for
        # the Profile is read at once and dropped (the statistics copy what they keep): its series as views
        report = build_report(self._profile(alone, copy=False), rules=rules,
                              model_name=name or type(unwrap(self.model)).__name__, stopped_reason=stopped_reason)
        self._ledger.listener.end(closing=False)  # the live log sends the last step too
        return report

    def close(self) -> None:
        """Remove any hook still on the model, free the gradient copies, and end the live log (``log=``)."""
        super().close()
        self._ledger.listener.end(closing=True)

    def __enter__(self) -> "Monitor":
        self._flight.take_off()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Remove the hooks; with ``output``, write the report however the block ended (see
        ``gradscope.recorder``): a failure to write it is one line on stderr, and the run's own exception
        goes on."""
        self._order.remove()
        try:
            self._flight.land(self, exc_type, exc)
        finally:
            if exc_type is None:
                self.flush()  # the steps still on the device reach the live log too
            # after a failure the device is left alone (it may be what failed): the steps on the host go
            self._ledger.listener.end(closing=True)
