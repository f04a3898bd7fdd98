"""The Monitor's options: one frozen, validated object (pure: no torch), as diagnose's TrialOptions is.

``Monitor(model, MonitorOptions(every=4, history=4096))``, or the short form for the common case,
``Monitor(model, every=4)``: the keywords are MonitorOptions' own, and an unknown one is an error.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ExperimentError

# Rows wait on the device this many steps before one copy moves them to the host. A sync drains the
# accelerator's launch queue, so syncing every step would stall a GPU step on the Monitor; 16 rows of a
# 1,000-layer model are about 1 MB of device memory, and a report, a figure read off an Observation or
# a GradScaler (which syncs each step itself) flushes at once, so nothing waits longer than it must.
FLUSH_EVERY = 16
# Steps whose per-layer figures are kept whole before the first non-finite gradient: a ring of this many
# rows of three figures per layer (32 × 1,000 layers × 3 × 8 bytes = 768 kB), frozen at the failure.
NONFINITE_WINDOW = 32
# The options counted in calls or steps, each at least 1.
AT_LEAST_ONE = ("every", "accumulation_steps", "update_every", "histogram_sample", "histogram_every", "flush_every",
                "history")


@dataclasses.dataclass(frozen=True)
class MonitorOptions:
    """What a Monitor measures, and how often.

    ``every``: observe every N-th optimizer step (the steps between cost nothing but their neighbours'
    bookkeeping). ``accumulation_steps``: ``observe()`` calls per optimizer step, when you call it after
    every backward of a gradient accumulation. ``update_every``: read the weights' norms and the
    update-to-weight ratio every N observed steps. ``histogram_sample``: the |g| histogram and the
    step-to-step cosine read one block of 1024 in N of each parameter of 65,536 elements or more (1
    reads every element). ``histogram_every``: count the histogram every N observed steps. ``history``:
    observed steps kept in the per-step series (older ones are thinned). ``flush_every``: rows waiting
    on the device before one copy moves them to the host. ``nonfinite_window``: steps whose per-layer
    figures are kept whole up to the first non-finite gradient (0 keeps none). ``log``: where the live log
    goes while the run goes on (a function ``sink(metrics, step)``, ``"wandb"``, ``"mlflow"``,
    ``"tensorboard"``, a ``SummaryWriter`` or a ``gradscope.LiveLog``; see ``gradscope.live``); the
    public Monitor reads it, at the edge, and the hot path only tells it of each step on the host.
    """

    every: int = 1
    accumulation_steps: int = 1
    update_every: int = 4
    histogram_sample: int = 4
    histogram_every: int = 4
    history: int = 1024
    flush_every: int = FLUSH_EVERY
    nonfinite_window: int = NONFINITE_WINDOW
    log: Any = None

    def __post_init__(self) -> None:
        for name in AT_LEAST_ONE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExperimentError(f"{name} must be a whole number of at least 1, not {value!r}",
                                      "1 measures (or flushes) every call or step")
        window = self.nonfinite_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ExperimentError(f"nonfinite_window must be a whole number of steps, not {window!r}",
                                  "pass 0 to keep no steps before a non-finite gradient, or a count such as 32")

    @classmethod
    def of(cls, options: "MonitorOptions | None", short: dict) -> "MonitorOptions":
        """``options`` (the defaults where None) with the short form's keywords ``short`` put over it."""
        if options is not None and not isinstance(options, cls):
            raise ExperimentError(f"options must be a MonitorOptions, not {type(options).__name__}",
                                  "pass MonitorOptions(every=4, ...), or the same keywords to the Monitor itself")
        unknown = sorted(set(short) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"Monitor() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(map(repr, unknown))}")
        return dataclasses.replace(options or cls(), **short)
