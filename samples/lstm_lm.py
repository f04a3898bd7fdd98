"""An LSTM language model at SGD lr 20 with no clipping.

This is the setting of PyTorch's word_language_model example in its medium size (2-layer LSTM, 650
units, dropout 0.5, bptt 35, batch 20, lr 20), which only trains because it clips the gradient norm at
0.25. Without clipping the gradients explode within a few dozen steps and the loss diverges. The corpus is generated in code: a random first-order Markov chain over a
Zipf-distributed vocabulary, so the model has real structure to learn.
Run: gradscope diagnose samples/lstm_lm.py   (exit 1)
"""
import torch
from torch import nn

import gradscope

VOCAB, EMBED, HIDDEN, LAYERS, DROPOUT = 1000, 650, 650, 2, 0.5
BPTT, BATCH, LR = 35, 20, 20.0


class LSTMLanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMBED)
        self.drop = nn.Dropout(DROPOUT)
        self.lstm = nn.LSTM(EMBED, HIDDEN, LAYERS, dropout=DROPOUT)
        self.decoder = nn.Linear(HIDDEN, VOCAB)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)  # as the PyTorch example initialises
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.drop(self.encoder(tokens)))
        logits = self.decoder(self.drop(out))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def markov_corpus(length: int, generator: torch.Generator) -> torch.Tensor:
    """Tokens from a sparse random transition matrix with Zipfian next-token preferences."""
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    transitions = torch.stack([zipf[torch.randperm(VOCAB, generator=generator)] for _ in range(VOCAB)])
    transitions = transitions ** 3  # sharpen: each token has a few likely successors
    tokens = torch.empty(length, dtype=torch.long)
    tokens[0] = 0
    draws = torch.rand(length, generator=generator, dtype=torch.float64)
    cdf = torch.cumsum(transitions / transitions.sum(1, keepdim=True), dim=1)
    for i in range(1, length):
        tokens[i] = min(int(torch.searchsorted(cdf[tokens[i - 1]], draws[i])), VOCAB - 1)
    return tokens


def bptt_batches(corpus: torch.Tensor):
    """Batchify as the PyTorch example does: BATCH columns, windows of BPTT tokens (time-major)."""
    columns = corpus[: len(corpus) // BATCH * BATCH].view(BATCH, -1).t().contiguous()
    return [(columns[i:i + BPTT], columns[i + 1:i + 1 + BPTT]) for i in range(0, len(columns) - BPTT - 1, BPTT)]


def experiment() -> gradscope.Experiment:
    torch.manual_seed(0)
    model = LSTMLanguageModel()
    corpus = markov_corpus(BATCH * BPTT * 30 + BATCH, torch.Generator().manual_seed(0))
    return gradscope.Experiment(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        batches=bptt_batches(corpus),
        name="lstm_lm (2-layer LSTM LM, 650 units, SGD lr 20, no clipping)",
    )
