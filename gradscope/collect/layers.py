"""Layers: a model's parameters grouped by the module that owns them, and where each class is defined."""
from __future__ import annotations

import inspect
from typing import List, Optional, Tuple

from torch import nn

from ..analyse.profile import LayerInfo


def class_source(cls: type) -> Optional[Tuple[str, int]]:
    """Where a class is defined (file, 1-based line), or None when Python cannot tell."""
    try:
        return inspect.getsourcefile(cls) or inspect.getfile(cls), inspect.getsourcelines(cls)[1]
    except (TypeError, OSError):
        return None


def module_class(module: nn.Module) -> type:
    """The user's class: FSDP2's fully_shard swaps in a subclass such as FSDPLinear(FSDPModule, Linear)."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) > 1:
        return cls.__bases__[-1]
    return cls


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel or torch.compile's wrapper."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and type(model).__name__ == "DistributedDataParallel":
            inner = model.module
        if inner is None:
            return model
        model = inner


def group_parameters(model: nn.Module, tracked: Optional[set] = None
                      ) -> Tuple[List[LayerInfo], List[nn.Parameter], List[int]]:
    """One group per module that owns parameters directly; a shared parameter goes to its first owner.

    With ``tracked`` (parameter ids, e.g. one optimizer's), modules owning none of them are left out.
    """
    layers: List[LayerInfo] = []
    params: List[nn.Parameter] = []
    groups: List[int] = []
    seen = set()
    for module_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)
               if id(p) not in seen and (tracked is None or id(p) in tracked)]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        trainable = [(n, p) for n, p in own if p.requires_grad]
        prefix = f"{module_name}." if module_name else ""
        layers.append(LayerInfo(
            name=module_name or "(root)", kind=module_class(module).__name__,
            param_names=tuple(prefix + n for n, _ in own),
            trainable_numel=sum(p.numel() for _, p in trainable),
            frozen_numel=sum(p.numel() for _, p in own if not p.requires_grad),
            source=class_source(module_class(module)),
        ))
        params.extend(p for _, p in trainable)
        groups.extend([len(layers) - 1] * len(trainable))
    return layers, params, groups


class BackwardOrder:
    """The order in which the first backward reached each layer (``groups``: each parameter's), to name
    the layer that went non-finite first: one gradient hook per parameter, removed at ``remove()``."""

    def __init__(self, params: List[nn.Parameter], groups: List[int]) -> None:
        self.order: List[int] = []
        self._seen: set = set()
        register = getattr(params[0], "register_post_accumulate_grad_hook", None) if params else None
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(g))
                       for p, g in zip(params, groups)] if register is not None else []

    def _hook(self, group: int):
        def hook(_param) -> None:
            if group not in self._seen:
                self._seen.add(group)
                self.order.append(group)
        return hook

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def first(self, mask, n_groups: int) -> int:
        """The group first in backward order among ``mask`` (the last group first, where no backward was seen)."""
        for g in self.order or range(n_groups - 1, -1, -1):
            if mask[g]:
                return g
        return int(mask.argmax())
