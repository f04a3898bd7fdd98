"""The raw record of a profiling run: layer metadata, bounded per-step series and pooled histograms."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A module that owns parameters directly; its parameters form one group."""

    name: str
    kind: str
    param_names: Tuple[str, ...]
    trainable_numel: int
    frozen_numel: int
    source: Optional[Tuple[str, int]] = None  # file and line where the module's class is defined


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """What diagnose's threshold trials showed of unclipped training: from the profile's start, on its
    batches, the run the rules read beside the profile (the trials themselves are gradscope.advise.judge's)."""

    unclipped_steps: int  # steps the unclipped run trained before it stopped or ended
    unclipped_unstable: bool  # it diverged, or its loss, held-out loss or norm climbed (judge.assess)
    clipped_stable: int  # clipped thresholds that stayed stable


@dataclasses.dataclass(frozen=True)
class Profile:
    """Everything a Monitor measured. Per-layer arrays index ``active`` layers (those with trainable params).

    ``series`` holds per-step rows for the steps in ``series_steps`` (every step until the store's
    capacity, then every k-th); totals, maxima and spike scores cover every observed step.
    """

    layers: Tuple[LayerInfo, ...]
    active: Tuple[int, ...]
    steps: int
    series_steps: np.ndarray
    series: Mapping[str, np.ndarray]
    histograms: np.ndarray
    nonfinite_total: np.ndarray
    zero_total: np.ndarray
    elements_total: np.ndarray
    grad_present_steps: np.ndarray
    layer_spike_z: np.ndarray
    global_spike_z: float
    global_spike_step: int
    update_ratio_max: np.ndarray
    nonfinite_steps: Tuple[int, ...]
    first_nonfinite: Optional[Tuple[int, str]]
    loss_nonfinite_step: Optional[int]
    backward_order: Tuple[str, ...]
    measurement: str
    device: str
    model_source: Optional[Tuple[str, int]] = None
    amp_skipped_steps: Tuple[int, ...] = ()  # steps whose inf/NaN gradients made the GradScaler skip them
    ranks: int = 1  # processes in the group the figures were reduced over
    every: int = 1  # optimizer steps from one observed step to the next (``Monitor(every=N)``)
    sharded: bool = False  # some parameters were DTensor shards (FSDP2)
    # whether the optimizer divides its step by a running second moment of the gradient (Adam's family);
    # None where it is not known (a Monitor is not given the optimizer)
    adaptive_optimizer: Optional[bool] = None
    # the last steps' per-layer figures up to and including the first step whose gradient or global norm
    # was not finite: ``steps``, ``global_norm`` (steps,), and ``grad_norm``, ``grad_abs_max``, ``nonfinite``
    # (steps × active layers); None where every step was finite or the Monitor kept none
    before_nonfinite: Optional[Mapping[str, np.ndarray]] = None
    # what the user's own clipping did over the run (gradscope.analyse.clipping.ClipRecord); None where the
    # Monitor was not told how the run clips. The series then hold post_clip_norm and clip_cosine.
    clip: Optional[Any] = None
    # what diagnose's threshold trials showed of unclipped training; None where no trial ran
    trials: Optional[TrialOutcome] = None
