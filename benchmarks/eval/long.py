"""Long-horizon scenarios: the runs people lose, trained 1,500 steps under AdamW with a linear warm-up and a
cosine decay (as ``transformers.get_cosine_schedule_with_warmup`` gives), where a 30-step profile ends
inside the warm-up.

"explode" here means that unclipped training suffers mid-run: loss spikes (held-out checkpoints that give
back a share of the progress made; see ``run.spikes``) or a slow divergence. Each scenario was written
once, its learning rate or its corruption set only so that its label holds on the grid, before gradscope's
advice was run on it. ``run.py --set long`` scores them.

Data is made in code, or is real text that ships with Python (the source of a few standard-library
modules, read as bytes: a character-level language-modelling corpus on every machine that runs this).
"""
from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import math
import textwrap
from typing import Dict

import torch
from torch import nn

from scenarios import Batch, Scenario, Setup, cross_entropy, mse

LONG_STEPS = 1500
WARMUP = 100  # steps of linear warm-up; a 30-step profile sees a third of the peak rate at most
CHARS = 96  # printable ASCII and newline, the rest folded onto one symbol


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int = WARMUP, total: int = LONG_STEPS, cycles: int = 1):
    """Linear warm-up from 0, then a cosine decay to 0 at ``total``: transformers'
    get_cosine_schedule_with_warmup, written out so the set does not need transformers installed. With
    ``cycles`` > 1 the run is cut into that many equal cycles, each warming up again from 0 (a re-warm-up, as a
    run resumed with a new schedule has)."""
    length = total // cycles

    def factor(step: int) -> float:
        step = step % length if step < length * cycles else step - length * (cycles - 1)
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, length - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@functools.lru_cache(maxsize=1)
def corpus() -> torch.Tensor:
    """Characters of real English-and-code text: the source of four standard-library modules."""
    return _codes("".join(inspect.getsource(m) for m in (argparse, difflib, textwrap, inspect)))


def _codes(text: str) -> torch.Tensor:
    """Text as characters: printable ASCII, newline as 95, the rest folded onto one symbol."""
    codes = torch.tensor(list(text.encode("ascii", "replace")), dtype=torch.long)
    codes = torch.where(codes == 10, torch.full_like(codes, 95), codes - 32)  # newline -> 95
    return codes.clamp(0, CHARS - 1)


def text_batches(seq: int = 32, batch: int = 16, held_out_share: float = 0.1):
    """(train maker, held-out maker): random windows of the corpus; the last 10% is held out."""
    data = corpus()
    cut = int(len(data) * (1 - held_out_share))
    return _windows(data, 0, cut, batch, seq), _windows(data, cut, len(data), batch, seq)


def _long_stream(train_make, eval_make, seed: int, n_eval: int = 8):
    g = torch.Generator().manual_seed(1000 + seed)
    train = [train_make(g) for _ in range(LONG_STEPS)]
    held_out = [eval_make(g) for _ in range(n_eval)]
    return (lambda step: train[step % len(train)]), held_out


class CharGPT(nn.Module):
    """A pre-LN GPT without qk-norm or z-loss, batch-first."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, seq: int = 32) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(CHARS, d), nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, CHARS)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.out(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))


def _gpt(seed: int, lr: float, beta2: float, warmup: int = WARMUP, cycles: int = 1, stream=None) -> Setup:
    torch.manual_seed(seed)
    model = CharGPT()
    train, held_out = stream or _long_stream(*text_batches(), seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.1)
    return Setup(model, opt, train, held_out, cross_entropy, LONG_STEPS, warmup_cosine(opt, warmup, cycles=cycles))


def gpt_healthy(seed: int) -> Setup:
    return _gpt(seed, 1e-3, 0.95)


# -- the regimes of real long runs where a gradient norm's level moves for good -----------------------------

def gpt_late_growth(seed: int) -> Setup:
    """Late-training norm growth (Defazio et al. 2025): a hot peak rate, a short warm-up, a cosine decay with
    weight decay and LayerNorm, where the gradient norm's level rises toward the end of the run."""
    return _gpt(seed, 3e-3, 0.95, warmup=50)


