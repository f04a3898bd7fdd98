"""Guards that act during the run, on the device: skip-step on a z-score, and a threshold that follows the norm.

Both keep every statistic and every decision in tensors on the gradients' device, so a guarded step makes
no host sync: no ``.item()``, no Python branch on a value. What they did is counted on the device too,
and read (one copy) only when asked, by ``counts()``.

- ``Skip``: a step whose global gradient norm, or loss, lies more than ``z`` standard deviations above
  the mean of the last ``window`` accepted steps is skipped. This is the rule of OLMo-core's
  ``SkipStepOptimizer`` (z 6 over 128 steps), judged once ``min_history`` (16) steps are in the window.
  Skipped values stay out of the window, so a second spike soon after a first is still caught (OLMo-core
  lets them in, and a spike then widens the window enough to hide the next one). A guard that keeps them
  out could lock: once the level moves (late-training norm growth under a decaying schedule, a change of
  data mixture or batch size, a re-warm-up) every later step stands out against a window that can no
  longer move. So the guard is bounded: it is for rare events, and more than ``max_consecutive`` skips in
  a row, or more than ``max_rate`` of the last ``window`` steps, is a new level, not a spike. The step that
  would pass either bound re-bases the guard instead of being skipped: the values it skipped within the
  window enter it, with that step's, so the window takes in the new level at once and goes on judging
  (no blind spell). Non-finite steps are always skipped.
  Attached to the optimizer (``Clipper.attach``), a skip leaves the weights and the optimizer's state as
  they were (``gradscope.run.clipper.skipping``); without it the gradient is only zeroed, and the optimizer's own
  step (weight decay, the moments' decay) still runs. Outliers that recur often are data, not corruption:
  the advice does not arm the guard where the profile shows them (``recommend.FREQUENT_OUTLIERS``).
- ``Adaptive``: ZClip (Kumar et al. 2025): an exponential moving mean and variance of the global norm
  (``alpha``), seeded by the first ``warmup`` steps, which are not clipped; afterwards a norm above
  mean + ``z`` std is clipped to that bound, and the moving statistics take the clipped norm.

Under DDP every rank holds the same averaged gradient and so takes the same decision; under FSDP2 the
norm of the local shards is summed over ranks by one all-reduce (a collective, not a host sync).

This module holds the settings and the rule replayed on the host over recorded steps (what the advice
counts); ``gradscope.run.clipper.guard_state`` keeps them on the device during training.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Deque, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import GradscopeError


@dataclasses.dataclass(frozen=True)
class Skip:
    """Skip a step whose norm (or loss, when the Clipper is given one) is a z-score outlier."""
    z: float = 6.0
    window: int = 128
    min_history: int = 16
    max_consecutive: int = 8  # the skip after this many in a row re-bases the guard instead
    max_rate: float = 1 / 16  # ... and so does one past this share of the last ``window`` steps

    @property
    def max_skips(self) -> int:
        """The most steps skipped within ``window`` steps before the guard re-bases."""
        return max(1, int(self.max_rate * self.window))

    @property
    def held(self) -> int:
        """The skipped values kept aside, to enter the window if the guard re-bases: as many as it may skip."""
        return max(self.max_consecutive, self.max_skips)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise GradscopeError(f"the skip guard's z must be a positive number, got {self.z!r}",
                                 "6 is the usual setting (OLMo-core, Megatron-LM)")
        if not 2 <= self.min_history <= self.window:
            raise GradscopeError(f"the skip guard needs 2 <= min_history <= window, got {self.min_history} "
                                 f"and {self.window}", "the usual window is 128 steps")
        if not (isinstance(self.max_consecutive, int) and self.max_consecutive >= 1 and 0 < self.max_rate < 1):
            raise GradscopeError(f"the skip guard needs max_consecutive >= 1 and 0 < max_rate < 1, got "
                                 f"{self.max_consecutive!r} and {self.max_rate!r}",
                                 "the defaults are max_consecutive=8 and max_rate=1/16")


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


@dataclasses.dataclass(frozen=True)
class Replay:
    """What the skip guard did over a recorded run: the steps it skipped, and those where it re-based."""
    skipped: Tuple[int, ...]
    rebased: Tuple[int, ...]


def replay(norms: Sequence[float], losses: Optional[Sequence[float]], skip: Skip) -> Replay:
    """The skip guard's rule on the host, over a recorded run (``gradscope.run.clipper.guard_state`` applies the same
    on the device, step by step)."""
    norms = np.asarray(norms, dtype=np.float64)
    series = [norms] if losses is None else [norms, np.asarray(losses, dtype=np.float64)]
    kept: List[List[float]] = [[] for _ in series]
    recent: Deque[bool] = collections.deque(maxlen=skip.window)  # skipped or not, over the last window steps
    held: Deque[tuple] = collections.deque(maxlen=skip.held)  # the last finite values skipped, with their steps
    run = 0
    skipped, rebased = [], []
    for step in range(len(norms)):
        values = [s[step] for s in series]
        finite = all(math.isfinite(v) for v in values)
        outlier = False
        if finite and len(kept[0]) >= skip.min_history:
            for v, history in zip(values, kept):
                window = np.asarray(history[-skip.window:])
                std = float(np.std(window, ddof=1))
                if (v - float(np.mean(window))) / max(std, 1e-12) > skip.z:
                    outlier = True
        if finite and outlier and (run >= skip.max_consecutive or sum(recent) >= skip.max_skips):
            rebased.append(step)  # a new level: what it skipped of it enters the window, and so does this step
            for when, held_values in held:
                if step - when < skip.window:
                    for v, history in zip(held_values, kept):
                        history.append(v)
            held.clear()
            recent.clear()
            outlier = False
        out = not finite or outlier
        recent.append(out)
        run = run + 1 if out else 0
        if out:
            skipped.append(step)
            if finite:
                held.append((step, values))
            continue
        for v, history in zip(values, kept):
            history.append(v)
    return Replay(tuple(skipped), tuple(rebased))


def replay_skips(norms: Sequence[float], losses: Optional[Sequence[float]], skip: Skip) -> List[int]:
    """The steps the skip guard would have skipped over a recorded run (see ``replay``)."""
    return list(replay(norms, losses, skip).skipped)
