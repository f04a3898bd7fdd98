"""The user's own clipping, watched over the run: what it is, and what it did at each step (host side).

``Monitor(model, clip=...)`` (and the Lightning and Trainer callbacks, from ``gradient_clip_val`` and
``max_grad_norm``) is told how the run clips. The Monitor measures the gradients before clipping, so
what the clipping did follows from the same step's figures:

- by norm, as ``torch.nn.utils.clip_grad_norm_``: the scale is ``min(1, threshold / (norm + 1e-6))``
  and the post-clip norm ``norm * scale``; nothing more is measured on the device;
- by value, as ``clip_grad_value_``, and AGC, as timm's ``adaptive_clip_grad`` (per unit: a row of a
  weight, or a whole bias): the device adds three sums per step, the elements (units) capped, the
  post-clip squared norm and the dot product of the clipped with the unclipped gradient, from which
  the post-clip norm, the share capped and the cosine between the two follow exactly.

:class:`ClipTally` keeps, in bounded memory, how often it clipped over the run and over windows of it,
the norm level at the start and lately (to tell when the threshold no longer fits), and the spikes it
clipped. It touches no tensor.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ExperimentError

METHODS = ("norm", "value", "agc", "adaptive")
TORCH_EPS = 1e-6  # clip_grad_norm_'s: scale = threshold / (norm + 1e-6)
WINDOW_BLOCKS = 64  # the run's clip rate is kept in at most this many blocks (pairs merge past it)
FIRST_BLOCK = 8  # steps in a block until blocks merge
LONG_WINDOW = 100  # steps: "a long window", or the whole run where it is shorter
LEVEL_SHARE = 0.1  # the start and the recent norm level are each read over this share of the run
SPIKE_Z = 6.0  # a step is a spike at this z-score of its log norm against the steps before it (the rule's)
KEEP_SPIKES = 32  # spikes listed by step


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How the run clips: ``method`` (``norm``, ``value``, ``agc`` or ``adaptive``) and ``threshold``;
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
        return self.method in ("norm", "value", "agc")


def parse(clip: Any, source: str = "Monitor") -> Optional[ClipSpec]:
    """``clip`` as a :class:`ClipSpec`: a number (a norm threshold, as ``max_grad_norm``), a pair
    ``(method, threshold)``, a :class:`ClipSpec`, or a :class:`~gradscope.Clipper`; None stays None."""
    if clip is None or isinstance(clip, ClipSpec):
        return clip
    if hasattr(clip, "method") and hasattr(clip, "threshold") and hasattr(clip, "counts"):  # a Clipper
        if clip.method == "none":
            return None if clip.safety_net is None else ClipSpec("norm", float(clip.safety_net), "Clipper")
        return ClipSpec(clip.method, None if clip.threshold is None else float(clip.threshold), "Clipper",
                        eps=getattr(clip, "eps", 1e-3))
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        method, threshold = clip
    else:
        method, threshold = "norm", clip
    if method not in METHODS or method == "adaptive":
        raise ExperimentError(f"clip={clip!r}: the method must be norm, value or agc",
                              "pass a norm threshold (clip=1.0), a pair such as clip=('value', 0.5), or a Clipper")
    if not (isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
            and math.isfinite(threshold) and threshold > 0):
        raise ExperimentError(f"clip={clip!r}: the threshold must be a finite number above 0",
                              "pass the threshold your loop clips at, such as clip=1.0")
    return ClipSpec(method, float(threshold), source)


@dataclasses.dataclass(frozen=True)
class ClipRecord:
    """What the clipping did over the run, as plain data (see :class:`ClipTally`)."""

    spec: ClipSpec
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


class ClipTally:
    """Per-step effects of a :class:`ClipSpec`, tallied in bounded memory."""

    def __init__(self, spec: ClipSpec) -> None:
        self.spec = spec
        self.steps = self.clipped = 0
        self.log_scale_sum = self.capped_sum = self.capped_total = 0.0
        self.cosine_min = math.inf
        self.width = FIRST_BLOCK
        self.blocks: List[List[float]] = []  # [first step, steps, clipped, sum of log10 norm]
        self.spikes: List[int] = []

    def record(self, step: int, norm: float, sums: np.ndarray, capacity: float, spike_z: float) -> Dict[str, float]:
        """One observed step: ``norm`` the pre-clip global norm, ``sums`` the device's three clip sums,
        ``capacity`` the elements (value) or units (agc) they were counted over, ``spike_z`` the step's
        spike score. Returns the step's post-clip norm, scale, cosine and capped share (NaN where unknown)."""
        out = {"post_clip_norm": math.nan, "clip_scale": math.nan, "clip_cosine": math.nan, "capped": math.nan}
        if not self.spec.per_step or not math.isfinite(norm):
            return out
        effect = _effect(self.spec, norm, sums, capacity)
        clipped = effect["clip_scale"] < 1.0
        self.steps += 1
        self.clipped += clipped
        if clipped and effect["clip_scale"] > 0:
            self.log_scale_sum += math.log(effect["clip_scale"])
        if math.isfinite(effect["capped"]):
            self.capped_sum += effect["capped"] * capacity
            self.capped_total += capacity
        cosine = effect["clip_cosine"]
        if math.isfinite(cosine):
            self.cosine_min = min(self.cosine_min, cosine)
        self._block(step, clipped, norm)
        if clipped and spike_z >= SPIKE_Z and len(self.spikes) < KEEP_SPIKES:
            self.spikes.append(step)
        return effect

    def _block(self, step: int, clipped: bool, norm: float) -> None:
        if not self.blocks or self.blocks[-1][1] >= self.width:
            self.blocks.append([step, 0, 0, 0.0])
        block = self.blocks[-1]
        block[1] += 1
        block[2] += clipped
        block[3] += math.log10(norm) if norm > 0 else -300.0
        if len(self.blocks) > WINDOW_BLOCKS:  # merge pairs: the blocks double, memory stays bounded
            merged = []
            for a, b in zip(self.blocks[0::2], self.blocks[1::2]):
                merged.append([a[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]])
            if len(self.blocks) % 2:
                merged.append(self.blocks[-1])
            self.blocks = merged
            self.width *= 2

    def record_of(self, guard: Optional[Dict[str, Any]] = None) -> ClipRecord:
        spikes = list(self.spikes)
        if guard:  # steps the Clipper's guard skipped are spikes it cut whole
            spikes += [int(e["step"]) for e in guard.get("events", []) if e.get("scale", 1.0) == 0.0]
        return ClipRecord(
            spec=self.spec, steps=self.steps, clipped=self.clipped, log_scale_sum=self.log_scale_sum,
            capped_sum=self.capped_sum, capped_total=self.capped_total,
            cosine_min=self.cosine_min if self.steps else math.nan,
            blocks=np.array(self.blocks, dtype=np.float64).reshape(-1, 4),
            spikes=tuple(sorted(set(spikes)))[:KEEP_SPIKES], guard=guard,
        )