@functools.lru_cache(maxsize=1)
def prose() -> torch.Tensor:
    """English prose that ships with Python: the docstrings of the standard library's public functions and
    classes in a few modules, coded as ``corpus()`` codes characters."""
    import collections
    import email
    import json
    import logging
    import pathlib
    import string
    modules = (collections, email, json, logging, pathlib, string, argparse, difflib, textwrap, inspect)
    docs = []
    for module in modules:
        for name in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, name, None)) if not name.startswith("_") else None
            if doc and len(doc) > 80:
                docs.append(doc)
    return _codes("\n\n".join(dict.fromkeys(docs)))


def _windows(data: torch.Tensor, lo: int, hi: int, batch: int, seq: int = 32):
    def make(g: torch.Generator) -> Batch:
        starts = torch.randint(lo, hi - seq - 1, (batch,), generator=g)
        windows = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]
    return make


def gpt_level_shift(seed: int) -> Setup:
    """A change of data mixture and of batch size halfway (source code at batch 32, then English prose at
    batch 8), as when a mixture changes or a run resumes on fewer devices; held out: the prose."""
    code, text = corpus(), prose()
    code_cut, text_cut = int(len(code) * 0.9), int(len(text) * 0.9)
    first, second = _windows(code, 0, code_cut, 32), _windows(text, 0, text_cut, 8)
    g = torch.Generator().manual_seed(1000 + seed)
    train = [first(g) if step < LONG_STEPS // 2 else second(g) for step in range(LONG_STEPS)]
    held_out = [_windows(text, text_cut, len(text), 16)(g) for _ in range(8)]
    return _gpt(seed, 1e-3, 0.95, stream=((lambda step: train[step % len(train)]), held_out))


def gpt_rewarm(seed: int) -> Setup:
    """A learning-rate re-warm-up: two warm-up and cosine cycles of 750 steps each."""
    return _gpt(seed, 2e-3, 0.95, warmup=50, cycles=2)


def gpt_hot(seed: int) -> Setup:
    """A hot peak rate on clean data: the instability Wortsman et al. 2023 reproduce in small transformers
    without qk-layernorm or z-loss (AdamW, beta2 0.95, a warm-up and a cosine decay)."""
    return _gpt(seed, 1e-2, 0.95)


def corrupted_regression(d_in: int = 16, batch: int = 64, every: int = 97, scale: float = 30.0, after: int = 0):
    """sin regression where one batch in ``every`` (from the ``after``-th on) has its targets x``scale``:
    corrupted labels at rare steps."""
    w = torch.randn(d_in, 1, generator=torch.Generator().manual_seed(3))
    count = [0]

    def make(g: torch.Generator) -> Batch:
        x = torch.randn(batch, d_in, generator=g)
        y = torch.sin(x @ w) + 0.1 * torch.randn(batch, 1, generator=g)
        count[0] += 1
        if every and count[0] > after and count[0] % every == 0:
            y = y * scale
        return x, y
    return make


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 1))


def _mlp_setup(seed: int, make, lr: float = 3e-3) -> Setup:
    torch.manual_seed(seed)
    model = _mlp()
    train, _ = _long_stream(make, make, seed)
    clean = corrupted_regression(every=0)
    held_out = [clean(torch.Generator().manual_seed(5000 + seed + i)) for i in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
    return Setup(model, opt, train, held_out, mse, LONG_STEPS, warmup_cosine(opt))


def mlp_corrupt(seed: int) -> Setup:
    return _mlp_setup(seed, corrupted_regression())


def mlp_corrupt_late(seed: int) -> Setup:
    """Corrupted batches only from step 600 on, when the norms have fallen far below the profile's."""
    return _mlp_setup(seed, corrupted_regression(every=61, scale=30.0, after=600))


def mlp_healthy(seed: int) -> Setup:
    return _mlp_setup(seed, corrupted_regression(every=0))


class Forecaster(nn.Module):
    """A small transformer encoder that reads a window of a multichannel signal and predicts the next value."""

    def __init__(self, channels: int = 4, d: int = 64, seq: int = 16) -> None:
        super().__init__()
        self.inp, self.pos = nn.Linear(channels, d), nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, channels)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x) + self.pos)[:, -1])


