"""Overhead of gradscope.Monitor observing every step, against the same plain training loop.

For each model size, two identical copies train side by side in one process: plain steps and
observed steps alternate one by one, so both see the same machine state. Prints the median step
time of each and their ratio (observed / plain). Run: python benchmarks/overhead.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from gradscope import Monitor


def mlp() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    x, y = torch.randn(512, 512), torch.randint(0, 10, (512,))
    return model, lambda: (x, y), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])


def transformer() -> Tuple[nn.Module, Callable[[], Tuple[torch.Tensor, ...]], Callable]:
    vocab, d, seq, batch = 2000, 256, 128, 16

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(d, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(self.embed(tokens), is_causal=True,
                                         mask=nn.Transformer.generate_square_subsequent_mask(seq)))

    tokens = torch.randint(0, vocab, (batch, seq + 1))
    return LM(), lambda: (tokens[:, :-1], tokens[:, 1:]), \
        lambda m, b: nn.functional.cross_entropy(m(b[0]).reshape(-1, vocab), b[1].reshape(-1))


MODELS = {"mlp": mlp, "transformer": transformer}


def timed_step(model: nn.Module, opt: torch.optim.Optimizer, batch, loss_fn, monitor: Monitor = None) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch())
    loss.backward()
    if monitor is not None:
        monitor.observe(loss)
    opt.step()
    return time.perf_counter() - start


def measure(name: str, pairs: int) -> Dict[str, float]:
    """Alternate one plain step and one observed step, ``pairs`` times, after a warm-up of both."""
    torch.manual_seed(0)
    plain_model, batch, loss_fn = MODELS[name]()
    observed_model = copy.deepcopy(plain_model)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4)
    observed_opt = torch.optim.AdamW(observed_model.parameters(), lr=1e-4)
    monitor = Monitor(observed_model)
    for _ in range(3):
        timed_step(plain_model, plain_opt, batch, loss_fn)
        timed_step(observed_model, observed_opt, batch, loss_fn, monitor)
    plain, observed = [], []
    for i in range(pairs):
        first, second = (plain, observed) if i % 2 == 0 else (observed, plain)  # neither always goes first
        for times in (first, second):
            times.append(timed_step(plain_model, plain_opt, batch, loss_fn) if times is plain else
                         timed_step(observed_model, observed_opt, batch, loss_fn, monitor))
    params = sum(p.numel() for p in plain_model.parameters())
    p, o = statistics.median(plain), statistics.median(observed)
    return {"params": params, "plain_ms": p * 1e3, "observed_ms": o * 1e3, "ratio": o / p,
            "pair_ratio": statistics.median(b / a for a, b in zip(plain, observed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run, noisier)")
    parser.add_argument("--pairs", type=int, default=40, help="plain/observed step pairs per model (default 40)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    pairs = 4 if args.quick else args.pairs
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {pairs} alternating pairs of "
          "plain and observed steps; Monitor at its defaults, observing every step")
    print(f"{'model':<12}{'params':>10}{'plain ms':>10}{'observed ms':>13}{'ratio':>8}{'pair ratio':>12}")
    for name in args.models:
        r = measure(name, pairs)
        print(f"{name:<12}{r['params']:>10,}{r['plain_ms']:>10.1f}{r['observed_ms']:>13.1f}{r['ratio']:>8.3f}"
              f"{r['pair_ratio']:>12.3f}")
    print("ratio: median observed step / median plain step; pair ratio: median of per-pair ratios")


if __name__ == "__main__":
    main()
