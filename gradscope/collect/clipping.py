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

The spec and the record are plain data, in :mod:`gradscope.analyse.clipping`; :func:`watch` says what
the Monitor needs of the clipping, and :class:`ClippingCounter` keeps, in bounded memory, how often it clipped over the run and over windows of it,
the norm level at the start and lately (to tell when the threshold no longer fits), and the spikes it
clipped. It touches no tensor.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, NamedTuple, Optional

import numpy as np

from ..analyse.clipping import BY_PART, METHODS, ClippingSummary, LoopClipping
from ..errors import ExperimentError

TORCH_EPS = 1e-6  # clip_grad_norm_'s: scale = threshold / (norm + 1e-6)
WINDOW_BLOCKS = 64  # the run's clip rate is kept in at most this many blocks (pairs merge past it)
FIRST_BLOCK = 8  # steps in a block until blocks merge
SPIKE_Z = 6.0  # a step is a spike at this z-score of its log norm against the steps before it (the rule's)
KEEP_SPIKES = 32  # spikes listed by step


def parse(clip: Any, source: str = "Monitor") -> Optional[LoopClipping]:
    """``clip`` as a :class:`LoopClipping`: a number (a norm threshold, as ``max_grad_norm``), a pair
    ``(method, threshold)``, a :class:`LoopClipping`, or a :class:`~gradscope.Clipper`; None stays None."""
    if clip is None or isinstance(clip, LoopClipping):
        return clip
    if hasattr(clip, "method") and hasattr(clip, "threshold") and hasattr(clip, "counts"):  # a Clipper
        if clip.method == "none":
            return None if clip.safety_net is None else LoopClipping("norm", float(clip.safety_net), "Clipper")
        return LoopClipping(clip.method, None if clip.threshold is None else float(clip.threshold), "Clipper",
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
    return LoopClipping(method, float(threshold), source)


class Watched(NamedTuple):
    """The user's clipping as a Monitor watches it: the spec, the Clipper that clips (whose guard's counts
    join the report; None for a plain threshold), the parameters (ids) its AGC leaves alone, and what the
    per-step clip sums count over: every element (value), or every unit AGC clips (0 by norm)."""

    spec: LoopClipping
    clipper: Any
    excluded: frozenset
    capacity: float

    @property
    def on_device(self) -> bool:
        """Whether each step adds the clip sums on the device (by value and AGC; by norm nothing)."""
        return self.spec.method in BY_PART


def watch(clip: Any, model: Any, params: List[Any]) -> Optional[Watched]:
    """What a Monitor needs to report ``clip`` (see :func:`parse`) over ``params`` of ``model``."""
    spec = parse(clip)
    if spec is None:
        return None
    clipper = clip if spec.source == "Clipper" else None
    if spec.method == "value":
        return Watched(spec, clipper, frozenset(), float(sum(p.numel() for p in params)))
    if spec.method != "agc":
        return Watched(spec, clipper, frozenset(), 0.0)
    skipped: set = set()
    if clipper is not None:
        names = clipper.excluded(model)
        skipped = {id(p) for name, m in model.named_modules() if name in names for p in m.parameters(recurse=False)}
    return Watched(spec, clipper, frozenset(skipped), float(sum(agc_units(p) for p in params if id(p) not in skipped)))


def agc_units(param: Any) -> int:
    """Units AGC clips one by one: 1 for a bias or gain, a weight's rows otherwise."""
    return 1 if param.ndim <= 1 else int(param.shape[0])


class ClippingCounter:
    """Per-step effects of a :class:`LoopClipping`, tallied in bounded memory."""

    def __init__(self, spec: LoopClipping, capacity: float = 0.0) -> None:
        self.spec = spec
        self.capacity = capacity  # the elements (value) or units (agc) the device's sums count over
        self.steps = self.clipped = 0
        self.log_scale_sum = self.capped_sum = self.capped_total = 0.0
        self.cosine_min = math.inf
        self.width = FIRST_BLOCK
        self.blocks: List[List[float]] = []  # [first step, steps, clipped, sum of log10 norm]
        self.spikes: List[int] = []

    def record(self, step: int, norm: float, sums: np.ndarray, spike_z: float) -> Dict[str, float]:
        """One observed step: ``norm`` the pre-clip global norm, ``sums`` the device's three clip sums,
        ``spike_z`` the step's spike score. Returns the step's post-clip norm, scale, cosine and capped share (NaN where unknown)."""
        out = {"post_clip_norm": math.nan, "clip_scale": math.nan, "clip_cosine": math.nan, "capped": math.nan}
        if not self.spec.per_step or not math.isfinite(norm):
            return out
        capacity = self.capacity
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

    def record_of(self, guard: Optional[Dict[str, Any]] = None) -> ClippingSummary:
        spikes = list(self.spikes)
        if guard:  # steps the Clipper's guard skipped are spikes it cut whole
            spikes += [int(e["step"]) for e in guard.get("events", []) if e.get("scale", 1.0) == 0.0]
        return ClippingSummary(
            spec=self.spec, steps=self.steps, clipped=self.clipped, log_scale_sum=self.log_scale_sum,
            capped_sum=self.capped_sum, capped_total=self.capped_total,
            cosine_min=self.cosine_min if self.steps else math.nan,
            blocks=np.array(self.blocks, dtype=np.float64).reshape(-1, 4),
            spikes=tuple(sorted(set(spikes)))[:KEEP_SPIKES], guard=guard,
        )


def _effect(spec: LoopClipping, norm: float, sums: np.ndarray, capacity: float) -> Dict[str, float]:
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