def signal_windows(channels: int = 4, seq: int = 16, batch: int = 32, every: int = 0, scale: float = 30.0):
    """Windows of sums of sines with noise; one batch in ``every`` has its targets x``scale`` (a sensor glitch)."""
    freqs = torch.rand(channels, 3, generator=torch.Generator().manual_seed(11)) * 0.5 + 0.05
    count = [0]

    def make(g: torch.Generator) -> Batch:
        t0 = torch.rand(batch, 1, 1, generator=g) * 1000
        t = t0 + torch.arange(seq + 1.0)[None, :, None]
        x = torch.sin(t[..., None] * freqs).sum(-1) + 0.1 * torch.randn(batch, seq + 1, channels, generator=g)
        count[0] += 1
        y = x[:, -1] * (scale if every and count[0] % every == 0 else 1.0)
        return x[:, :-1], y
    return make


def forecaster_corrupt(seed: int) -> Setup:
    torch.manual_seed(seed)
    model = Forecaster()
    train, _ = _long_stream(signal_windows(every=83), signal_windows(), seed)
    held_out = [signal_windows()(torch.Generator().manual_seed(5000 + seed + i)) for i in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return Setup(model, opt, train, held_out, mse, LONG_STEPS, warmup_cosine(opt))


class GRUForecaster(nn.Module):
    def __init__(self, channels: int = 4, size: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(channels, size, batch_first=True)
        self.out = nn.Linear(size, channels)

    def forward(self, x):
        return self.out(self.gru(x)[0][:, -1])


def gru_corrupt(seed: int, every: int = 71) -> Setup:
    torch.manual_seed(seed)
    model = GRUForecaster()
    train, _ = _long_stream(signal_windows(every=every, scale=50.0), signal_windows(), seed)
    held_out = [signal_windows()(torch.Generator().manual_seed(5000 + seed + i)) for i in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.999), weight_decay=0.01)
    return Setup(model, opt, train, held_out, mse, LONG_STEPS, warmup_cosine(opt))


def gru_healthy(seed: int) -> Setup:
    return gru_corrupt(seed, every=0)


LONG: Dict[str, Scenario] = {s.name: s for s in [
    Scenario("mlp_corrupt", "explode", mlp_corrupt, "GELU MLP, 1 batch in 97 with targets x30, AdamW 3e-3"),
    Scenario("mlp_corrupt_late", "explode", mlp_corrupt_late, "the MLP, corrupted batches only after step 600"),
    Scenario("gru_corrupt", "explode", gru_corrupt, "GRU forecaster, 1 batch in 71 with targets x50, AdamW 3e-3"),
    Scenario("forecaster_corrupt", "explode", forecaster_corrupt,
             "transformer forecaster, 1 batch in 83 with targets x30, AdamW 1e-3, beta2 0.95"),
    Scenario("gpt_healthy", "healthy", gpt_healthy, "the char GPT at AdamW peak 1e-3"),
    Scenario("gpt_late_growth", "explode", gpt_late_growth,
             "the char GPT at AdamW peak 3e-3, 50-step warm-up: the norm's level rises late in the decay"),
    Scenario("gpt_level_shift", "healthy", gpt_level_shift,
             "the char GPT, code at batch 32 then prose at batch 8 from step 750: a level shift"),
    Scenario("gpt_rewarm", "healthy", gpt_rewarm, "the char GPT at AdamW peak 2e-3 in two cycles: a re-warm-up"),
    Scenario("gpt_hot", "explode", gpt_hot, "the char GPT at AdamW peak 1e-2 on clean text (Wortsman et al. 2023)"),
    Scenario("mlp_healthy", "healthy", mlp_healthy, "the MLP on clean batches, AdamW 3e-3"),
    Scenario("gru_healthy", "healthy", gru_healthy, "the GRU forecaster on clean batches, AdamW 3e-3"),
]}
