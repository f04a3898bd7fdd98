"""The losses a Monitor is given, as device scalars: a step's own, and those noted after it.

Nothing here waits for the device: a loss stays a 0-d tensor until its step's row reaches the host.
"""
from __future__ import annotations

from typing import Optional

import torch


def widest_float(device: torch.device) -> torch.dtype:
    """The widest float the device computes in: float64, except on Apple's MPS, which has none."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class Losses:
    """Losses on ``device``: ``of_step`` for the one passed to ``observe()``, ``note``/``take`` for those
    noted later (averaged over the calls in between)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.missing = torch.full((), float("nan"), device=device)  # a loss not given
        self._sum: Optional[torch.Tensor] = None
        self._count = 0

    @property
    def waiting(self) -> bool:
        """Whether losses were noted since the last ``take``."""
        return self._sum is not None

    def note(self, loss: torch.Tensor) -> None:
        value = loss.detach().reshape(()).to(self.device, widest_float(self.device))
        self._sum = value if self._sum is None else self._sum + value
        self._count += 1

    def take(self) -> torch.Tensor:
        """The mean of the losses noted since the last take, as a 0-d tensor (``missing`` when none was)."""
        if self._sum is None:
            return self.missing
        mean = (self._sum / self._count).reshape(())
        self._sum, self._count = None, 0
        return mean

    def of_step(self, loss) -> torch.Tensor:
        """A step's loss as a 0-d tensor on the device (``missing`` when none was given)."""
        if loss is None:
            return self.missing
        if not isinstance(loss, torch.Tensor):
            return torch.tensor(float(loss), device=self.device)
        if loss.dim():
            loss = loss.reshape(())
        return loss if loss.device == self.device else loss.to(self.device)