def _effect(spec: ClipSpec, norm: float, sums: np.ndarray, capacity: float) -> Dict[str, float]:
    """The post-clip norm, the scale of the global norm, the cosine between the clipped and the unclipped
    gradient and the share of elements (or units) capped, from the pre-clip norm and the clip sums."""
    if spec.method == "norm":
        scale = min(1.0, spec.threshold / (norm + TORCH_EPS))
        return {"post_clip_norm": norm * scale, "clip_scale": scale, "clip_cosine": 1.0, "capped": math.nan}
    over, post_sq, dot = (float(x) for x in sums)  # capped, post-clip squared norm, dot with the unclipped
    post = math.sqrt(post_sq)
    scale = post / norm if norm > 0 else 1.0
    if over == 0:
        scale = 1.0  # nothing capped: exactly the unclipped gradient, whatever the rounding of the sums
    cosine = dot / (norm * post) if norm > 0 and post > 0 else math.nan
    return {"post_clip_norm": post, "clip_scale": min(scale, 1.0), "clip_cosine": min(cosine, 1.0),
            "capped": over / capacity if capacity else math.nan}


def rate_windows(record: ClipRecord) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clip rate over the run's blocks: each block's first step, its steps, and its rate."""
    b = record.blocks
    if not len(b):
        return np.empty(0), np.empty(0), np.empty(0)
    return b[:, 0], b[:, 1], b[:, 2] / np.maximum(b[:, 1], 1)


def longest_rate(record: ClipRecord) -> Tuple[float, int]:
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


def levels(record: ClipRecord) -> Tuple[float, float]:
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
