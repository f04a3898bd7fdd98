"""A skip that is a skip: on a step the guard skips, the optimizer leaves the weights and every piece of its state
exactly as they were (no moment decay, no weight decay, no step count), with the decision on the device and no
host sync.

Two ways, chosen per optimizer when the Clipper is attached to it:

- ``found_inf``: torch's fused Adam, AdamW, SGD and Adagrad (``fused=True``) read ``optimizer.found_inf`` and skip
  the whole update on the device when it is non-zero, as ``GradScaler`` has them skip an overflowing step. The
  guard's decision is that tensor (combined with ``GradScaler``'s where it set one). No copy, no extra pass.
- ``restore``: any other optimizer. Before its step the weights and state tensors it may change are copied into
  buffers kept between steps; after it, each is put back where the step was skipped
  (``torch.where(skipped, saved, current)``, in place). The cost is one copy of those tensors in memory (for
  AdamW: the weights and both moments, so three times the model's parameters) and two passes over them per
  step (``benchmarks/overhead.py --guards`` measures them).

On an accelerator, torch's unfused optimizers keep their step count on the host unless ``capturable=True``;
attaching turns that option on where the optimizer has it and the device supports it (a setting of torch's, for
CUDA graphs: the count moves beside the weights, the update is the same), once, before the first step.

State that a skipped step creates (the optimizer's first step) is zero-filled: Adam's moments and step count
start at zero anyway, and a zero momentum buffer makes SGD's next step the plain gradient, as a fresh one would
(with ``dampening=0``). An optimizer that keeps state outside tensors (LBFGS's counters), or a step count on the
host while the decision lives on an accelerator, cannot be put back without a host sync: it is refused with one
clear error at its first step.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from ...collect import distributed
from ...errors import GradscopeError

FUSED = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)  # they read found_inf


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips on ``found_inf`` by itself: one of torch's fused ones, fused in every group."""
    return type(optimizer) in FUSED and all(group.get("fused") for group in optimizer.param_groups)


class StepSkipper:
    """Makes ``optimizer.step()`` a no-op wherever ``flag`` (set by the Clipper each step) is 1."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = distributed.local(params[0]).device if params else torch.device("cpu")
        self.optimizer = optimizer
        self.kind = "found_inf" if takes_found_inf(optimizer) else "restore"
        if self.kind == "restore" and device.type != "cpu":
            _capture_steps(optimizer, device)
        # one tensor for the life of the optimizer: a step pre-hook can run before the decision (Lightning
        # calls the backward pass inside step(closure)), and reads it after, when the step is applied
        self.flag = torch.zeros((), dtype=torch.float32, device=device)
        self._prior_found_inf: Optional[Any] = None
        self._had_state: set = set()
        self._depth = 0  # a subclass whose step() calls super().step() runs the hooks nested: the outer ones act
        self._saved: Dict[Tuple[int, str], torch.Tensor] = {}  # restore: the buffers, kept between steps
        self._pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._host: List[Tuple[Dict[str, Any], str, Any]] = []  # restore: state that is not a tensor, to check
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def decide(self, skip: torch.Tensor) -> None:
        """This step's decision (a bool tensor on the gradients' device), taken before ``optimizer.step()``."""
        self.flag.copy_(skip.to(self.flag.device, torch.float32))
        self._depth = 0  # a step that raised left its post-hook unrun

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def _before(self, optimizer, args, kwargs) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        state = optimizer.state
        self._had_state = {id(p) for p in self._params() if state.get(p)}
        if self.kind == "found_inf":
            prior = getattr(optimizer, "found_inf", None)  # GradScaler's, set just before its step
            self._prior_found_inf = prior
            optimizer.found_inf = self.flag if prior is None else torch.maximum(prior, self.flag.to(prior))
            return
        self._pairs, self._host = [], []
        for p in self._params():
            self._pairs.append((p, self._buffer(id(p), "", p)))
            for key, value in state.get(p, {}).items():
                if torch.is_tensor(value):
                    self._pairs.append((value, self._buffer(id(p), key, value)))
                else:
                    self._host.append((state[p], key, value))
        current = [distributed.local(t) for t, _ in self._pairs]
        saved = [s for _, s in self._pairs]
        if current:
            torch._foreach_copy_(saved, current)

    def _buffer(self, owner: int, key: str, like: torch.Tensor) -> torch.Tensor:
        local = distributed.local(like)
        buffer = self._saved.get((owner, key))
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype or buffer.device != local.device:
            self._check_device(local, key)
            buffer = self._saved[(owner, key)] = torch.empty_like(local)
        return buffer

    def _check_device(self, tensor: torch.Tensor, key: str) -> None:
        if tensor.device != self.flag.device:
            raise GradscopeError(
                f"{type(self.optimizer).__name__} keeps its {key or 'weights'} on {tensor.device} while the guard "
                f"decides on {self.flag.device}: a skipped step could not be undone without a host sync",
                "make the optimizer with fused=True (or capturable=True), so its state lives beside the gradients")

    @torch.no_grad()
    def _after(self, optimizer, args, kwargs) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        state = optimizer.state
        mask = self.flag.bool()
        try:
            if self.kind == "found_inf":
                if self._prior_found_inf is None:
                    del optimizer.found_inf
                else:
                    optimizer.found_inf = self._prior_found_inf
            else:
                for current, saved in self._pairs:
                    local = distributed.local(current)
                    torch.where(mask, saved, local, out=local)
                for entry, key, value in self._host:
                    if entry.get(key, value) != value:
                        raise GradscopeError(
                            f"{type(optimizer).__name__} keeps {key!r} outside tensors: a skipped step could not be "
                            "undone without a host sync",
                            "use the guard with a torch optimizer that keeps its state in tensors (Adam, AdamW, SGD)")
            for p in self._params():  # state this step created: zero where it was skipped
                if id(p) in self._had_state:
                    continue
                for key, value in state.get(p, {}).items():
                    if torch.is_tensor(value):
                        local = distributed.local(value)
                        self._check_device(local, key)
                        local.masked_fill_(mask, 0)
                    elif self.kind == "restore":
                        raise GradscopeError(
                            f"{type(optimizer).__name__} keeps {key!r} outside tensors: a skipped step could not be "
                            "undone without a host sync",
                            "use the guard with a torch optimizer that keeps its state in tensors (Adam, AdamW, SGD)")
        finally:
            self._pairs, self._host = [], []
            self.flag.zero_()  # a step the Clipper did not judge is not skipped


def _capture_steps(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Keep the step count beside the weights (``capturable=True``), where the optimizer and the device allow it."""
    from torch.optim.optimizer import _get_capturable_supported_devices
    if "capturable" not in optimizer.defaults or device.type not in _get_capturable_supported_devices():
        return
    for group in optimizer.param_groups:
        group["capturable"] = True
    for state in optimizer.state.values():  # a resumed optimizer: its counts move once, now
        if torch.is_tensor(state.get("step")) and state["step"].device != device:
            state["step"] = state["step"].to(device)
