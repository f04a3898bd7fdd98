"""The guards' state on the device: the skip-step window, the adaptive threshold's moving statistics and the
counters, updated by tensor operations alone (no host sync); see ``gradscope.advise.guards`` for the rules."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from ...collect import distributed
from ...errors import GradscopeError
from ...advise.guards import Adaptive, Skip

EVENTS = 256  # the first this many skipped or clipped steps are kept with their step, norm and z
REBASES = 32  # the first this many steps where the skip guard re-based are kept
NEW_KEYS = {"run", "recent", "rebased", "rebase_steps", "held", "held_steps", "held_count"}  # a state saved before re-basing lacks them: zeros


def total_norm(grads: List[torch.Tensor], plain: bool) -> torch.Tensor:
    """The global L2 norm of dense gradients, in float32 on the first one's device: one ``_foreach_norm``;
    the local shards of DTensor gradients are summed over ranks by one all-reduce. ``plain``: every
    gradient is a plain tensor (no DTensor), the common case, which needs no per-tensor check. Gradients
    spread over devices (a model split by hand) have their norms gathered on the first one's."""
    if plain:
        norms = torch._foreach_norm(grads)
        if len({(n.dtype, n.device) for n in norms}) > 1:
            device = norms[0].device
            norms = [n.float().to(device) for n in norms]
        return torch.stack(norms).float().square().sum().sqrt()
    sharded = [g for g in grads if distributed.is_sharded(g)]
    whole = [g for g in grads if not distributed.is_sharded(g)]
    device = distributed.local(grads[0]).device
    squares = torch.zeros((), dtype=torch.float32, device=device)
    if whole:
        norms = torch._foreach_norm([distributed.local(g) for g in whole])
        squares = squares + torch.stack([n.float().to(device) for n in norms]).square().sum()
    if sharded:
        norms = torch._foreach_norm([distributed.local(g) for g in sharded])
        part = torch.stack([n.float().to(device) for n in norms]).square().sum()
        squares = squares + distributed.all_reduce_sum(part)
    return squares.sqrt()


