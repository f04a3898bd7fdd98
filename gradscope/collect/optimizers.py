"""What a profile records of the optimizer: whether it divides its step by a running statistic of the
gradient (Adam's family), for which the advice arms the skip-step guard."""
from __future__ import annotations

from typing import Any

# An optimizer whose param groups hold one of these divides its step by a running statistic of the
# gradient (Adam's family: betas and eps; RMSprop, Adagrad, Adadelta: eps; Rprop: the sign, etas), so
# its step does not scale with the gradient's norm. SGD (and ASGD) hold none of them.
ADAPTIVE_KEYS = ("betas", "eps", "etas")


def is_adaptive(optimizer: Any) -> bool:
    """Whether the optimizer divides its step by a running statistic of the gradient (see ADAPTIVE_KEYS)."""
    return any(key in group for group in optimizer.param_groups for key in ADAPTIVE_KEYS)
