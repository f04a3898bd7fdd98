"""The user's own clipping as plain data: how the run clips (:class:`LoopClipping`), what it did over the
run (:class:`ClippingSummary`), and the figures read off that record (the clip rate over windows, the norm
levels at the start and lately). Filled on the training side by ``gradscope.collect.clipping``; read by
the statistics, the report and its presentation. No torch here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

# The clipping methods, named here once, as timm and Lightning name them. By the global norm, which keeps
# the gradient's direction, then the two that cut parts of it: per unit against the weight's norm (AGC)
# and by element value, whose effect on a step needs sums over the gradient. PER_STEP is also the order
# the advice prefers them in on a tie (the direction kept first).
NORM = "norm"
BY_PART = ("agc", "value")
PER_STEP = (NORM,) + BY_PART  # each step's effect follows from the Monitor's figures
ADAPTIVE = "adaptive"  # ZClip's threshold, moved by the run: the Clipper applies it, a Monitor sees it through it
METHODS = PER_STEP + (ADAPTIVE,)  # the ways a run can clip
NONE = "none"  # the advice to leave the gradients alone

LONG_WINDOW = 100  # steps: "a long window", or the whole run where it is shorter
LEVEL_SHARE = 0.1  # the start and the recent norm level are each read over this share of the run


@dataclasses.dataclass(frozen=True)
class LoopClipping:
    """How the run's own loop clips: ``method`` (one of ``METHODS``) and ``threshold``;
    ``source`` says who told the Monitor (``Monitor(clip=...)``, Lightning's ``gradient_clip_val``, ...);
    ``reference_norm``, where given, is the global norm the threshold was chosen against, else the run's
    own first 10% of steps serve; ``eps`` is AGC's floor on a weight's norm."""

    method: str
    threshold: Optional[float]
    source: str = "Monitor"
    reference_norm: Optional[float] = None
    eps: float = 1e-3

    @property
    def per_step(self) -> bool:
        """Whether each step's effect follows from the Monitor's figures (adaptive needs the Clipper's own)."""
        return self.method in PER_STEP


@dataclasses.dataclass(frozen=True)
class ClippingSummary:
    """What the clipping did over the run, as plain data (see :class:`ClippingCounter`)."""

    spec: LoopClipping
    steps: int  # steps judged (finite pre-clip norm)
    clipped: int
    log_scale_sum: float  # sum over clipped steps of log(scale), for their geometric mean scale
    capped_sum: float  # value: elements capped; agc: units capped (summed over steps)
    capped_total: float  # elements (or units) over the same steps
    cosine_min: float
    blocks: np.ndarray  # (n, 4): first step, steps, clipped, sum of log10 pre-clip norm
    spikes: Tuple[int, ...]  # steps whose spike the clipping cut (or the guard skipped)
    guard: Optional[Dict[str, Any]] = None  # the Clipper's own counts, where it did the clipping

    def rate(self) -> float:
        return self.clipped / self.steps if self.steps else math.nan



def rate_windows(record: ClippingSummary) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clip rate over the run's blocks: each block's first step, its steps, and its rate."""
    b = record.blocks
    if not len(b):
        return np.empty(0), np.empty(0), np.empty(0)
    return b[:, 0], b[:, 1], b[:, 2] / np.maximum(b[:, 1], 1)


def longest_rate(record: ClippingSummary) -> Tuple[float, int]:
    """The highest clip rate over any run of consecutive blocks spanning ``LONG_WINDOW`` steps or more (the
    whole run where it is shorter), and that span's steps."""
    b = record.blocks
    if not len(b):
        return math.nan, 0
    need = min(LONG_WINDOW, int(b[:, 1].sum()))
    best, span = math.nan, 0
    for end in range(len(b)):
        steps = clipped = 0.0
        for k in range(end, -1, -1):
            steps += b[k, 1]
            clipped += b[k, 2]
            if steps >= need:
                rate = clipped / steps
                if not rate <= best:
                    best, span = rate, int(steps)
                break
    return best, span


def levels(record: ClippingSummary) -> Tuple[float, float]:
    """The geometric mean pre-clip norm over the run's first and its last ``LEVEL_SHARE`` (whole blocks,
    at least one each): where the threshold was set, and where the norms are now."""
    b = record.blocks
    if not len(b):
        return math.nan, math.nan
    total = b[:, 1].sum()
    need = max(LEVEL_SHARE * total, 1.0)

    def level(rows: np.ndarray) -> float:
        steps = logs = 0.0
        for row in rows:
            steps += row[1]
            logs += row[3]
            if steps >= need:
                break
        return 10 ** (logs / steps)
    return level(b), level(b[::-1])
