"""The raw record of a profiling run: layer metadata, bounded per-step series and pooled histograms."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from .clipping import ClippingSummary


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
class OptimizerSetup:
    """What the optimizer's parameter groups and state say, read once when the profile is taken (never on a
    step): its configuration, and per active layer two figures of Adam's second moment (NaN where the
    optimizer keeps none, or the layer's state is sharded)."""

    name: str  # the optimizer's class
    trainable: int  # trainable parameter tensors the profile watched
    missed: Tuple[str, ...]  # of those, the ones no parameter group holds (by name)
    missed_numel: int
    trainable_numel: int
    decayed_exempt: Tuple[str, ...]  # normalization weights, biases and embeddings held with weight_decay > 0
    weight_decay: float  # the largest weight decay on those (0 where none)
    eps: float  # the largest eps of any group (NaN: none)
    beta2: float  # the largest beta2 of any group (NaN: none)
    eps_dominated: np.ndarray  # per active layer: share of elements with v > 0 whose sqrt(v_hat) is below eps
    outliers: np.ndarray  # per active layer: share of gradient elements beyond OUTLIER_K x sqrt(v_hat)


@dataclasses.dataclass(frozen=True)
class SampleShare:
    """One sample's part in a spike: its own gradient (computed alone) and loss, and its share of the
    batch gradient's squared norm, <g_i, G> / |G|^2 with G the sum of the finite samples' gradients (the
    shares sum to 1; NaN where the sample's gradient is not finite)."""

    index: int  # within the batch
    grad_norm: float
    loss: float
    share: float


@dataclasses.dataclass(frozen=True)
class SpikeSamples:
    """The samples of one spike's batch, recomputed one by one at the step's weights (gradscope.run.culprits)."""

    step: int  # the optimizer step, from 0
    global_norm: float
    z: float  # the step's spike score (NaN at a non-finite step before enough history)
    why: str  # "spike" or "nonfinite"
    batch_size: int
    samples: Tuple[SampleShare, ...]  # non-finite first, then by share, largest first
    method: str  # "vmap" (torch.func) or "loop" (one backward per sample)
    seconds: float  # what the recompute took
    error: Optional[str] = None  # why no per-sample figures could be computed
    # the loss of the batch, and of the batch before it, both at this step's weights in eval mode: a batch
    # whose loss stands far above its predecessor's at the same weights is other data
    batch_loss: float = float("nan")
    previous_loss: float = float("nan")
    nonfinite_inputs: Tuple[int, ...] = ()  # the samples whose own tensors in the batch hold an inf or NaN
    batch: Any = dataclasses.field(default=None, compare=False, repr=False)  # the batch as drawn, to replay it


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
    # what the user's own clipping did over the run (gradscope.analyse.clipping.ClippingSummary); None where the
    # Monitor was not told how the run clips. The series then hold post_clip_norm and clip_cosine.
    clip: Optional[ClippingSummary] = None
    # what diagnose's threshold trials showed of unclipped training; None where no trial ran
    trials: Optional[TrialOutcome] = None
    # the optimizer's configuration and state figures; None where the Monitor was not given the optimizer
    optimizer: Optional[OptimizerSetup] = None
    # diagnose's per-sample recompute at each spike step (gradscope.run.culprits); empty where none ran
    spikes: Tuple[SpikeSamples, ...] = ()
