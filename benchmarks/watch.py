"""What `gradscope watch` costs a training script: the same script run plainly and watched, side by side.

The script (an MLP, or a small transformer, trained with AdamW) times its own training loop and prints
it, so that neither arm counts the interpreter's start or gradscope's import. The two arms take turns,
plain first then watched, ROUNDS times; the figure is the median over rounds of watched loop time over
plain loop time. The first optimizer step of a watched run also finds the model (one scan of the live
objects), which the loop time includes. Run alone: OMP_NUM_THREADS=1 python benchmarks/watch.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = '''
import sys, time
import torch
from torch import nn

torch.manual_seed(0)
torch.set_num_threads(1)
kind, steps = sys.argv[1], int(sys.argv[2])
if kind == "mlp":
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    make = lambda: (torch.randn(64, 512), torch.randint(0, 10, (64,)))
    loss_of = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])
else:
    layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Embedding(256, 128), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                          nn.Linear(128, 256))
    make = lambda: (torch.randint(0, 256, (16, 64)),) * 2
    loss_of = lambda b: nn.functional.cross_entropy(model(b[0]).reshape(-1, 256), b[1].reshape(-1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
batches = [make() for _ in range(8)]
began = time.perf_counter()
for step in range(steps):
    optimizer.zero_grad()
    loss = loss_of(batches[step % 8])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
print(f"LOOP {time.perf_counter() - began:.6f}")
'''


def loop_seconds(cmd, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("LOOP")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("models", nargs="*", default=["mlp", "transformer"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder)
        (where / "train.py").write_text(SCRIPT, encoding="utf-8")
        print(f"{args.rounds} rounds of {args.steps} steps each; loop time watched over plain (median of rounds)")
        for kind in args.models:
            plain, watched, ratios = [], [], []
            for _ in range(args.rounds):
                a = loop_seconds([sys.executable, "train.py", kind, str(args.steps)], where)
                b = loop_seconds([sys.executable, "-m", "gradscope", "watch", "--output", "r.json", "train.py", kind,
                                  str(args.steps)], where)
                plain.append(a)
                watched.append(b)
                ratios.append(b / a)
            print(f"{kind:12s} plain {1e3 * statistics.median(plain) / args.steps:7.2f} ms/step   watched "
                  f"{1e3 * statistics.median(watched) / args.steps:7.2f} ms/step   ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