class GuardState:
    """The device-side state of one Clipper's guards and counters; created at the first guarded step."""

    def __init__(self, skip: Optional[Skip], adaptive: Optional[Adaptive], device: torch.device) -> None:
        self.skip, self.adaptive = skip, adaptive
        f = dict(dtype=torch.float32, device=device)
        i = dict(dtype=torch.int64, device=device)
        width = skip.window if skip else 1
        held = skip.held if skip else 1
        self.tensors: Dict[str, torch.Tensor] = {
            "step": torch.zeros((), **i),
            "window": torch.zeros(2, width + 1, **f),  # rows: norm, loss; the last column takes no value
            "accepted": torch.zeros((), **i),  # values pushed into the window
            "skipped": torch.zeros((), **i),
            "clipped": torch.zeros((), **i),
            "scale_log_sum": torch.zeros((), **f),  # sum of log(scale) over clipped steps: how much
            "ema": torch.zeros(2, **f),  # adaptive: mean, variance (sums over the warm-up until it ends)
            "events": torch.zeros(EVENTS, 4, **f),  # step, norm, z (norm's, or the loss's if larger), scale
            "logged": torch.zeros((), **i),
            "run": torch.zeros((), **i),  # skips in a row, up to this step
            "recent": torch.zeros(width, **i),  # 1 where the step (at step % window) was skipped
            "rebased": torch.zeros((), **i),
            "rebase_steps": torch.zeros(REBASES, **i),  # the first REBASES steps where the guard re-based
            "held": torch.zeros(2, held, **f),  # the last finite values skipped, to enter the window on a re-base
            "held_steps": torch.full((held,), -(2 ** 62), **i),  # their steps
            "held_count": torch.zeros((), **i),
        }
        self._slots = torch.arange(width, device=device)
        self._held_slots = torch.arange(held, device=device)

    def decide(self, norm: torch.Tensor, loss: Optional[torch.Tensor], threshold: Optional[float]):
        """(factor, skip): the factor every gradient is multiplied by this step (0 to skip, else the clipping
        scale, <= 1), and whether the step is skipped (a bool tensor)."""
        t = self.tensors
        scale = torch.ones((), dtype=torch.float32, device=norm.device)
        limit = None
        if threshold is not None:
            limit = torch.full((), float(threshold), dtype=torch.float32, device=norm.device)
        if self.adaptive is not None:
            limit = self._adaptive_limit(norm)
        if limit is not None:
            scale = torch.where(norm > limit, limit / (norm + 1e-6), scale).clamp(max=1.0)
        skip = torch.zeros((), dtype=torch.bool, device=norm.device)
        z = torch.zeros((), dtype=torch.float32, device=norm.device)
        if self.skip is not None:
            skip, z = self._skip(norm, loss)
        clipped = (scale < 1.0) & ~skip
        factor = torch.where(skip, torch.zeros_like(scale), scale)
        self._log(skip | clipped, norm, z, factor)
        t["skipped"] += skip.long()
        t["clipped"] += clipped.long()
        t["scale_log_sum"] += torch.where(clipped, scale.clamp(min=1e-30).log(), torch.zeros_like(scale))
        t["step"] += 1
        return factor, skip

    def _adaptive_limit(self, norm: torch.Tensor) -> torch.Tensor:
        a, t = self.adaptive, self.tensors
        ema = t["ema"]
        warming = t["step"] < a.warmup
        finite = torch.isfinite(norm)
        safe = torch.where(finite, norm, torch.zeros_like(norm))
        n = float(a.warmup)
        # during the warm-up the two slots hold the sum and the sum of squares; at its end, mean and variance
        mean = ema[0] / n
        seeded = torch.stack([mean, (ema[1] / n - mean.square()).clamp(min=0.0)])
        ending = t["step"] == a.warmup
        ema.copy_(torch.where(ending, seeded, ema))
        limit = ema[0] + a.z * ema[1].sqrt()
        limit = torch.where(warming, torch.full_like(limit, math.inf), limit)
        used = torch.minimum(safe, limit)
        delta = used - ema[0]
        updated = torch.stack([ema[0] + (1 - a.alpha) * delta, a.alpha * (ema[1] + (1 - a.alpha) * delta.square())])
        summed = ema + torch.stack([safe, safe.square()])
        ema.copy_(torch.where(warming, summed, torch.where(finite, updated, ema)))
        return limit

    def _skip(self, norm: torch.Tensor, loss: Optional[torch.Tensor]):
        s, t = self.skip, self.tensors
        window = t["window"][:, :s.window]  # (the last column takes what a re-base does not admit)
        values = torch.stack([norm, norm if loss is None else loss.detach().float().reshape(())])
        n = t["accepted"].clamp(max=s.window)
        valid = (self._slots < n).float()
        count = n.clamp(min=1).float()
        mean = (window * valid).sum(dim=1) / count
        var = (((window - mean[:, None]) * valid).square()).sum(dim=1) / (count - 1).clamp(min=1.0)
        zs = (values - mean) / var.sqrt().clamp(min=1e-12)
        if loss is None:
            zs = zs[:1]
        z = zs.max()
        judged = n >= s.min_history
        finite = torch.isfinite(values).all()
        outlier = finite & judged & (z > s.z)
        # one skip past either bound is a new level, not a spike: what was skipped of it enters the window
        rebase = outlier & ((t["run"] >= s.max_consecutive) | (t["recent"].sum() >= s.max_skips))
        skip = ~finite | (outlier & ~rebase)
        self._admit_held(rebase)
        t["recent"].copy_(torch.where(rebase, torch.zeros_like(t["recent"]), t["recent"]))
        slot = (t["rebased"].clamp(max=REBASES - 1)).reshape(1)
        kept = t["rebase_steps"].index_select(0, slot)
        t["rebase_steps"].index_copy_(0, slot, torch.where(rebase & (t["rebased"] < REBASES), t["step"].reshape(1), kept))
        t["rebased"] += rebase.long()
        # a skipped finite value is held aside; an accepted one enters the window at the next slot of the ring
        hold = skip & finite
        slot = (t["held_count"] % s.held).reshape(1)
        t["held"].index_copy_(1, slot, torch.where(hold, values, t["held"].index_select(1, slot)[:, 0]).reshape(2, 1))
        t["held_steps"].index_copy_(0, slot, torch.where(hold, t["step"], t["held_steps"].index_select(0, slot)[0])
                                    .reshape(1))
        t["held_count"] += hold.long()
        slot = (t["accepted"] % s.window).reshape(1)
        column = t["window"].index_select(1, slot)
        t["window"].index_copy_(1, slot, torch.where(skip, column, values.reshape(2, 1)))
        t["accepted"] += (~skip).long()
        t["recent"].index_copy_(0, (t["step"] % s.window).reshape(1), skip.long().reshape(1))
        t["run"].copy_(torch.where(skip, t["run"] + 1, torch.zeros_like(t["run"])))
        return skip, torch.where(judged, z, torch.zeros_like(z))

    def _admit_held(self, rebase: torch.Tensor) -> None:
        """On a re-base, the held values skipped within the window enter it, oldest first (one scatter; those not
        admitted go to the window's spare last column)."""
        s, t = self.skip, self.tensors
        steps = t["held_steps"]
        admit = rebase & (self._held_slots < t["held_count"].clamp(max=s.held)) & (t["step"] - steps < s.window)
        earlier = (steps[None, :] < steps[:, None]) & admit[None, :]
        rank = earlier.sum(dim=1)  # each admitted value's place among them, by step
        slots = torch.where(admit, (t["accepted"] + rank) % s.window, torch.full_like(rank, s.window))
        t["window"].index_copy_(1, slots, t["held"])
        t["accepted"] += admit.sum()
        t["held_count"].copy_(torch.where(rebase, torch.zeros_like(t["held_count"]), t["held_count"]))

    def _log(self, event: torch.Tensor, norm: torch.Tensor, z: torch.Tensor, factor: torch.Tensor) -> None:
        t = self.tensors
        slot = t["logged"].clamp(max=EVENTS - 1).reshape(1)
        row = torch.stack([t["step"].float(), norm, z, factor]).reshape(1, 4)
        kept = t["events"].index_select(0, slot)
        # written only for an event, and only while there is room (the last slot is not overwritten)
        write = event & (t["logged"] < EVENTS)
        t["events"].index_copy_(0, slot, torch.where(write, row, kept))
        t["logged"] += write.long()

    def counts(self) -> Dict[str, object]:
        """What the guards did so far (one copy to the host)."""
        host = {k: v.detach().cpu() for k, v in self.tensors.items()}
        clipped = int(host["clipped"])
        events = host["events"][: int(host["logged"])].tolist()
        ema = host["ema"]
        return {
            "steps": int(host["step"]), "skipped": int(host["skipped"]), "clipped": clipped,
            "rebased": int(host["rebased"]),
            "rebase_steps": host["rebase_steps"][: min(int(host["rebased"]), REBASES)].tolist(),
            "mean_clip_scale": math.exp(float(host["scale_log_sum"]) / clipped) if clipped else 1.0,
            "events": [{"step": int(e[0]), "norm": e[1], "z": e[2], "scale": e[3]} for e in events],
            "adaptive_threshold": (float(ema[0] + self.adaptive.z * ema[1].clamp(min=0).sqrt())
                                   if self.adaptive and int(host["step"]) > self.adaptive.warmup else None),
        }

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.tensors) - set(state) - NEW_KEYS
        if "window" in state and state["window"].shape[1] == self.tensors["window"].shape[1] - 1:
            state = {**state, "window": torch.cat([state["window"], state["window"][:, :1]], dim=1)}  # saved before
        if missing or state["window"].shape != self.tensors["window"].shape:
            raise GradscopeError("the saved guard state does not match this Clipper's guards",
                                 "load it into a Clipper made with the same skip window")
        for key, value in self.tensors.items():
            if key in state:
                value.copy_(state[key].to(value.device))
