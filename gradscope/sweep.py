"""Sweep: try a few global-norm thresholds for real, from the same start, and rank them.

This automates the trial and error a person does by hand. Candidates come from the profile's norms;
each trial rebuilds the experiment from its factory with the same seed, so every trial starts from
the same weights, optimizer state, RNG state and data, then trains ``steps`` steps clipping at its
threshold. An unclipped trial runs beside them for reference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .diagnose import resolve_device, seed_everything
from .errors import ExperimentError, GradscopeError, describe_exception
from .experiment import Experiment, batch_stream, compute_loss, to_device
from .recommend import Evidence, nice
from .report import Report
from .snippets import snippets

Factory = Callable[[], Experiment]
Progress = Callable[[int, int, str], None]
QUANTILES = (0.1, 0.25, 0.5, 0.9)


@dataclasses.dataclass(frozen=True)
class Trial:
    threshold: Optional[float]  # None: the unclipped reference
    losses: Tuple[float, ...]
    clip_fraction: float
    diverged: bool  # a non-finite loss, or a final loss above the first

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def final_loss(self) -> float:
        """Median loss of the last quarter of the steps (inf once diverged)."""
        if self.diverged or not self.losses:
            return math.inf
        tail = self.losses[-max(len(self.losses) // 4, 1):]
        return float(np.median(tail))


@dataclasses.dataclass(frozen=True)
class SweepResult:
    steps: int
    trials: Tuple[Trial, ...]  # ranked, best first; the unclipped reference among them

    @property
    def winner(self) -> Optional[Trial]:
        return next((t for t in self.trials if t.threshold is not None and not t.diverged), None)

    @property
    def unclipped(self) -> Optional[Trial]:
        return next((t for t in self.trials if t.threshold is None), None)


def candidates(report: Report, most: int = 6) -> List[float]:
    """4 to 6 thresholds: quantiles of the observed global norms, a tenth of the lowest, and the advice."""
    norms = report.statistics.model.global_norm
    norms = norms[np.isfinite(norms) & (norms > 0)]
    if not len(norms):
        raise GradscopeError("no finite gradient norm was observed, so no threshold can be derived",
                             "fix the non-finite gradients first (see the report's findings)")
    values = [float(np.quantile(norms, q)) for q in QUANTILES] + [0.1 * float(np.quantile(norms, QUANTILES[0]))]
    rec = report.recommendation
    if rec.method == "norm" and rec.threshold:
        values.append(rec.threshold)
    rounded: List[float] = []
    for value in sorted(nice(v) for v in values if v > 0):
        if not rounded or value > 1.2 * rounded[-1]:  # thresholds within 20% of each other would tie
            rounded.append(value)
    while len(rounded) > most:  # drop the closest neighbours (in log space) until few enough remain
        del rounded[int(np.argmin(np.diff(np.log(rounded)))) + 1]
    return rounded


def run_sweep(factory: Factory, thresholds: List[float], steps: int, *, seed: int = 0,
              device: Optional[str] = None, progress: Optional[Progress] = None) -> SweepResult:
    """One trial per threshold and one unclipped, each from a freshly built experiment; ranked."""
    trials = []
    plan: List[Optional[float]] = [None, *thresholds]
    for k, threshold in enumerate(plan):
        trials.append(_trial(factory, threshold, steps, seed, device))
        if progress is not None:
            progress(k + 1, len(plan), "unclipped" if threshold is None else f"clip {threshold:.3g}")
    ranked = sorted(trials, key=lambda t: (t.diverged, t.final_loss, -(t.threshold or math.inf)))
    return SweepResult(steps=steps, trials=tuple(ranked))


def _trial(factory: Factory, threshold: Optional[float], steps: int, seed: int, device: Optional[str]) -> Trial:
    seed_everything(seed)
    experiment = factory()
    target = resolve_device(device)
    if target is not None:
        experiment.model.to(target)
    model, optimizer = experiment.model, experiment.optimizer
    model.train()
    stream = batch_stream(experiment.batches)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: List[float] = []
    clipped = 0
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        try:
            loss = compute_loss(experiment, to_device(next(stream), target or params[0].device))
            loss.backward()
        except GradscopeError:
            raise
        except Exception as exc:
            raise ExperimentError(f"sweep trial at threshold {threshold}: step {step} raised "
                                  f"{describe_exception(exc)}", "run gradscope diagnose on the target first") from exc
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            break
        norm = torch.nn.utils.clip_grad_norm_(params, threshold if threshold is not None else math.inf)
        clipped += threshold is not None and float(norm) > threshold
        optimizer.step()
    diverged = not all(math.isfinite(v) for v in losses) or losses[-1] > losses[0]
    return Trial(threshold, tuple(losses), clipped / max(len(losses), 1), diverged)


def fold(report: Report, result: SweepResult) -> Report:
    """The report with the sweep's winner as its recommendation, and the sweep as its evidence."""
    winner, reference = result.winner, result.unclipped
    if winner is None:
        return report
    norms = report.statistics.model.global_norm
    clipped = float(np.mean(~(norms <= winner.threshold))) if len(norms) else 0.0
    versus = (f"unclipped {reference.final_loss:.3g}" if reference and not reference.diverged
              else "the unclipped run diverged")
    basis = (f"a sweep of {len(result.trials) - 1} global-norm thresholds, {result.steps} steps each from the same "
             f"start: {winner.threshold:.3g} ended at loss {winner.final_loss:.3g} ({versus})")
    evidence = Evidence(clipped, basis, cosine=1.0, reasons=report.recommendation.evidence.reasons)
    rec = dataclasses.replace(report.recommendation, method="norm", threshold=winner.threshold, evidence=evidence,
                              snippets=snippets("norm", winner.threshold, sharded=report.statistics.model.sharded))
    return dataclasses.replace(report, recommendation=rec)


def sweep_dict(result: SweepResult) -> dict:
    """The sweep as JSON-ready data (infinite losses as null)."""
    def number(x: Optional[float]) -> Optional[float]:
        return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")
    winner = result.winner
    return {
        "steps": result.steps,
        "winner": None if winner is None else winner.threshold,
        "trials": [{"threshold": t.threshold, "clip_fraction": number(t.clip_fraction), "diverged": t.diverged,
                    "first_loss": number(t.first_loss), "final_loss": number(t.final_loss),
                    "losses": [number(v) for v in t.losses]} for t in result.trials],
    }
