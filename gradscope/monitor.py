"""The profiler's hot path: per-layer gradient figures each observed step, in one host sync.

``Monitor(model)`` groups parameters by their owning module. ``observe()`` is called after
``backward()`` and before clipping and ``optimizer.step()``; it reads the gradients the optimizer is
about to use, batches the arithmetic with ``torch._foreach_*`` on the device and moves one vector of
figures to the host. ``profile()`` returns the plain :class:`~gradscope.profile.Profile` that the
statistics are computed from.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import histogram as hist
from .errors import ExperimentError
from .history import SeriesStore, SpikeTracker
from .profile import LayerInfo, Profile

MEASUREMENT = "pre-clip gradients, one observation per optimizer step (after backward, before clipping and step)"
_FOREACH_MAX = hasattr(torch, "_foreach_max")


class _Bucket:
    """Trainable parameters sharing a device and dtype, laid out group by group in one flat buffer."""

    def __init__(self, params: List[nn.Parameter], groups: List[int], n_groups: int, device: torch.device) -> None:
        self.params = params
        self.groups = groups
        self.dtype = params[0].dtype
        sizes = [p.numel() for p in params]
        self.numel = sum(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        segments: List[Tuple[int, int, int]] = []  # (start, end, group): consecutive params of one group
        for i, g in enumerate(groups):
            start, end = int(self.offsets[i]), int(self.offsets[i + 1])
            if segments and segments[-1][2] == g and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], end, g)
            else:
                segments.append((start, end, g))
        self.segments = segments
        self.segment_group = torch.tensor([g for _, _, g in segments], device=device)
        self.param_group = torch.tensor(groups, device=device)
        self.bin_offsets = [g * hist.N_BINS for _, _, g in segments]
        self.flat = [torch.empty(self.numel, dtype=torch.float32, device=device) for _ in range(2)]
        self.bits = torch.empty(self.numel, dtype=torch.int32, device=device)
        self.bit_views = [self.bits[s:e] for s, e, _ in segments]
        self.flat_views = [[f[s:e] for s, e, _ in segments] for f in self.flat]
        self.zeros: Dict[int, torch.Tensor] = {}
        self.current = 0
        self.previous_weights: Optional[List[torch.Tensor]] = None


class Monitor:
    """Observe a model's gradients in your own training loop.

    Call ``observe()`` once per optimizer step, after ``backward()`` and before clipping and
    ``optimizer.step()``; call ``report()`` at the end. The update-to-weight ratio of a step is measured
    at the next ``observe()`` (or at ``report()`` for the last step), as the change in the weights since
    the previous observation.

    What it leaves on your model: it registers one gradient hook per parameter for the first backward
    only (to learn the backward order), and removes them at the first ``observe()`` or at ``close()``.
    It never changes weights, gradients, modes or ``requires_grad``. It keeps two flat float32 copies of
    the gradients and one copy of the weights (about 3× the trainable parameters' size) to measure the
    step-to-step cosine and the update ratios.
    """

    def __init__(self, model: nn.Module, *, history: int = 1024) -> None:
        self.model = model
        self.layers, params, groups = _group_parameters(model)
        if not params:
            raise ExperimentError(
                f"{type(model).__name__} has no trainable parameters",
                "unfreeze some parameters (requires_grad=True) before profiling",
            )
        self._active = [i for i, layer in enumerate(self.layers) if layer.trainable_numel > 0]
        n_groups = len(self._active)
        self._group_index = {layer_i: k for k, layer_i in enumerate(self._active)}
        self.device = params[0].device
        by_key: "OrderedDict[Tuple[torch.device, torch.dtype], Tuple[list, list]]" = OrderedDict()
        for p, g in zip(params, groups):
            entry = by_key.setdefault((p.device, p.dtype), ([], []))
            entry[0].append(p)
            entry[1].append(self._group_index[g])
        self._buckets = [_Bucket(ps, gs, n_groups, key[0]) for key, (ps, gs) in by_key.items()]
        self._n_groups = n_groups
        self._numel = np.array([self.layers[i].trainable_numel for i in self._active], dtype=np.float64)
        self._hist = torch.zeros(n_groups * hist.N_BINS, dtype=torch.int64, device=self.device)
        self._series = SeriesStore(history)
        self._layer_spikes = SpikeTracker(n_groups)
        self._global_spikes = SpikeTracker(1)
        self.measurement = MEASUREMENT
        self._step = 0
        self._update_recorded = -1
        self._update_max = np.full(n_groups, np.nan)
        self._seen_in_backward: set = set()
        self._last_weight_norm: Optional[np.ndarray] = None
        self._last_global_norm = float("nan")
        self._totals = {"nonfinite": np.zeros(n_groups), "zeros": np.zeros(n_groups), "elements": np.zeros(n_groups)}
        self._grad_present = np.zeros(n_groups, dtype=np.int64)
        self._first_nonfinite: Optional[Tuple[int, str]] = None
        self._nonfinite_steps: List[int] = []
        self._loss_nonfinite_step: Optional[int] = None
        self._backward_order: List[int] = []
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._order_hook(self._group_index[g]))
            for p, g in zip(params, groups)
        ] if hasattr(torch.Tensor, "register_post_accumulate_grad_hook") else []

    @property
    def steps(self) -> int:
        """Optimizer steps observed so far."""
        return self._step

    # -- the hot path ---------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, loss: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Measure the current gradients as one optimizer step; pass ``loss`` to have it checked too.

        Returns the step's global figures: ``step``, ``global_norm``, ``loss`` and ``nonfinite``.
        """
        self._remove_hooks()
        G, dev = self._n_groups, self.device
        norm_sq, max_abs, grad_sum, weight_sq, update_sq = torch.zeros(5, G, dtype=torch.float32, device=dev)
        dot = torch.zeros(1, dtype=torch.float32, device=dev)
        counts = torch.zeros(G * hist.N_BINS, dtype=torch.int64, device=dev)
        present = np.zeros(G, dtype=bool)
        for b in self._buckets:
            flat = self._gather(b, present)
            views = b.flat_views[b.current]
            seg_group = b.segment_group.to(dev)
            norm_sq.index_add_(0, seg_group, torch.stack(torch._foreach_norm(views)).to(dev) ** 2)
            grad_sum.index_add_(0, seg_group, torch.stack([v.sum() for v in views]).to(dev))
            # |g| as int32 bits: their max is the bit pattern of max|g|, and their top bits are the bin.
            torch.bitwise_and(flat.view(torch.int32), hist.ABS_MASK, out=b.bits)
            if _FOREACH_MAX:
                max_bits = torch.stack(torch._foreach_max(b.bit_views))
            else:
                max_bits = torch.stack([v.max() for v in b.bit_views])
            max_abs.scatter_reduce_(0, seg_group, max_bits.view(torch.float32).to(dev), reduce="amax")
            b.bits.bitwise_right_shift_(hist.SHIFT)
            torch._foreach_add_(b.bit_views, b.bin_offsets)
            counts += torch.bincount(b.bits, minlength=G * hist.N_BINS).to(dev)
            if self._step > 0:
                dot += torch.dot(flat, b.flat[1 - b.current]).to(dev)
            b.current = 1 - b.current
            weights = [p.detach() for p in b.params]
            param_group = b.param_group.to(dev)
            weight_sq.index_add_(0, param_group, torch.stack(torch._foreach_norm(weights)).to(dev).float() ** 2)
            update_sq.index_add_(0, param_group, self._weight_change_sq(b, weights).to(dev))
        self._hist += counts
        grid = counts.view(G, hist.N_BINS)
        step_counts = torch.stack([grid[:, 0], grid[:, hist.NONFINITE_FIRST:].sum(dim=1)]).float()
        loss_value = torch.full((1,), float("nan"), device=dev) if loss is None else loss.detach().float().reshape(1).to(dev)
        packed = torch.cat([norm_sq, max_abs, grad_sum, weight_sq, update_sq, step_counts.reshape(-1), dot, loss_value])
        row = packed.to(torch.float64).cpu().numpy()  # the one host sync of the step
        return self._record(row, present, loss is not None)

    def _gather(self, b: _Bucket, present: np.ndarray) -> torch.Tensor:
        """Copy the bucket's gradients into its current flat float32 buffer (zeros where grad is None)."""
        grads = []
        for i, p in enumerate(b.params):
            g = p.grad
            if g is None:
                g = b.zeros.get(i)
                if g is None:
                    g = b.zeros[i] = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            else:
                present[b.groups[i]] = True
                g = g.to_dense() if g.is_sparse else g
            grads.append(g.reshape(-1))
        flat = b.flat[b.current]
        if b.dtype == torch.float32:
            torch.cat(grads, out=flat)
        else:
            flat.copy_(torch.cat(grads))
        return flat

    def _weight_change_sq(self, b: _Bucket, weights: List[torch.Tensor]) -> torch.Tensor:
        """Squared norm of each parameter's change since the last snapshot; then snapshot the weights."""
        if b.previous_weights is None:
            b.previous_weights = [w.clone() for w in weights]
            return torch.zeros(len(weights), dtype=torch.float32, device=weights[0].device)
        torch._foreach_sub_(b.previous_weights, weights)
        change = torch.stack(torch._foreach_norm(b.previous_weights)).float() ** 2
        torch._foreach_copy_(b.previous_weights, weights)
        return change

    # -- the host side --------------------------------------------------------------------------------
    def _record(self, row: np.ndarray, present: np.ndarray, loss_given: bool) -> Dict[str, float]:
        G, step = self._n_groups, self._step
        norm_sq, max_abs, grad_sum, weight_sq, update_sq, zeros, nonfinite = (row[i * G:(i + 1) * G] for i in range(7))
        dot, loss = row[7 * G], row[7 * G + 1]
        grad_norm, weight_norm = np.sqrt(norm_sq), np.sqrt(weight_sq)
        global_norm = float(np.sqrt(norm_sq.sum()))
        with np.errstate(divide="ignore", invalid="ignore"):
            cosine = dot / (global_norm * self._last_global_norm) if step > 0 else np.nan
            grad_to_weight = np.where(weight_norm > 0, grad_norm / weight_norm, np.nan)
            mean = grad_sum / self._numel
            std = np.sqrt(np.maximum(norm_sq / self._numel - mean**2, 0.0))
        if step > 0 and self._update_recorded < step - 1:
            self._record_update(step - 1, update_sq)
        self._totals["nonfinite"] += nonfinite
        self._totals["zeros"] += zeros
        self._totals["elements"] += self._numel
        self._grad_present += present
        if nonfinite.any():
            self._nonfinite_steps.append(step)
            if self._first_nonfinite is None:
                self._first_nonfinite = (step, self._first_in_backward_order(nonfinite > 0))
        if loss_given and not np.isfinite(loss) and self._loss_nonfinite_step is None:
            self._loss_nonfinite_step = step
        self._series.append(
            step, grad_norm=grad_norm, grad_abs_max=max_abs, grad_mean=mean, grad_std=std,
            weight_norm=weight_norm, grad_to_weight=grad_to_weight, zero_fraction=zeros / self._numel,
            nonfinite=nonfinite, update_ratio=np.full(G, np.nan),
            global_norm=np.array(global_norm), cosine=np.array(cosine), loss=np.array(loss),
        )
        self._layer_spikes.update(step, grad_norm)
        self._global_spikes.update(step, np.array([global_norm]))
        self._last_weight_norm, self._last_global_norm = weight_norm, global_norm
        self._step += 1
        return {"step": step, "global_norm": global_norm, "loss": float(loss), "nonfinite": float(nonfinite.sum())}

    def _record_update(self, step: int, update_sq: np.ndarray) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(self._last_weight_norm > 0, np.sqrt(update_sq) / self._last_weight_norm, np.nan)
        self._series.amend(step, "update_ratio", ratio)
        self._update_max = np.fmax(self._update_max, ratio)
        self._update_recorded = step

    @torch.no_grad()
    def _record_last_update(self) -> None:
        """Measure the last step's update (made after the last observe), if the weights have moved since."""
        last = self._step - 1
        if last < 0 or self._update_recorded >= last:
            return
        dev = self.device
        update_sq = torch.zeros(self._n_groups, dtype=torch.float32, device=dev)
        for b in self._buckets:
            weights = [p.detach() for p in b.params]
            update_sq.index_add_(0, b.param_group.to(dev), self._weight_change_sq(b, weights).to(dev))
        values = update_sq.to(torch.float64).cpu().numpy()
        if values.any():
            self._record_update(last, values)

    # -- backward order, for naming the first non-finite layer ----------------------------------------
    def _order_hook(self, group: int):
        def hook(_param: torch.Tensor) -> None:
            if group not in self._seen_in_backward:
                self._seen_in_backward.add(group)
                self._backward_order.append(group)
        return hook

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _first_in_backward_order(self, mask: np.ndarray) -> str:
        order = self._backward_order or list(range(self._n_groups))[::-1]
        for g in order:
            if mask[g]:
                return self.layers[self._active[g]].name
        return self.layers[self._active[int(np.argmax(mask))]].name

    # -- results --------------------------------------------------------------------------------------
    def profile(self) -> Profile:
        """Everything measured so far, as plain data."""
        self._record_last_update()
        s = self._series
        series = {name: s.array(name) for name in s.fields}
        return Profile(
            layers=tuple(self.layers), active=tuple(self._active), steps=self._step,
            series_steps=np.array(s.steps, dtype=np.int64), series=series,
            histograms=self._hist.view(self._n_groups, hist.N_BINS).cpu().numpy().copy(),
            nonfinite_total=self._totals["nonfinite"].copy(), zero_total=self._totals["zeros"].copy(),
            elements_total=self._totals["elements"].copy(), grad_present_steps=self._grad_present.copy(),
            layer_spike_z=self._layer_spikes.max_z.copy(),
            global_spike_z=float(self._global_spikes.max_z[0]), global_spike_step=int(self._global_spikes.max_z_step[0]),
            update_ratio_max=self._update_max.copy(), nonfinite_steps=tuple(self._nonfinite_steps),
            first_nonfinite=self._first_nonfinite, loss_nonfinite_step=self._loss_nonfinite_step,
            backward_order=tuple(self.layers[self._active[g]].name for g in self._backward_order),
            measurement=self.measurement, device=str(self.device),
        )

    def report(self, rules=None, *, name: Optional[str] = None):
        """Statistics, findings and a recommendation for everything observed: a :class:`Report`."""
        from .diagnose import build_report

        return build_report(self.profile(), rules=rules, model_name=name or type(self.model).__name__)

    def close(self) -> None:
        """Remove any hook still on the model and free the gradient copies."""
        self._remove_hooks()
        for b in self._buckets:
            b.flat = b.flat_views = []
            b.previous_weights = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self._remove_hooks()


def _group_parameters(model: nn.Module) -> Tuple[List[LayerInfo], List[nn.Parameter], List[int]]:
    """One group per module that owns parameters directly; a shared parameter goes to its first owner."""
    layers: List[LayerInfo] = []
    params: List[nn.Parameter] = []
    groups: List[int] = []
    seen = set()
    for module_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        trainable = [(n, p) for n, p in own if p.requires_grad]
        prefix = f"{module_name}." if module_name else ""
        layers.append(LayerInfo(
            name=module_name or "(root)", kind=type(module).__name__,
            param_names=tuple(prefix + n for n, _ in own),
            trainable_numel=sum(p.numel() for _, p in trainable),
            frozen_numel=sum(p.numel() for _, p in own if not p.requires_grad),
        ))
        params.extend(p for _, p in trainable)
        groups.extend([len(layers) - 1] * len(trainable))
    return layers, params, groups
