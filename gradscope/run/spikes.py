"""Which of the profile's steps to take apart sample by sample, decided as each step is observed.

diagnose reads every profiled step's figures at once (it stops at a non-finite loss), so it can tell a
spike when it happens, while the step's batch and weights are still there: the per-sample recompute
(gradscope.collect.culprits) then runs before ``optimizer.step()``, and a step that is not a spike costs
one comparison. A step is taken apart when:

- it is a spike as the ``gradient-spike`` rule judges one: its global norm's z-score against the steps
  before it reaches the rule's ``z``, and the norm is ``peak_over_median`` times the median of those
  steps; or
- its gradient is the first not to be finite.

At most MOST_SPIKES spikes per profile (the first ones: a run that spikes again and again is hot
everywhere, and its first spike is the one that says why), and the first non-finite step. Under a process
group no step is taken apart: each rank holds only its own share of the batch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, List, Mapping

import numpy as np

from ..analyse.profile import SpikeSamples
from ..analyse.ruleset import RuleSet
from ..collect.culprits import LossOf, per_sample

MOST_SPIKES = 3
Z, PEAK_OVER_MEDIAN = 6.0, 5.0  # the gradient-spike rule's defaults, where a rule set leaves it out


class SpikeWatch:
    """Watches the profile's steps (``see``) and keeps the per-sample records of the spikes (``found``)."""

    def __init__(self, rules: RuleSet, model: Any, loss_of: LossOf, enabled: bool = True) -> None:
        rule = rules.get("gradient-spike")
        params = rule.params if rule is not None else {}
        self.z, self.peak = float(params.get("z", Z)), float(params.get("peak_over_median", PEAK_OVER_MEDIAN))
        self.model, self.loss_of = model, loss_of
        self.norms: List[float] = []
        self.found: List[SpikeSamples] = []
        self._nonfinite_seen = not enabled  # (a run that takes nothing apart: as if both were spent)
        self._most = MOST_SPIKES if enabled else 0
        self._previous: Any = None  # the last step's batch, as a thunk that puts it on the device

    def see(self, step: int, out: Mapping[str, float], batch: Callable[[], Any], drawn: Any) -> None:
        """One observed step, before its optimizer step: take its batch apart if it is a spike.
        ``batch()`` gives the batch on the model's device; ``drawn`` is the batch as drawn, kept to replay."""
        norm, z = float(out["global_norm"]), float(out.get("spike_z", math.nan))
        why = None
        if not math.isfinite(norm) or out.get("nonfinite", 0.0) > 0:
            why = None if self._nonfinite_seen else "nonfinite"
            self._nonfinite_seen = True
        elif z >= self.z and self.norms and norm > self.peak * float(np.median(self.norms)):
            why = "spike"
        if math.isfinite(norm):
            self.norms.append(norm)
        previous, self._previous = self._previous, batch
        if why is None or (why == "spike" and sum(r.why == "spike" for r in self.found) >= self._most):
            return
        record = per_sample(self.model, batch(), self.loss_of, step=step, global_norm=norm, z=z, why=why,
                            previous=None if previous is None else previous())
        self.found.append(dataclasses.replace(record, batch=drawn))
