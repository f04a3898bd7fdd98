"""The rule vocabulary: every metric a rule may test, with its scope and meaning. Names carry statistic and unit."""
from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class Metric:
    scope: str  # "layer" or "model"
    description: str


_LAYER = {
    "grad_norm_median": "median over steps of the layer's gradient L2 norm",
    "grad_norm_max": "largest finite gradient L2 norm of the layer over the steps",
    "grad_norm_last": "gradient L2 norm at the last step",
    "grad_norm_peak_over_median": "grad_norm_max / grad_norm_median",
    "grad_norm_growth": "robust (Theil-Sen) growth factor of the layer norm per step; 1 = flat",
    "grad_norm_growth_low": "lower end of the 90% interval of grad_norm_growth",
    "grad_norm_spike_z": "largest z-score of a step's log10 norm against the running mean and std of earlier steps",
    "grad_norm_share": "median over steps of the layer's share of the squared global norm (0..1)",
    "grad_rms_vs_median_layer": "layer's median gradient RMS (norm/sqrt(params)) over the median layer's",
    "grad_abs_max": "largest |g| of any element, over all steps",
    "grad_abs_p50": "median |g| over elements and steps (from the histogram)",
    "grad_abs_p99": "99th percentile of |g| (from the histogram)",
    "grad_abs_p999": "99.9th percentile of |g| (from the histogram)",
    "grad_tail_ratio": "grad_abs_p999 / grad_abs_p50",
    "grad_kurtosis": "kurtosis E[g^4]/E[g^2]^2 of the elements (3 for a Gaussian), from the histogram",
    "grad_mean": "median over steps of the mean gradient element",
    "grad_std": "median over steps of the std of the gradient elements",
    "zero_fraction": "fraction of gradient elements that were zero (|g| < 1.5e-39), from the histogram sample",
    "nonfinite_count": "gradient elements that were inf or NaN, summed over steps",
    "grad_present_fraction": "fraction of steps in which the layer received a gradient (0 = unused)",
    "weight_norm": "L2 norm of the layer's trainable weights at the last step",
    "grad_to_weight_median": "median over steps of grad norm / weight norm",
    "grad_to_weight_max": "largest grad norm / weight norm over the steps",
    "update_ratio_median": "median over steps of ||weight change|| / ||weight|| made by optimizer.step()",
    "update_ratio_max": "largest update-to-weight ratio over the steps",
    "update_rms_median": "median over steps of the RMS of the layer's update: ||weight change|| / sqrt(params)",
    # Adam's second moment v, read from the optimizer's state when the report is made (NaN where the
    # optimizer keeps none, or was not given to the Monitor)
    "adam_eps_dominated_share": "share of the layer's elements (those with v > 0) whose sqrt(v_hat) is below the "
                                "optimizer's eps: eps, not the gradient, sets their step",
    "adam_outlier_share": "share of the layer's last gradient elements beyond 6 x sqrt(v_hat) (OLMo-core's "
                          "outlier count)",
    "params": "trainable parameter elements in the layer",
}

