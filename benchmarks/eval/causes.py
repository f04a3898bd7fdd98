"""Runs whose cause is known, and whether diagnose names it: the likely-cause verdict, scored.

Four kinds of model (a tanh MLP and an LSTM on regression, a BatchNorm CNN on images, a small causal
transformer LM), each broken in a way whose cause is known by construction:

- ``sample``: one sample of step 20's batch is corrupted (a regression target x1000; an image with an
  inf pixel, since BatchNorm absorbs any finite scale of an image);
- ``batch``: all of step 20's regression targets are x300;
- ``lr``: a learning rate far too hot for the model (SGD);
- ``eps``: the loss scaled by 1e-17 under Adam, so that its gradients sit ~1e-9 below eps;
- ``numerics``: a classifier whose loss is log(softmax(.)) of sharpened logits: the softmax underflows
  to 0 and its log is -inf, with nothing growing before it;
- ``decay``: AdamW's weight decay on every parameter, LayerNorm, BatchNorm, biases and embeddings
  included (a configuration finding: the run itself trains);
- ``healthy``: the same models, configured well.

A run counts as right where the verdict (``report.cause.kind``) is the cause it was built with (none for
``decay`` and ``healthy``), where every ``sample`` run names step 20 and the corrupted index first in
``spikes``, and where ``decay`` runs raise weight-decay-on-norms and ``healthy`` runs raise none of the
seven why-rules. Before a run is scored, its trouble must show at all (a warning or an error, or the
config finding): a corruption the model does not feel has no cause to find, and is reported as such
rather than scored.

It also times the per-sample recompute against a training step: the recompute's wall time (its record's
``seconds``) over the median profiled step. Run alone: OMP_NUM_THREADS=1 python benchmarks/eval/causes.py
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import gradscope
import gradscope.collect.culprits
import gradscope.present.wording

WHY_RULES = ("spike-from-few-samples", "spike-from-one-batch", "optimizer-misses-parameters",
             "optimizer-misses-some-parameters", "weight-decay-on-norms", "adam-epsilon-dominates",
             "adam-beta2-under-spikes")
SPIKE_STEP, CORRUPT_INDEX = 20, 3


# -- the models -----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)


class LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 32, batch_first=True), nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class CNN(nn.Module):
    def __init__(self, sharpen: float = 1.0) -> None:
        super().__init__()
        self.sharpen = sharpen
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(16 * 4 * 4, 4))

    def forward(self, x):
        return self.sharpen * self.net(x)


class GPT(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 32, seq: int = 16, sharpen: float = 1.0) -> None:
        super().__init__()
        self.sharpen = sharpen
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.sharpen * self.out(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))


# -- their data -----------------------------------------------------------------------------------------
def regression(g: torch.Generator, kind: str):
    if kind == "mlp":
        w = torch.randn(16, 1, generator=g)
        x = torch.randn(32, 16, generator=g)
        return x, x @ w
    x = torch.randn(32, 20, 4, generator=g)
    return x, x.sum(dim=(1, 2)).unsqueeze(1) / 5


def images(g: torch.Generator):
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    labels = torch.randint(0, 4, (32,), generator=g)
    angle = labels.float() * math.pi / 4
    waves = torch.sin(0.8 * (xs * torch.cos(angle)[:, None, None] + ys * torch.sin(angle)[:, None, None]))
    return (waves + 0.5 * torch.randn(32, 16, 16, generator=g)).unsqueeze(1), labels


def tokens(g: torch.Generator, vocab: int = 32):
    """Sequences from a fixed sparse Markov chain (each token has 3 likely successors)."""
    chain = torch.Generator().manual_seed(7)
    successors = torch.randint(0, vocab, (vocab, 3), generator=chain)
    rows = [torch.randint(0, vocab, (16,), generator=g)]
    for _ in range(16):
        pick = torch.randint(0, 3, (16,), generator=g)
        rows.append(successors[rows[-1], pick])
    seq = torch.stack(rows, 1)
    return seq[:, :-1], seq[:, 1:]


def mse(model, batch):
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def cross_entropy(model, batch):
    logits = model(batch[0])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def naive_cross_entropy(model, batch):
    """log(softmax(.)) in two steps, as hand-written losses do: it underflows where log_softmax does not."""
    logits = model(batch[0])
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    return -torch.log(probs.gather(1, batch[1].reshape(-1, 1))).mean()


# -- the runs -------------------------------------------------------------------------------------------
def experiment(kind: str, cause: str, seed: int) -> gradscope.Experiment:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(100 + seed)
    sharpen = {"cnn": 300.0, "gpt": 35.0}.get(kind, 1.0) if cause == "numerics" else 1.0
    model = {"mlp": MLP, "lstm": LSTM, "cnn": lambda: CNN(sharpen), "gpt": lambda: GPT(sharpen=sharpen)}[kind]()
    make: Callable[[], Tuple[torch.Tensor, torch.Tensor]] = {
        "mlp": lambda: regression(g, "mlp"), "lstm": lambda: regression(g, "lstm"), "cnn": lambda: images(g),
        "gpt": lambda: tokens(g)}[kind]
    step = [0]

    def batch():
        x, y = make()
        if step[0] == SPIKE_STEP and cause in ("sample", "batch"):
            if kind == "cnn":  # an image that decoded to inf in one pixel (BatchNorm absorbs any finite scale)
                x = x.clone()
                x[CORRUPT_INDEX, 0, 5, 5] = float("inf")
            else:  # the regression targets
                y = y.clone()
                y[CORRUPT_INDEX if cause == "sample" else slice(None)] *= 1000 if cause == "sample" else 300
        step[0] += 1
        return x, y
    loss = mse if kind in ("mlp", "lstm") else cross_entropy
    if cause == "numerics":
        loss = naive_cross_entropy
    if cause == "eps":
        inner = loss
        loss = lambda m, b: 1e-17 * inner(m, b)  # noqa: E731
    params = model.parameters()
    if cause == "lr":
        optimizer = torch.optim.SGD(params, lr={"mlp": 0.5, "lstm": 2.0, "cnn": 5.0, "gpt": 5.0}[kind],
                                    momentum=0.9)
    elif cause == "decay":
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    else:
        optimizer = torch.optim.Adam(params, lr=1e-3)
    return gradscope.Experiment(model, optimizer, batch, loss_fn=loss, name=f"{kind}-{cause}")


RUNS: List[Tuple[str, str]] = [
    *[(kind, cause) for kind in ("mlp", "lstm") for cause in ("sample", "batch")], ("cnn", "sample"),
    *[(kind, cause) for kind in ("mlp", "lstm", "cnn", "gpt") for cause in ("lr", "eps")],
    ("cnn", "numerics"), ("gpt", "numerics"), ("cnn", "decay"), ("gpt", "decay"),
    *[(kind, "healthy") for kind in ("mlp", "lstm", "cnn", "gpt")],
]
EXPECTED = {"sample": "data", "batch": "data", "lr": "learning_rate", "eps": "optimizer", "numerics": "numerics",
            "decay": None, "healthy": None}


def score(kind: str, cause: str, seed: int) -> Dict[str, object]:
    times: List[float] = []
    mark = [time.perf_counter()]

    def progress(done, total, out):
        now = time.perf_counter()
        times.append(now - mark[0])
        mark[0] = now
    report = gradscope.diagnose(experiment(kind, cause, seed), steps=30, seed=seed, trials=0, progress=progress)
    fired = {f.rule_id for f in report.findings}
    troubled = any(f.severity != "info" for f in report.findings)
    said = None if report.cause is None else report.cause.kind
    spikes = report.statistics.model.spikes
    if cause == "decay":
        shows, right = "weight-decay-on-norms" in fired, "weight-decay-on-norms" in fired and said is None
    elif cause == "healthy":
        shows, right = True, said is None and not fired.intersection(WHY_RULES)
    else:
        shows = troubled
        right = said == EXPECTED[cause]
        if cause == "sample":
            first = spikes[0] if spikes else None
            right = right and first is not None and first.step == SPIKE_STEP and bool(first.samples) \
                and first.samples[0].index == CORRUPT_INDEX
    recompute = [s.seconds for s in spikes if s.samples]
    ratio = report.statistics.model.metrics.get("spike_loss_over_previous", math.nan)
    step = statistics.median(times) if times else math.nan
    return {"run": f"{kind}-{cause}", "seed": seed, "expected": EXPECTED[cause] or ("rule" if cause == "decay" else "none"),
            "said": said or "none", "shows": shows, "right": right,
            "spike": None if not spikes else f"step {spikes[0].step}"
            + (f", sample {spikes[0].samples[0].index} ({spikes[0].samples[0].share:.0%})" if spikes[0].samples else "")
            + (f", loss x{ratio:.3g} the batch before's" if math.isfinite(ratio) else ""),
            "method": spikes[0].method if spikes else "", "recompute_over_step": (recompute[0] / step) if recompute else None,
            "words": "" if report.cause is None else gradscope.present.wording.cause_line(report.cause)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds FIRST .. FIRST+SEEDS-1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # torch.func's first use is not the recompute's cost: warm it once, as a run past its first spike has
    gradscope.collect.culprits.per_sample(nn.Linear(2, 1), torch.randn(4, 2), lambda b: nn.Linear(2, 1)(b).sum(),
                                          step=0)  # warm torch.func once, as a long run would have
    rows = [score(kind, cause, seed) for kind, cause in RUNS for seed in range(args.first_seed, args.first_seed + args.seeds)]
    print("| run | seed | expected | said | right | spike taken apart | recompute / step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "" if r["recompute_over_step"] is None else f"{r['recompute_over_step']:.2f}x ({r['method']})"
        print(f"| {r['run']} | {r['seed']} | {r['expected']} | {r['said']} | "
              f"{'yes' if r['right'] else ('no trouble shown' if not r['shows'] else 'NO')} | {r['spike'] or ''} | {ratio} |")
    scored = [r for r in rows if r["shows"]]
    right = sum(r["right"] for r in scored)
    print(f"\nright on {right} of {len(scored)} runs that showed their trouble ({right / max(len(scored), 1):.0%}); "
          f"{len(rows) - len(scored)} showed none")
    ratios = sorted(r["recompute_over_step"] for r in rows if r["recompute_over_step"] is not None)
    if ratios:
        print(f"per-sample recompute over a training step: median {statistics.median(ratios):.2f}x, "
              f"max {ratios[-1]:.2f}x over {len(ratios)} spikes")
    for r in rows:
        if r["words"] and not r["right"]:
            print(f"  {r['run']} seed {r['seed']}: {r['words']}")


if __name__ == "__main__":
    main()
