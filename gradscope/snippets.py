"""Ready-to-paste clipping code for plain PyTorch, Lightning, Hugging Face and timm, per method."""
from __future__ import annotations

from typing import Dict, Optional


def snippets(method: str, threshold: Optional[float], sharded: bool = False) -> Dict[str, str]:
    """One line (or a short block) per framework; frameworks that lack the method say what to do instead.

    The norm threshold is a global norm: under FSDP it is the norm that FSDP's clip_grad_norm_ and
    torch.nn.utils.clip_grad_norm_ on DTensor parameters compute across ranks, and ``sharded`` says so.
    """
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