_MODEL = {
    "steps": "optimizer steps observed",
    "global_norm_median": "median over steps of the global gradient L2 norm",
    "global_norm_p95": "95th percentile over steps of the global norm",
    "global_norm_max": "largest finite global norm",
    "global_norm_first": "global norm at the first step",
    "global_norm_last": "global norm at the last step",
    "global_norm_peak_over_median": "global_norm_max / global_norm_median",
    "global_norm_growth": "robust (Theil-Sen) growth factor of the global norm per step; 1 = flat",
    "global_norm_growth_low": "lower end of the 90% interval of global_norm_growth",
    "global_norm_growth_over_run": "global_norm_growth raised to the optimizer steps the run spans: the trend's "
                                   "growth across the run",
    "global_norm_spike_z": "largest z-score of a step's log10 global norm against the running statistics",
    "global_norm_kurtosis": "kurtosis of the global norms over steps (3 for a Gaussian)",
    "grad_cosine_median": "median cosine between successive steps' global gradients",
    "grad_cosine_negative_fraction": "fraction of steps whose global gradient points against the previous step's "
                                     "(cosine below 0)",
    "nonfinite_count": "inf or NaN gradient elements over all layers and steps",
    "nonfinite_steps": "steps with any non-finite gradient element",
    "loss_nonfinite": "1 if the loss was inf or NaN at some step, else 0",
    "amp_skipped_steps": "steps the GradScaler skipped for inf/NaN gradients (kept out of every other metric)",
    "amp_skipped_fraction": "amp_skipped_steps over the steps observed",
    "adaptive_optimizer": "1 if the optimizer divides its step by a running second moment of the gradient (Adam's "
                          "family), 0 if not (SGD); unknown (NaN) in a Monitor's report",
    "loss_first": "loss at the first step",
    "loss_last": "loss at the last finite step",
    "loss_rise": "median loss of the last quarter of steps over that of the first quarter (positive losses only)",
    "loss_peak_over_start": "sustained peak of the loss (largest median of 3 consecutive steps) over the start "
                            "level (the median of the first 3 steps)",
    "loss_last_over_start": "median loss of the last quarter of steps over the start level (first 3 steps)",
    "global_norm_peak_over_start": "sustained peak of the global norm (largest median of 3 consecutive steps) over "
                                   "the start level (median of the first 3 steps)",
    "max_layer_share": "largest grad_norm_share of any layer",
    "active_layers": "layers with trainable parameters",
    "unused_layers": "layers with trainable parameters that never received a gradient",
    # diagnose's threshold trials; NaN where none ran (--trials 0, a Monitor's report, no finding called for them)
    "trial_unclipped_unstable": "1 if the trials' unclipped run went unstable while some clipped trial stayed "
                                "stable, else 0",
    "trial_unclipped_steps": "steps the trials' unclipped run trained from the profile's start",
    "trial_clipped_stable": "clipped thresholds the trials found stable",
    # the optimizer's parameter groups (diagnose, or Monitor(optimizer=...)); NaN where not known
    "optimizer_missed_share": "share of the trainable parameter elements that no parameter group of the optimizer "
                              "holds (1: the optimizer never moves the model)",
    "optimizer_missed_params": "trainable parameter tensors that no parameter group holds",
    "decayed_exempt_params": "normalization weights, biases and embeddings held with weight_decay > 0",
    "decayed_exempt_weight_decay": "the largest weight decay on those",
    "optimizer_eps": "the largest eps of the optimizer's parameter groups",
    "optimizer_beta2": "the largest beta2 of the optimizer's parameter groups (Adam's second-moment decay)",
    # diagnose's per-sample recompute at a spike (gradscope.run.spikes); NaN where no spike was taken apart
    "spike_top2_share": "at the first spike taken apart, the share of the batch gradient's squared norm that "
                        "its two largest samples carry (NaN where some sample's gradient was not finite)",
    "spike_nonfinite_samples": "at the first spike taken apart, the samples whose gradient was not finite "
                               "(of the 8 largest kept)",
    "spike_nonfinite_inputs": "at the first spike taken apart, the samples whose own tensors in the batch hold "
                              "an inf or a NaN",
    "spike_batch_size": "the batch size of the first spike taken apart",
    "spike_loss_over_previous": "at the first spike taken apart, the loss of its batch over that of the batch "
                                "before it, both at the spike's weights in eval mode (other data, or other weights)",
    # the user's own clipping (Monitor(clip=...), gradient_clip_val, max_grad_norm); NaN where not told
    "clip_threshold": "the threshold the run clips at (norm, value or AGC factor)",
    "clip_steps": "steps whose clipping was judged (a finite pre-clip norm)",
    "clip_rate": "share of those steps the clipping acted on (0..1)",
    "clip_rate_window": "highest clip rate over any window of 100 steps or more (the whole run where shorter)",
    "clip_window_steps": "the steps that window spans",
    "clip_scale_mean": "geometric mean, over the steps it clipped, of post-clip over pre-clip global norm",
    "clip_capped_fraction": "by value: share of gradient elements capped; AGC: share of units capped",
    "clip_cosine_min": "smallest cosine between a step's clipped and unclipped gradient (1 for norm clipping)",
    "clip_reference_norm": "pre-clip global norm where the threshold was set: LoopClipping.reference_norm where given, "
                           "else the geometric mean over the run's first 10%",
    "clip_recent_norm": "geometric mean pre-clip global norm over the run's last 10%",
    "clip_norm_drift": "how far the norms moved from the reference: the larger of recent/reference and its inverse",
    "clip_headroom": "clip threshold over the largest finite pre-clip global norm (norm clipping)",
    "clip_spikes": "spike steps (z >= 6) that the clipping cut, or the Clipper's guard skipped",
}

LAYER_METRICS: Dict[str, Metric] = {k: Metric("layer", v) for k, v in _LAYER.items()}
MODEL_METRICS: Dict[str, Metric] = {k: Metric("model", v) for k, v in _MODEL.items()}

# Text a message template may also name; never usable in a condition.
LAYER_CONTEXT = ("layer", "kind")
MODEL_CONTEXT = ("model", "first_nonfinite_layer", "first_nonfinite_step", "spike_step", "loss_nonfinite_step",
                 "clip_method", "clip_source", "clip_spike_steps", "clip_drift_direction", "optimizer_name",
                 "decayed_exempt_names", "missed_names", "spike_samples")


def condition_names(scope: str) -> tuple:
    """Metric names a condition in ``scope`` may test. A layer rule reads model metrics as ``model.<name>``."""
    if scope == "layer":
        return tuple(LAYER_METRICS) + tuple(f"model.{k}" for k in MODEL_METRICS)
    return tuple(MODEL_METRICS)


def template_names(scope: str) -> tuple:
    """Names a message template in ``scope`` may use."""
    context = LAYER_CONTEXT + MODEL_CONTEXT if scope == "layer" else MODEL_CONTEXT
    return condition_names(scope) + context
