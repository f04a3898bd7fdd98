"""Capture and restore what a run changes: weights, buffers, optimizer and scheduler state, modes, gradients
and RNG states."""
from __future__ import annotations

import collections
import copy
import random
from typing import Any, Dict

import numpy as np
import torch

from .experiment import Experiment


def capture(experiment: Experiment, to_cpu: bool = False) -> Dict[str, Any]:
    """A deep copy of everything a training step can change, to start trials from or to put back; with
    ``to_cpu``, its tensors are held in host memory (restore puts them back where they belong)."""
    model = experiment.model
    keep = _to_cpu if to_cpu else _clone
    return {
        "model": keep(model.state_dict()),
        # state_dict leaves out non-persistent buffers (a running count, a cache), and parameters the
        # optimizer steps but the model does not own (a learned temperature held outside it)
        "buffers": {name: keep(b.detach()) for name, b in model.named_buffers()},
        "outside": [(p, keep(p.detach()), None if p.grad is None else keep(p.grad.detach()))
                    for p in _optimizer_only(experiment)],
        "optimizer": keep(experiment.optimizer.state_dict()),
        "scheduler": None if experiment.scheduler is None else copy.deepcopy(experiment.scheduler.state_dict()),
        "modes": {name: m.training for name, m in model.named_modules()},
        "devices": {name: p.device for name, p in model.named_parameters()},
        "grads": {name: None if p.grad is None else keep(p.grad.detach()) for name, p in model.named_parameters()},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy_rng": np.random.get_state(),
        "random_rng": random.getstate(),
    }


def restore(experiment: Experiment, saved: Dict[str, Any]) -> None:
    """Put back what :func:`capture` took."""
    model = experiment.model
    devices = set(saved["devices"].values())
    if len(devices) == 1:  # put the model back where it was (diagnose may have moved it)
        model.to(next(iter(devices)))
    else:  # spread over devices by hand (a pipeline split): each parameter goes back to its own
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.device != saved["devices"][name]:
                    p.data = p.data.to(saved["devices"][name])
    model.load_state_dict(saved["model"])
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in saved["buffers"] and b.shape == saved["buffers"][name].shape:
                b.copy_(saved["buffers"][name])
        for p, value, grad in saved["outside"]:
            p.copy_(value)
            p.grad = None if grad is None else grad.to(p.device)
    experiment.optimizer.load_state_dict(saved["optimizer"])
    if saved["scheduler"] is not None:  # its step count and last rates; the optimizer's groups hold the lr itself
        experiment.scheduler.load_state_dict(saved["scheduler"])
    for name, m in model.named_modules():
        if name in saved["modes"]:
            m.train(saved["modes"][name])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    np.random.set_state(saved["numpy_rng"])
    random.setstate(saved["random_rng"])
    for name, p in model.named_parameters():
        grad = saved["grads"].get(name)
        p.grad = None if grad is None else grad.to(p.device)


def _clone(value: Any) -> Any:
    """A copy of ``value`` with every tensor cloned where it lies. Tensors are cloned, not deep-copied: a
    deep copy of an FSDP2 shard (a DTensor) goes through storages that FSDP2 frees and re-allocates."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if type(value) in (dict, collections.OrderedDict):
        out = type(value)((k, _clone(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a module state_dict's versions, which load_state_dict reads
            out._metadata = copy.deepcopy(value._metadata)
        return out
    if type(value) in (list, tuple):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


def _to_cpu(value: Any) -> Any:
    """A copy of ``value`` (tensors inside dicts, lists and tuples) with every tensor in host memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


def _optimizer_only(experiment: Experiment) -> list:
    """Parameters in the optimizer's groups that the model does not hold."""
    owned = {id(p) for p in experiment.model.parameters()}
    seen, out = set(), []
    for group in experiment.optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in owned and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def nbytes(saved: Dict[str, Any]) -> int:
    """The bytes a captured state holds on this rank in the model's and the optimizer's tensors (under FSDP2,
    its shards alone); the RNG states beside them are a few kilobytes whatever the model."""
    return _tensor_bytes([saved[k] for k in ("model", "buffers", "outside", "optimizer", "grads")])


def _tensor_bytes(saved: Any) -> int:
    if isinstance(saved, torch.Tensor):
        local = saved.to_local() if hasattr(saved, "to_local") else saved
        return local.numel() * local.element_size()
    if isinstance(saved, dict):
        return sum(_tensor_bytes(v) for v in saved.values())
    if isinstance(saved, (list, tuple)):
        return sum(_tensor_bytes(v) for v in saved)
    return 0
