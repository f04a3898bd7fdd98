"""Ready-to-paste clipping code for plain PyTorch, Lightning, Hugging Face and timm, per method."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    from .guards import Skip


def snippets(method: str, threshold: Optional[float], sharded: bool = False, *, safety_net: Optional[float] = None,
             skip: Optional["Skip"] = None) -> Dict[str, str]:
    """One line (or a short block) per framework; frameworks that lack the method say what to do instead.

    The norm threshold is a global norm: under FSDP it is the norm that FSDP's clip_grad_norm_ and
    torch.nn.utils.clip_grad_norm_ on DTensor parameters compute across ranks, and ``sharded`` says so.
    With ``skip`` (the skip-step guard) every framework applies gradscope's Clipper, which clips and
    guards in one pass: through a callback in Lightning and the Hugging Face Trainer, whose own clipping
    is then switched off so the guard sees the unclipped norm.
    """
    if skip is not None:
        return guarded(method, threshold, safety_net, skip)
    if method == "none" or threshold is None:
        return {}
    t = f"{threshold:.3g}"
    if method == "norm":
        torch_line = f"torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={t})"
        if sharded:
            torch_line += ("  # global norm over all ranks: valid on FSDP2's DTensor parameters "
                           f"(FSDP1: model.clip_grad_norm_({t}))")
        return {
            "torch": torch_line,
            "lightning": f'Trainer(gradient_clip_val={t}, gradient_clip_algorithm="norm")',
            "huggingface": f"TrainingArguments(..., max_grad_norm={t})",
            "timm": f"--clip-grad {t} --clip-mode norm",
        }
    if method == "value":
        return {
            "torch": f"torch.nn.utils.clip_grad_value_(model.parameters(), clip_value={t})",
            "lightning": f'Trainer(gradient_clip_val={t}, gradient_clip_algorithm="value")',
            "huggingface": "Trainer clips by norm only: clip by value in a TrainerCallback's on_pre_optimizer_step"
                           f" with torch.nn.utils.clip_grad_value_(model.parameters(), {t})",
            "timm": f"--clip-grad {t} --clip-mode value",
        }
    if method == "agc":
        return {
            "torch": f"timm.utils.adaptive_clip_grad(model.parameters(), clip_factor={t})  # before optimizer.step()",
            "lightning": "override LightningModule.configure_gradient_clipping and call "
                         f"timm.utils.adaptive_clip_grad(self.parameters(), clip_factor={t})",
            "huggingface": "Trainer has no AGC: call timm.utils.adaptive_clip_grad(model.parameters(), "
                           f"clip_factor={t}) in a TrainerCallback, with max_grad_norm=None",
            "timm": f"--clip-grad {t} --clip-mode agc",
        }
    raise ValueError(f"unknown clipping method {method!r}")


def guarded(method: str, threshold: Optional[float], safety_net: Optional[float], skip: "Skip") -> Dict[str, str]:
    """The Clipper that clips as advised and arms the skip guard, made once (the torch lines) and handed to
    Lightning's and the Trainer's callbacks; timm's scripts have no hook for it."""
    guard = "skip=gradscope.Skip()" if skip == type(skip)() else \
        f"skip=gradscope.Skip(z={skip.z:g}, window={skip.window}, min_history={skip.min_history}, " \
        f"max_consecutive={skip.max_consecutive}, max_rate={skip.max_rate:g})"
    if method == "none" or threshold is None:
        net = f", safety_net={safety_net:.3g}" if safety_net is not None else ""
        make = f'gradscope.Clipper("none", None{net}, {guard})'
    else:
        make = f'gradscope.Clipper("{method}", {threshold:.3g}, {guard})'
    return {
        "torch": f"clipper = {make}.attach(optimizer)  # then clipper(model, loss=loss) before each optimizer.step()",
        "lightning": "Trainer(callbacks=[ClipperCallback(clipper)])  # gradscope.integrations.lightning; no "
                     "gradient_clip_val",
        "huggingface": "Trainer(..., callbacks=[ClipperTrainerCallback(clipper)])  # max_grad_norm=0; "
                       "gradscope.integrations.transformers",
    }
