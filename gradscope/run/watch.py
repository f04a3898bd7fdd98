"""``gradscope watch``: observe a training script gradscope was not written into, as coverage or cProfile do.

The script runs as ``python SCRIPT ARGS`` (or ``python -m MODULE ARGS``) would run it: its own
``sys.argv``, ``__main__``, stdin, stdout and exit code. gradscope observes it from outside:

- **Every optimizer step**, through torch's global optimizer-step pre-hook
  (``torch.optim.optimizer.register_optimizer_step_pre_hook``): before ``step()`` applies it, so what is
  seen is the gradient after the script's own clipping.
- **The script's own norm clipping**, where it calls ``torch.nn.utils.clip_grad_norm_``: that function
  is wrapped, so the step is observed just before it clips (the gradient before clipping, as a Monitor
  told ``clip=`` sees it), and the threshold is watched as the Monitor watches it.
- **The loss**, from ``Tensor.backward()`` on a scalar: the losses of a step's backward passes are
  averaged into it (with several optimizers, each step's losses go to every one of them).
- **The model**, found once per optimizer at its first step: the root modules that hold its parameters
  (those that no other module holding them contains), so that layers carry the model's own names. One
  Monitor per optimizer and root module; each gives one report section.
- **Live**, with ``--log``: the first Monitor made streams its figures and findings as a Monitor given
  ``log=`` does (see :mod:`gradscope.live`): to the script's own W&B or MLflow run, or to TensorBoard.

Nothing here trains: no trial can run, so the advice is an estimate from the watched run, and says so.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import os
import runpy
import sys
import warnings
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

from .. import recorder
from ..collect.layers import unwrap
from ..monitor import Monitor

MOST_LOSSES = 256  # backward passes whose losses one step averages (gradient accumulation), the latest kept
AT_STEP = ("gradients as optimizer.step() receives them, after any clipping the script does itself; one "
           "observation per optimizer step (gradscope watch)")
AT_CLIP = ("pre-clip gradients: observed as the script called clip_grad_norm_, before it clipped; one "
           "observation per optimizer step (gradscope watch)")


@dataclasses.dataclass
class Watched:
    """One optimizer and one model it trains, with the Monitor that observes them."""

    optimizer: torch.optim.Optimizer
    root: nn.Module
    monitor: Monitor
    seen_clip: bool = False  # this step was observed already, where the script clipped


class Watcher:
    """Hooks torch for the length of a script: ``start()`` before it runs, ``stop()`` after."""

    def __init__(self, rules: Any = None, every: int = 1, clip_observed: bool = True, log: Any = None) -> None:
        self.rules, self.every = rules, every
        self._log = log  # the live log, for the first Monitor made (one log has one key space)
        self.watched: List[Watched] = []
        self.built: Optional[List[Any]] = None  # the reports, built before the script destroyed its process group
        self._by_optimizer: Dict[int, List[Watched]] = {}
        # the scalars backward ran on since the last step: at most MOST_LOSSES (a script that never steps)
        self._losses: Deque[torch.Tensor] = collections.deque(maxlen=MOST_LOSSES)
        self._undo: List[Callable[[], None]] = []
        self._clip_observed = clip_observed

    # -- hooking torch --------------------------------------------------------------------------------
    def start(self) -> None:
        handle = register_optimizer_step_pre_hook(self._before_step)
        self._undo.append(handle.remove)
        self._patch(torch.Tensor, "backward", self._backward)
        if torch.distributed.is_available():
            self._patch(torch.distributed, "destroy_process_group", self._destroy)
        if self._clip_observed:  # clip_grad_norm_, and the half that Accelerate (the HF Trainer) calls
            import torch.nn.utils.clip_grad as clip_module
            for name in ("clip_grad_norm_", "clip_grads_with_norm_"):
                original = getattr(torch.nn.utils, name, None)
                if original is None:  # (clip_grads_with_norm_ came with torch 2.6)
                    continue
                wrapped = self._clip(original, name)
                for owner in (torch.nn.utils, clip_module):
                    if getattr(owner, name, None) is original:
                        self._patch(owner, name, lambda _original, wrapped=wrapped: wrapped)

    def stop(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        self._undo.append(lambda: setattr(owner, name, original))

    def _destroy(self, original: Callable) -> Callable:
        """The script ends its process group: build the reports first, while the ranks can still reduce."""
        @functools.wraps(original)
        def destroy_process_group(*args, **kwargs):
            group = args[0] if args else kwargs.get("group")
            if self.built is None and group is None and any(e.monitor.steps for e in self.watched):
                self.built = reports(self, Ending(0))  # the default group, the one the Monitors reduce over
            return original(*args, **kwargs)
        return destroy_process_group

    def _backward(self, original: Callable) -> Callable:
        losses = self._losses

        @functools.wraps(original)
        def backward(tensor, *args, **kwargs):
            if tensor.numel() == 1 and tensor.is_floating_point():
                losses.append(tensor.detach().reshape(()))
            return original(tensor, *args, **kwargs)
        return backward

    def _clip(self, original: Callable, name: str) -> Callable:
        @functools.wraps(original)
        def clip(parameters, max_norm, *args, **kwargs):
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            norm_type = kwargs.get("norm_type", args[0] if args and name == "clip_grad_norm_" else 2.0)
            if float(norm_type) == 2.0:
                threshold = float(max_norm)
                for entry in self._entries_for(params, clip=threshold if threshold < float("inf") else None):
                    if not entry.seen_clip:
                        self._observe(entry)
                        entry.seen_clip = True
            return original(params, max_norm, *args, **kwargs)
        return clip

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any):
        """Observe the step; where ``step(closure)`` computes the gradients itself (LBFGS, Lightning's
        automatic optimization), wrap the closure instead, to observe once it has run backward."""
        closure = kwargs.get("closure", args[0] if args else None)
        if callable(closure):
            def observed():  # (the Monitors are made after the closure: it may clip, and that is watched)
                result = closure()
                self._step_seen(self._entries(optimizer))
                return result
            if "closure" in kwargs:
                return args, {**kwargs, "closure": observed}
            return (observed, *args[1:]), kwargs
        self._step_seen(self._entries(optimizer))
        return None

    def _step_seen(self, entries: List[Watched]) -> None:
        for entry in entries:
            if entry.seen_clip:
                entry.seen_clip = False
                continue
            self._observe(entry)

    def _observe(self, entry: Watched) -> None:
        loss = None
        if self._losses:
            first = self._losses[0]
            loss = first if len(self._losses) == 1 else torch.stack(
                [t.to(first.device, torch.float32) for t in self._losses]).mean()
        entry.monitor.observe(loss)
        if entry is self._last_of_step(entry):
            self._losses.clear()

    def _last_of_step(self, entry: Watched) -> Watched:
        """The losses noted since the last step go to every Monitor of the optimizer stepping now."""
        return self._by_optimizer[id(entry.optimizer)][-1]

    # -- finding the models -----------------------------------------------------------------------------
    def _entries(self, optimizer: torch.optim.Optimizer, clip: Optional[float] = None) -> List[Watched]:
        known = self._by_optimizer.get(id(optimizer))
        if known is None:
            known = self._by_optimizer[id(optimizer)] = [
                Watched(optimizer, root, self._monitor(root, params, optimizer, clip))
                for root, params in roots(optimizer)]
            self.watched.extend(known)
        return known

    def _entries_for(self, params: Sequence[torch.Tensor], clip: float) -> List[Watched]:
        """The watched optimizers that hold any of ``params``: those met already, else (the first clip comes
        before the first step) those found among the live ones."""
        ids = {id(p) for p in params}
        known = [e for entries in self._by_optimizer.values() for e in entries
                 if any(id(p) in ids for group in e.optimizer.param_groups for p in group["params"])]
        if known:
            return known
        found = []
        inner = {id(o): o for o in map(innermost, live_optimizers())}  # a wrapper and its optimizer: once
        for optimizer in inner.values():
            if any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
                found.extend(self._entries(optimizer, clip))
        return found

    def _monitor(self, root: nn.Module, params: List[nn.Parameter], optimizer: torch.optim.Optimizer,
                 clip: Optional[float]) -> Monitor:
        log, self._log = self._log, None
        monitor = Monitor(root, parameters=params, optimizer=optimizer, every=self.every, clip=clip, log=log)
        monitor.measurement = AT_CLIP if clip is not None else AT_STEP
        return monitor


def live(kind: type) -> List[Any]:
    """Every live object of ``kind`` (a scan of the garbage collector's objects: once per optimizer). Some
    modules' lazy attributes warn when an isinstance() check touches them: those warnings are not the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, kind) and not isinstance(o, weakref.ProxyTypes)]


def live_optimizers() -> List[torch.optim.Optimizer]:
    return live(torch.optim.Optimizer)


def innermost(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside a wrapper that is one too (Accelerate's AcceleratedOptimizer): its step is the one
    the global hook sees."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def roots(optimizer: torch.optim.Optimizer) -> List[Tuple[nn.Module, List[nn.Parameter]]]:
    """The root modules that hold the optimizer's parameters (no other module holding them contains them),
    each with the trainable parameters of it that the optimizer holds, largest first; a wrapper (DDP,
    torch.compile) counts as its inner model. Read once, from the live objects: a script's model need not
    be anywhere gradscope can name."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    holders = [m for m in live(nn.Module) if any(id(p) in held for p in m.parameters())]
    inside = {id(child) for module in holders for child in module.modules() if child is not module}
    found, claimed = [], set()
    for module in sorted((m for m in holders if id(m) not in inside), key=lambda m: -sum(p.numel() for p in m.parameters())):
        module = unwrap(module)
        params = [p for p in module.parameters() if id(p) in held and p.requires_grad and id(p) not in claimed]
        if params:
            claimed.update(id(p) for p in params)
            found.append((module, params))
    return found


@dataclasses.dataclass
class Ending:
    """How the script ended: its exit code, and the exception that ended it (None after a normal end)."""

    code: int
    exc_type: Optional[type] = None
    exc: Optional[BaseException] = None
    sigterm: Any = None  # the SIGTERM handler to give back once the report is written (recorder.disarm)

    @property
    def failed(self) -> bool:
        return self.code != 0


def run(target: str, argv: Sequence[str], module: bool) -> Ending:
    """Run the script (or module, with ``module``) as Python would, as ``__main__``, with ``argv`` after its
    name; SIGTERM ends it as :class:`~gradscope.recorder.Terminated` (exit 143). Its own exception is
    printed as Python prints it; nothing of it escapes."""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    previous = recorder.arm()
    ending = _run(target, argv, module)
    recorder.hold(previous)  # the report is written next: SIGTERM ignored until it is
    sys.argv, sys.path[:] = saved_argv, saved_path
    return dataclasses.replace(ending, sigterm=previous)


def _run(target: str, argv: Sequence[str], module: bool) -> Ending:
    try:
        if module:
            sys.argv = [target, *argv]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *argv]
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        return Ending(0)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
            code = 1
        return Ending(code, type(exc) if code else None, exc if code else None)
    except KeyboardInterrupt as exc:
        sys.stderr.write("KeyboardInterrupt\n")
        return Ending(130, type(exc), exc)
    except BaseException as exc:  # noqa: BLE001 - the script's own error: printed as Python prints it
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return Ending(1, type(exc), exc)


def reports(watcher: Watcher, ending: Ending) -> List[Any]:
    """One report per Monitor that observed a step; partial, with the reason, where the script failed (or
    those built already, where the script destroyed its process group after training)."""
    if watcher.built is not None:
        return watcher.built
    rules = watcher.rules
    out = []
    for entry in watcher.watched:
        monitor = entry.monitor
        if monitor.steps == 0:
            continue
        name = type(unwrap(entry.root)).__name__
        if ending.exc_type is None or not ending.failed:
            out.append(monitor.report(rules, name=name))
        else:
            report = recorder.partial_report(monitor, rules, ending.exc_type, ending.exc, name=name)
            if report is not None:
                out.append(report)
    for entry in watcher.watched:
        entry.monitor.close()
    return out
