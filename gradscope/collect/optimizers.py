"""What a profile records of the optimizer: whether it divides its step by a running statistic of the
gradient (Adam's family), for which the advice arms the skip-step guard; and what its parameter groups and
state say of its configuration (``setup``), read when a profile is taken."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..analyse.profile import OptimizerSetup

# An optimizer whose param groups hold one of these divides its step by a running statistic of the
# gradient (Adam's family: betas and eps; RMSprop, Adagrad, Adadelta: eps; Rprop: the sign, etas), so
# its step does not scale with the gradient's norm. SGD (and ASGD) hold none of them.
ADAPTIVE_KEYS = ("betas", "eps", "etas")


def is_adaptive(optimizer: Any) -> bool:
    """Whether the optimizer divides its step by a running statistic of the gradient (see ADAPTIVE_KEYS)."""
    return any(key in group for group in optimizer.param_groups for key in ADAPTIVE_KEYS)


# A gradient element counts as an outlier of Adam's second moment beyond this many of its running RMS
# (sqrt(v_hat)): the z of the spike rule, read per element (OLMo-core counts such outliers the same way).
OUTLIER_K = 6.0


def is_exempt_from_decay(module: nn.Module, local_name: str) -> bool:
    """A parameter that weight decay should leave alone (as Hugging Face's Trainer, timm and nanoGPT do): a
    bias, a normalization layer's weights, or an embedding table."""
    if local_name == "bias" or local_name.endswith("_bias"):
        return True
    kind = type(module).__name__
    return (isinstance(module, NORMS) or "Norm" in kind or isinstance(module, (nn.Embedding, nn.EmbeddingBag))
            or "Embedding" in kind)


NORMS = tuple(getattr(nn, name) for name in ("LayerNorm", "GroupNorm", "LocalResponseNorm", "RMSNorm")
              if hasattr(nn, name)) + (nn.modules.batchnorm._NormBase,)


@torch.no_grad()
def setup(optimizer: Any, model: nn.Module, layers: Sequence[Any], active: Sequence[int]) -> OptimizerSetup:
    """What ``optimizer`` does with the watched layers' trainable parameters: which it holds, which it decays
    that it should not, its eps and beta2, and per layer the share of elements whose step eps outweighs and
    the share of gradient elements beyond OUTLIER_K x sqrt(v_hat). Reads the parameter groups and the state
    once: nothing here runs on a training step."""
    named = dict(model.named_parameters())
    owners = {f"{prefix}.{local}" if prefix else local: (module, local)
              for prefix, module in model.named_modules() for local, _ in module.named_parameters(recurse=False)}
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    trainable = [(name, named[name]) for layer in layers for name in layer.param_names
                 if name in named and named[name].requires_grad]
    missed = [(n, p) for n, p in trainable if id(p) not in group_of]
    exempt = [(n, group_of[id(p)]) for n, p in trainable if id(p) in group_of and n in owners
              and is_exempt_from_decay(*owners[n]) and float(group_of[id(p)].get("weight_decay", 0) or 0) > 0]
    eps = [float(g["eps"]) for g in optimizer.param_groups if isinstance(g.get("eps"), (int, float))]
    beta2 = [float(g["betas"][1]) for g in optimizer.param_groups
             if isinstance(g.get("betas"), (tuple, list)) and len(g["betas"]) > 1]
    dominated, outliers = _second_moment(optimizer, named, layers, active, group_of)
    return OptimizerSetup(
        name=type(optimizer).__name__, trainable=len(trainable), missed=tuple(n for n, _ in missed),
        missed_numel=sum(p.numel() for _, p in missed), trainable_numel=sum(p.numel() for _, p in trainable),
        decayed_exempt=tuple(n for n, _ in exempt),
        weight_decay=max((float(g["weight_decay"]) for _, g in exempt), default=0.0),
        eps=max(eps, default=math.nan), beta2=max(beta2, default=math.nan),
        eps_dominated=dominated, outliers=outliers)


def _second_moment(optimizer: Any, named: Dict[str, nn.Parameter], layers: Sequence[Any], active: Sequence[int],
                   group_of: Dict[int, Dict[str, Any]]) -> Tuple[np.ndarray, np.ndarray]:
    """Per active layer, from Adam's ``exp_avg_sq`` (bias-corrected by the group's beta2 and the step): the
    share of elements with v > 0 whose sqrt(v_hat) is below eps, and the share of the current gradient's
    elements beyond OUTLIER_K x sqrt(v_hat). NaN where the layer has no such state (SGD, a layer not yet
    stepped, a sharded state) or, for the outliers, no gradient."""
    dominated, outliers = np.full(len(active), np.nan), np.full(len(active), np.nan)
    for k, i in enumerate(active):
        below = held = beyond = counted = 0
        for name in layers[i].param_names:
            p = named.get(name)
            group = group_of.get(id(p)) if p is not None else None
            state = optimizer.state.get(p) if group is not None else None
            v = state.get("exp_avg_sq") if state else None
            if type(v) is not torch.Tensor or v.layout != torch.strided or "betas" not in group:
                continue  # no second moment here, a sparse one, or a DTensor shard (FSDP2): not read
            step = float(state.get("step", 1))
            rms = (v.float() / max(1.0 - float(group["betas"][1]) ** max(step, 1.0), 1e-30)).sqrt()
            live = v > 0
            held += int(live.sum())
            below += int((live & (rms < float(group.get("eps", 0.0)))).sum())
            if type(p.grad) is torch.Tensor and p.grad.layout == torch.strided:
                counted += p.grad.numel()
                beyond += int((p.grad.float().abs() > OUTLIER_K * rms).sum())
        if held:
            dominated[k] = below / held
        if counted:
            outliers[k] = beyond / counted
    return dominated, outliers
