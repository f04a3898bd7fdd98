"""Why the run went wrong, as far as the figures tell: the likely cause of a spike, a divergence or a stall.

Read from the statistics and the findings, never from a new measurement. One cause is named, the first
of these whose evidence holds, in this order (the most specific evidence first):

0. ``optimizer``: it holds none of the model's parameters, so nothing the run shows is training;
1. ``data``: the rules that read the spike's batch taken apart say so: ``spike-from-few-samples`` (at
   most two samples carry it, and the same weights do fine on the batch before; or they alone were
   non-finite), else ``spike-from-one-batch`` (at the spike's weights, the batch's loss is 4 times the
   loss of the batch before it: the batch is the outlier, not the weights);
2. ``optimizer``: Adam's eps outweighs the gradient for most of some layer's weights (a stall);
3. ``numerics``: a value went non-finite while the gradient norm had not risen before it (an overflow
   in the forward or backward pass, not a run that grew into it);
4. ``learning_rate``: the gradient norm or the loss grew step over step, or blew up, and the steps moved
   some layer's weights by a large share of their norm (the ``large-update-ratio`` rule: a hot rate does
   that; a run that grows while its steps stay small has some other cause, and none is named);
5. ``optimizer``: a spike under an Adam whose beta2 remembers hundreds of steps, with none of the above.

No cause is named for a run with no trouble, nor for a lone spike that none of these explains.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from ..analyse.evaluate import Finding, spike_words
from ..analyse.stats import Statistics
from .reasons import Reasons, because

NUMERICS_RISE = 10.0  # a norm that rose less than this over its start before going non-finite did not grow into it
BETA2 = 0.99
GROWTH = ("global-norm-growing", "global-norm-rising", "global-norm-blowup", "loss-diverging",
          "unclipped-unstable-in-trials")
TROUBLE = GROWTH + ("nonfinite-gradients", "nonfinite-loss", "gradient-spike", "adam-epsilon-dominates")


@dataclasses.dataclass(frozen=True)
class Cause:
    kind: str  # "data", "optimizer", "numerics" or "learning_rate"
    reasons: Reasons


def likely_cause(statistics: Statistics, findings: Sequence[Finding]) -> Optional[Cause]:
    """The likely cause of the trouble the findings name, with the figures behind it; None where none."""
    fired = {f.rule_id for f in findings}
    if "optimizer-misses-parameters" in fired:
        return Cause("optimizer", (because("cause_missed"),))
    if not fired.intersection(TROUBLE):
        return None
    model = statistics.model
    m = model.metrics
    ratio = m.get("spike_loss_over_previous", math.nan)
    if "spike-from-few-samples" in fired:
        return Cause("data", (because("cause_data", samples=spike_words(model.spikes), ratio=ratio),))
    if "spike-from-one-batch" in fired:
        spike = model.spikes[0]  # the one the rule read (stats.spike_metrics)
        if spike.nonfinite_inputs or not math.isfinite(ratio):  # samples that hold an inf or a NaN: name them
            return Cause("data", (because("cause_data", samples=spike_words(model.spikes), ratio=ratio),))
        return Cause("data", (because("cause_batch", step=spike.step, ratio=ratio, loss=spike.batch_loss,
                                      previous=spike.previous_loss),))
    if "adam-epsilon-dominates" in fired:
        shares = [f.observed.get("adam_eps_dominated_share", math.nan) for f in findings
                  if f.rule_id == "adam-epsilon-dominates"]
        layers = [f.layer for f in findings if f.rule_id == "adam-epsilon-dominates"]
        return Cause("optimizer", (because("cause_eps", eps=m.get("optimizer_eps", math.nan), layers=len(layers),
                                           first=layers[0], share=float(np.nanmax(shares))),))
    nonfinite = m.get("nonfinite_count", 0) > 0 or m.get("loss_nonfinite", 0) > 0
    rise = m.get("global_norm_peak_over_start", math.nan)
    grew = fired.intersection(GROWTH) - {"loss-diverging", "unclipped-unstable-in-trials"}
    if nonfinite and not grew and not rise >= NUMERICS_RISE:
        where = model.first_nonfinite
        return Cause("numerics", (because("cause_numerics", step=_first_step(model), rise=rise,
                                          layer=where[1] if where else None),))
    if (fired.intersection(GROWTH) or nonfinite) and "large-update-ratio" in fired:
        ratios = [layer.metrics.get("update_ratio_median", math.nan) for layer in statistics.active_layers]
        ratio = float(np.nanmax(ratios)) if any(np.isfinite(ratios)) else math.nan
        return Cause("learning_rate", (because("cause_learning_rate", growth=m.get("global_norm_growth", math.nan),
                                               rise=rise, update_ratio=ratio),))
    if "gradient-spike" in fired and m.get("optimizer_beta2", math.nan) >= BETA2:
        return Cause("optimizer", (because("cause_beta2", beta2=m["optimizer_beta2"],
                                           z=m.get("global_norm_spike_z", math.nan)),))
    return None


def _first_step(model) -> Optional[int]:
    steps = [s for s in (model.loss_nonfinite_step, model.first_nonfinite[0] if model.first_nonfinite else None)
             if s is not None]
    return min(steps) if steps else None
