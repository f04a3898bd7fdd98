"""The live log's metrics: one step's figures as the flat ``{key: value}`` a dashboard takes.

The keys, grouped as a dashboard groups them by their first part:

- ``grad_norm/global``: the pre-clip global norm; ``grad_norm/<layer>``: each layer's pre-clip norm, named
  as the report names layers. A model with more than ``layers`` layers (32 by default) logs the ``top``
  largest of each step (8 by default) instead of all of them, and ``grad_norm_group/<group>`` for every
  group: a group is a layer's name without its block indices (``h.3.attn.c_attn`` is in ``h.attn.c_attn``),
  the same layer across blocks, its norm the root of the sum of its layers' squares. So a 48-block model
  logs about twenty series, not thousands;
- ``grad_norm/post_clip``, ``clip/clipped`` (1 when the step was scaled down) and ``clip/rate`` (the share of
  the steps so far), where the loop's clipping is watched (``clip=``);
- ``guard/skipped``: the steps the Clipper's skip guard skipped so far, on the last step of each flush, where
  the Clipper is watched;
- ``gradscope/loss``, ``gradscope/spike_z`` (the global norm's spike score) and ``gradscope/nonfinite``
  (non-finite gradient elements); ``gradscope/amp_skipped`` is 1 on a step a GradScaler skipped.

The norms are logged whatever they are: an inf or a NaN is the explosion itself. The loss is logged when it
came with the step or was noted for it later; the spike score from the sixth step on; the post-clip norm
where the step's norm was finite.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence

import numpy as np

from ..collect.ledger import StepRecord

LAYERS = 32  # a model with at most this many layers logs every layer's norm
TOP = 8  # past that, the largest of each step, and the groups
MAYBE_MISSING = ("gradscope/spike_z", "grad_norm/post_clip")  # NaN there means "not known", not a figure
_INDEX = re.compile(r"^\d+$")


def group_of(layer: str) -> str:
    """The layer's name without its block indices: the same layer across the blocks of a stack."""
    parts = [p for p in layer.split(".") if not _INDEX.match(p)]
    return ".".join(parts) or "(blocks)"


class Keys:
    """Names the figures of a model's ``layers`` (the Monitor's active layers, in its order) and makes each
    step's metrics."""

    def __init__(self, layers: Sequence[str], *, every_layer: int = LAYERS, top: int = TOP) -> None:
        self.layer_keys = [f"grad_norm/{name}" for name in layers]
        self.every_layer = len(layers) <= every_layer
        self.top = min(top, len(layers))
        groups: Dict[str, List[int]] = {}
        for k, name in enumerate(layers):
            groups.setdefault(group_of(name), []).append(k)
        self.groups = [] if self.every_layer else [(f"grad_norm_group/{g}", np.array(ks)) for g, ks in groups.items()]
        self.steps = self.clipped = 0

    def metrics(self, record: StepRecord) -> Dict[str, float]:
        """One step's ``{key: value}``."""
        out: Dict[str, float] = {}
        if record.amp_skipped:
            out["gradscope/amp_skipped"] = 1.0
        else:
            norms = record.grad_norm
            out["grad_norm/global"] = record.global_norm
            if self.every_layer:
                out.update(zip(self.layer_keys, norms.tolist()))
            else:
                order = np.argsort(-np.nan_to_num(norms, nan=np.inf, posinf=np.inf))[: self.top]
                out.update((self.layer_keys[k], float(norms[k])) for k in order)
                squares = norms.astype(np.float64) ** 2
                out.update((key, math.sqrt(float(squares[ks].sum()))) for key, ks in self.groups)
            out["gradscope/spike_z"] = record.spike_z
            out["gradscope/nonfinite"] = record.nonfinite
            if math.isfinite(record.clip_scale):
                self.steps += 1
                self.clipped += record.clip_scale < 1.0
                out["grad_norm/post_clip"] = record.post_clip_norm
                out["clip/clipped"] = float(record.clip_scale < 1.0)
                out["clip/rate"] = self.clipped / self.steps
        if record.loss_given or math.isfinite(record.loss):
            out["gradscope/loss"] = record.loss
        return {k: float(v) for k, v in out.items() if k not in MAYBE_MISSING or math.isfinite(v)}
