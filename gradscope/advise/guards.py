"""Guards that act during the run, on the device: skip-step on a z-score, and a threshold that follows the norm.

Both keep every statistic and every decision in tensors on the gradients' device, so a guarded step makes
no host sync: no ``.item()``, no Python branch on a value. What they did is counted on the device too,
and read (one copy) only when asked, by ``counts()``.

- ``Skip``: a step whose global gradient norm, or loss, lies more than ``z`` standard deviations above
  the mean of the last ``window`` accepted steps is skipped: its gradient is zeroed before the optimizer
  sees it, so the outlier enters neither the weights nor the optimizer's moments. (The optimizer still
  takes its step: momentum carries on and decoupled weight decay applies, as in a step with a zero
  gradient.) This is the rule of OLMo-core's ``SkipStepOptimizer`` (z 6 over 128 steps), with two
  differences: skipped values stay out of the window, so a large spike cannot hide a smaller one after
  it (OLMo-core keeps them in), and judging starts once ``min_history`` (16) steps are in the window
  (OLMo-core waits for half the window). Outliers that recur often are data, not corruption: the advice
  does not arm the guard where the profile shows them (``recommend.FREQUENT_OUTLIERS``).
- ``Adaptive``: ZClip (Kumar et al. 2025): an exponential moving mean and variance of the global norm
  (``alpha``), seeded by the first ``warmup`` steps, which are not clipped; afterwards a norm above
  mean + ``z`` std is clipped to that bound, and the moving statistics take the clipped norm.

Under DDP every rank holds the same averaged gradient and so takes the same decision; under FSDP2 the
norm of the local shards is summed over ranks by one all-reduce (a collective, not a host sync).

This module holds the settings and the rule replayed on the host over recorded steps (what the advice
counts); ``gradscope.run.guard_state`` keeps them on the device during training.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence

import numpy as np

from ..errors import GradscopeError


@dataclasses.dataclass(frozen=True)
class Skip:
    """Skip a step whose norm (or loss, when the Clipper is given one) is a z-score outlier."""
    z: float = 6.0
    window: int = 128
    min_history: int = 16

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise GradscopeError(f"the skip guard's z must be a positive number, got {self.z!r}",
                                 "6 is the usual setting (OLMo-core, Megatron-LM)")
        if not 2 <= self.min_history <= self.window:
            raise GradscopeError(f"the skip guard needs 2 <= min_history <= window, got {self.min_history} "
                                 f"and {self.window}", "the usual window is 128 steps")


@dataclasses.dataclass(frozen=True)
class Adaptive:
    """ZClip's threshold: mean + z std of the norm's exponential moving statistics."""
    z: float = 2.5
    alpha: float = 0.97
    warmup: int = 25

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0 and 0 < self.alpha < 1 and self.warmup >= 2):
            raise GradscopeError(f"adaptive clipping needs z > 0, 0 < alpha < 1 and warmup >= 2, got z={self.z!r}, "
                                 f"alpha={self.alpha!r}, warmup={self.warmup!r}",
                                 "ZClip's settings are z=2.5, alpha=0.97, warmup=25")


def replay_skips(norms: Sequence[float], losses: Optional[Sequence[float]], skip: Skip) -> List[int]:
    """The steps the skip guard would have skipped over a recorded run (its rule, on the host): a step is
    judged once ``min_history`` accepted steps are in the window, and a skipped one stays out of it."""
    norms = np.asarray(norms, dtype=np.float64)
    series = [norms] if losses is None else [norms, np.asarray(losses, dtype=np.float64)]
    kept: List[List[float]] = [[] for _ in series]
    skipped = []
    for step in range(len(norms)):
        values = [s[step] for s in series]
        out = not all(math.isfinite(v) for v in values)
        if not out and len(kept[0]) >= skip.min_history:
            for v, history in zip(values, kept):
                recent = np.asarray(history[-skip.window:])
                std = float(np.std(recent, ddof=1))
                if (v - float(np.mean(recent))) / max(std, 1e-12) > skip.z:
                    out = True
        if out:
            skipped.append(step)
            continue
        for v, history in zip(values, kept):
            history.append(v)
    return skipped
