"""A tanh RNN whose recurrent weights have spectral radius 1.2, trained with SGD on the adding problem.

Pascanu et al. (2013): a recurrent matrix with spectral radius above 1 lets gradients grow
exponentially through time. Unclipped, the norm climbs step after step until training diverges.
Run: gradscope diagnose samples/exploding_rnn.py   (exit 1: the explosion is named)
"""
import torch
from torch import nn

import gradscope

SEQ_LEN, HIDDEN, BATCH = 40, 64, 32
SPECTRAL_RADIUS = 1.2


class AddingRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, HIDDEN, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)
        with torch.no_grad():
            w = torch.randn(HIDDEN, HIDDEN)
            self.rnn.weight_hh_l0.copy_(w * SPECTRAL_RADIUS / torch.linalg.eigvals(w).abs().max())

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(out[:, -1]).squeeze(-1), target)


def adding_batches(generator: torch.Generator):
    """The adding problem: sum the two values marked among SEQ_LEN random ones."""
    def batch():
        values = torch.rand(BATCH, SEQ_LEN, generator=generator)
        marks = torch.zeros(BATCH, SEQ_LEN)
        picks = torch.stack([torch.randperm(SEQ_LEN, generator=generator)[:2] for _ in range(BATCH)])
        marks.scatter_(1, picks, 1.0)
        return torch.stack([values, marks], dim=-1), (values * marks).sum(dim=1)
    return batch


def experiment() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = AddingRNN()
    return gradscope.Experiment(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        batches=adding_batches(torch.Generator().manual_seed(0)),
        name="exploding_rnn (tanh RNN, spectral radius 1.2, adding problem)",
    )
