"""The Monitor of an earlier commit against this checkout's, side by side in one process.

The earlier commit's ``gradscope/`` is extracted with ``git archive`` into a temporary folder and
imported as ``gradscope_old``; plain steps, steps observed by the old Monitor and steps observed by
this one take turns in rotating order (three copies of each model, AdamW), after three warm-up
rounds. Prints each arm's median step over the median plain step, and the median of the per-round
ratios. Run alone on the machine: OMP_NUM_THREADS=1 python benchmarks/against.py REV [--pairs N] [MODEL ...]
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import overhead
from gradscope import Monitor


def old_monitor(rev: str, where: Path):
    """``gradscope.Monitor`` as it was at ``rev`` (its package copied as gradscope_old)."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", rev, "gradscope"], cwd=root, check=True, capture_output=True).stdout
    tar = where / "old.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(where)
    (where / "gradscope").rename(where / "gradscope_old")
    sys.path.insert(0, str(where))
    return importlib.import_module("gradscope_old").Monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit")
    parser.add_argument("models", nargs="*", default=["mlp", "many_tensors", "gpt2", "transformer"])
    parser.add_argument("--pairs", type=int, default=48)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        Old = old_monitor(args.rev, Path(tmp))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.pairs} rounds; before = {args.rev}")
        for name in args.models:
            torch.manual_seed(0)
            plain, batch, loss_fn = overhead.on(torch.device("cpu"), name)
            a, b = copy.deepcopy(plain), copy.deepcopy(plain)
            arms = {"plain": (plain, None), "before": (a, Old(a).observe), "after": (b, Monitor(b).observe)}
            opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in arms.items()}
            times = {k: [] for k in arms}
            for i in range(-3, args.pairs):
                for k in list(arms)[i % 3:] + list(arms)[:i % 3]:
                    model, hook = arms[k]
                    took = overhead.timed_step(model, opts[k], batch, loss_fn, hook)
                    if i >= 0:
                        times[k].append(took)
            p = statistics.median(times["plain"])
            cells = [f"{k} {statistics.median(times[k]) / p:.3f} (pair "
                     f"{statistics.median(x / y for x, y in zip(times[k], times['plain'])):.3f})"
                     for k in ("before", "after")]
            print(f"{name:<14} plain {p * 1e3:7.1f} ms  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
