"""Evaluate gradscope's clipping advice against a grid-search oracle and the common baselines.

For every scenario and seed, each method trains the same model from the same initial weights on the
same batches, differing only in clipping. Each run is scored on held-out batches by normalised regret
R = (l~ - l*) / (l0 - l*), where l0 is the held-out loss at initialisation, l~ = min(l, l0) (a diverged
run scores 1) and l* is the best of the threshold grid. Methods:
  none         no clipping
  grid (oracle) global-norm thresholds at half-decades 0.01..100 and 0.1x..10x the median profiled norm
  fixed-1.0    norm clipping at 1.0 (the Hugging Face default)
  autoclip     AutoClip: the 10th percentile of the norm history so far (Seetharaman et al. 2020)
  zclip-percentile  ZClip's percentile mode, uncapped: EMA mean/std of the norm (alpha 0.97), clip at mean
               + 2.5 std after 25 warm-up steps (what Clipper("adaptive", 2.5) applies)
  zclip        ZClip as its README runs it: zscore mode, adaptive scaling, every threshold capped at 1.0
  gradscope    diagnose (30 steps, then its trials, from the same start), then train from step 0 with
               gradscope.Clipper
An explode pair counts towards R only where the grid confirms it (`confirmed`): the best threshold gets
the held-out loss at least 5% below l0 and the unclipped run throws at least half of that away.
Besides R, it reports gradscope's cost in training steps and in time over its profiling time, and the
short-horizon bias: the Spearman correlation between the ranking of the thresholds by the trials
(30 steps) and by the full runs (300 steps, 10x the horizon).
Run: python benchmarks/eval/run.py [--quick] [--jobs 2] [--set heldout|long] [--scenarios NAME ...] [--json FILE]
       [--trial-steps N] [--exhaustive] [--reuse FILE]
(``--set heldout`` scores the scenarios of heldout.py, on which no choice in the advice was made;
``--set long`` the whole runs of long.py, 1,500 steps under a warm-up and a cosine decay, against the
baselines above and the skip-step guard (z > 6 over 128 steps, on the loss and the norm), alone and
beside norm clipping at 1.0, scored by final held-out loss, R and loss spikes (see ``run_long``);
``--trial-steps`` runs diagnose with trials of that length instead of its default 30.)
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import HELDOUT  # noqa: E402
from kinds import KINDS  # noqa: E402
from long import LONG, LONG_STEPS  # noqa: E402
from scenarios import SCENARIOS, Scenario, Setup  # noqa: E402

from scipy import stats as sps  # noqa: E402

import gradscope  # noqa: E402
from gradscope import Skip  # noqa: E402
from gradscope.advise.judge import lattice  # noqa: E402
from gradscope.run.options import FIRST_STEPS, ProfileOptions, TrialOptions  # noqa: E402
from gradscope.present.wording import say  # noqa: E402

PROFILE_STEPS = 30
BASELINES = ("fixed-1.0", "autoclip", "zclip-percentile", "zclip")  # besides none
GRID = [lattice(k) for k in range(-4, 5)]  # 0.01 .. 100 in half-decades, as gradscope writes them
EXHAUSTIVE = "GRADSCOPE_EVAL_EXHAUSTIVE"  # --exhaustive: every candidate is tried and every stable one carried to
EXHAUSTIVE_STEPS = 240  # this horizon, for studying the choice rule and the schedule
TRIAL_LENGTH = "GRADSCOPE_EVAL_TRIAL_STEPS"  # --trial-steps: diagnose's --trial-steps (default: its own)
BLOWUP = 1e4  # a training loss this far above its first value has diverged: the run stops, scored as such
Policy = Callable[[int, float, List[float]], Optional[float]]  # step, norm, history -> threshold


def fixed(threshold: float) -> Policy:
    return lambda step, norm, history: threshold


def autoclip(percentile: float = 10.0) -> Policy:
    return lambda step, norm, history: float(np.percentile(history + [norm], percentile))


def zclip_percentile(alpha: float = 0.97, z: float = 2.5, warmup: int = 25) -> Policy:
    """ZClip's percentile mode with no cap: clip at EMA mean + z std (what ``Clipper("adaptive")`` applies)."""
    state: Dict[str, float] = {}

    def policy(step: int, norm: float, history: List[float]) -> Optional[float]:
        if step < warmup:
            return None
        if not state:
            state["mean"], state["var"] = float(np.mean(history)), float(np.var(history))
        limit = state["mean"] + z * math.sqrt(state["var"])
        used = min(norm, limit)
        delta = used - state["mean"]
        state["mean"] += (1 - alpha) * delta
        state["var"] = alpha * (state["var"] + (1 - alpha) * delta * delta)
        return limit
    return policy


def zclip(alpha: float = 0.97, z: float = 2.5, warmup: int = 25, max_grad_norm: float = 1.0) -> Policy:
    """ZClip as its README runs it (bluorion-com/ZClip, ``zclip/zclip.py``): ``mode="zscore"``,
    ``clip_option="adaptive_scaling"``, ``max_grad_norm=1.0``. The warm-up clips at the cap; afterwards a norm
    whose z-score passes z is clipped to mean + z std / (z_norm / z), every threshold capped at 1.0, and the
    EMA takes the computed threshold (or the norm where none was)."""
    state: Dict[str, float] = {}

    def policy(step: int, norm: float, history: List[float]) -> Optional[float]:
        if step < warmup:
            return max_grad_norm
        if not state:
            state["mean"] = float(np.mean(history[:warmup]))
            state["var"] = float(np.mean([(x - state["mean"]) ** 2 for x in history[:warmup]]))
        std = math.sqrt(state["var"])
        score = (norm - state["mean"]) / (std + 1e-6)
        clip = state["mean"] + z * std / (score / z) if score > z else None
        effective = min(norm if clip is None else clip, max_grad_norm)
        x = clip if clip is not None else norm
        state["mean"] = alpha * state["mean"] + (1 - alpha) * x
        state["var"] = alpha * state["var"] + (1 - alpha) * (x - state["mean"]) ** 2
        return effective
    return policy


Guard = Callable[[float, float], bool]  # norm, loss -> skip this step (the optimizer's whole update)


def olmo_skip(z: float = 6.0, window: int = 128) -> Guard:
    """OLMo-core's SkipStepOptimizer: skip where the loss or the norm is more than z (Bessel) std above the
    mean of the last ``window`` values, skipped ones included, once max(20, window // 2) are in. MaxText's
    ``skip_step_on_spikes`` at interval 128 and factor 6 is the same rule (Bessel's std, max(2, interval // 2)
    values of history, spiky values kept in the buffer): this arm stands for both."""
    history: List[tuple] = []

    def guard(norm: float, loss: float) -> bool:
        out = not (math.isfinite(norm) and math.isfinite(loss))
        recent = history[-window:]
        if not out and len(recent) >= max(20, window // 2):
            for i, value in enumerate((norm, loss)):
                column = np.asarray([r[i] for r in recent])
                if value - column.mean() > z * column.std(ddof=1):
                    out = True
        history.append((norm, loss))
        return out
    return guard


def eval_loss(setup: Setup) -> float:
    setup.model.eval()
    with torch.no_grad():
        losses = [float(setup.loss_fn(setup.model, b)) for b in setup.eval_batches]
    setup.model.train()
    return float(np.mean(losses)) if all(map(math.isfinite, losses)) else math.inf


def train(setup: Setup, policy: Optional[Policy] = None, clipper: Optional[gradscope.Clipper] = None,
          checkpoints: Optional[Dict[int, float]] = None, guard: Optional[Guard] = None) -> float:
    """Train to the end with one clipping method; returns the held-out loss (inf if it diverged). With
    ``checkpoints``, the held-out loss after each step it names is filled in along the way. A ``clipper`` is
    attached to the optimizer, as the advice's snippet says; a ``guard`` skips the whole update where it says
    (the optimizer is not stepped; the schedule goes on)."""
    params = [p for p in setup.model.parameters() if p.requires_grad]
    if clipper is not None:
        clipper.attach(setup.optimizer)
    history: List[float] = []
    first = None
    for step in range(setup.steps):
        setup.optimizer.zero_grad(set_to_none=True)
        loss = setup.loss_fn(setup.model, setup.train_batch(step))
        value = float(loss.detach())
        first = value if first is None else first
        if not math.isfinite(value) or (first > 0 and value > BLOWUP * first):
            return math.inf
        loss.backward()
        skipped = False
        if clipper is not None:
            clipper(setup.model, loss=loss.detach())
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, math.inf))
            threshold = policy(step, norm, history) if policy is not None else None
            if threshold is not None and math.isfinite(norm):
                torch.nn.utils.clip_grad_norm_(params, threshold)
            history.append(norm)
            skipped = guard is not None and guard(norm, value)
        if not skipped:
            setup.optimizer.step()
        if setup.scheduler is not None:
            setup.scheduler.step()
        if checkpoints is not None and step + 1 in checkpoints:
            checkpoints[step + 1] = eval_loss(setup)
    return eval_loss(setup)


def profile(scenario: Scenario, seed: int) -> gradscope.Report:
    setup = scenario.build(seed)
    steps = iter(range(10 ** 9))
    experiment = gradscope.Experiment(setup.model, setup.optimizer, lambda: setup.train_batch(next(steps)),
                                      loss_fn=setup.loss_fn, name=scenario.name, scheduler=setup.scheduler)
    length = int(os.environ[TRIAL_LENGTH]) if os.environ.get(TRIAL_LENGTH) else None
    options = TrialOptions(most=100, steps=length, budget=1000.0, keep=100) if os.environ.get(EXHAUSTIVE) else \
        TrialOptions(steps=length)
    return gradscope.diagnose(experiment, steps=PROFILE_STEPS, seed=seed, trials=options,
                              profile=ProfileOptions(restore=False))


def _every_candidate(candidates, done, *args) -> Optional[float]:
    """--exhaustive's search: every candidate in turn, loosest first (no early stop)."""
    tried = {t.threshold for t in done}
    return next((c for c in candidates if c not in tried), None)


def _every_stable(trials, *args, **kwargs):
    """--exhaustive's climb: every stable trial goes on, the horizon doubling, to EXHAUSTIVE_STEPS."""
    from gradscope.advise import judge
    from gradscope.advise.reasons import because
    field = judge.final_field(trials)
    nxt = field.steps * judge.RUNG_GROWTH
    if nxt > EXHAUSTIVE_STEPS:
        return [], because("rung_past_longest", next=nxt, longest=EXHAUSTIVE_STEPS)
    return [t.threshold for t in field.trials if t.stable], because("neighbours_tied", steps=field.steps)


def _exhaustive() -> None:
    if os.environ.get(EXHAUSTIVE):
        from gradscope.advise import judge
        from gradscope.run import options
        judge.next_candidate = _every_candidate  # gradscope.run.schedule looks them up on the module each time
        judge.promote = _every_stable
        options.SEARCH_BUDGET = 1000.0  # the first rung's share, read when the search asks for it


def run_one(scenario: Scenario, seed: int) -> Dict[str, object]:
    l0 = eval_loss(scenario.build(seed))
    began = time.perf_counter()
    report = profile(scenario, seed)
    diagnose_seconds = time.perf_counter() - began
    norms = report.statistics.model.global_norm
    median = float(np.nanmedian(norms)) if np.isfinite(norms).any() else math.nan
    trials = report.recommendation.evidence.trials
    # each threshold's held-out loss at the first rung: the short-horizon ranking, whatever went on after it
    tried = {t.threshold: next((c.held_out for c in t.checkpoints if c.steps == trials.steps), t.held_out)
             for t in trials.trials} if trials else {}
    thresholds = set(GRID) | set(tried) | set(trials.untried if trials else ())
    if math.isfinite(median) and median > 0:
        centre = round(2 * math.log10(median))
        thresholds |= {lattice(k) for k in range(centre - 2, centre + 3)}  # 0.1x .. 10x the median norm
    grid = {t: train(scenario.build(seed), fixed(t)) for t in sorted(thresholds)}
    results = {
        "none": train(scenario.build(seed)),
        "fixed-1.0": grid[1.0],
        "autoclip": train(scenario.build(seed), autoclip()),
        "zclip-percentile": train(scenario.build(seed), zclip_percentile()),
        "zclip": train(scenario.build(seed), zclip()),
        "gradscope": train(scenario.build(seed), clipper=gradscope.Clipper.from_report(report)),
    }
    best_threshold = min(grid, key=grid.get)
    star = results["oracle"] = grid[best_threshold]  # l*: the best of the grid

    def regret(loss: float) -> float:
        """Normalised regret; below 0 when a method beats every grid threshold."""
        if not l0 > star:
            return 0.0
        return (min(loss, l0) - star) / (l0 - star)
    setup = scenario.build(seed)
    weight_norm = float(torch.sqrt(sum((p.detach() ** 2).sum() for p in setup.model.parameters())))
    group = setup.optimizer.param_groups[0]
    lr_eff = group["lr"] / (1 - group.get("momentum", 0.0)) if "momentum" in group else math.nan
    start_norm = float(np.median(norms[np.isfinite(norms)][:3])) if np.isfinite(norms).any() else math.nan
    rank = math.nan
    if len(tried) >= 3:
        common = sorted(tried)
        rank = float(sps.spearmanr([tried[t] for t in common], [grid[t] for t in common]).statistic)
    return {"scenario": scenario.name, "label": scenario.label, "seed": seed, "l0": l0,
            "flagged": not report.healthy, "method": report.recommendation.method,
            "profile_steps": report.statistics.model.steps,
            "threshold": report.recommendation.threshold, "median_norm": median, "start_norm": start_norm,
            "best_threshold": best_threshold, "weight_norm": weight_norm, "lr_eff": lr_eff,
            "optimizer": type(setup.optimizer).__name__,
            "trial_steps": trials.spent if trials else 0,  # the rerun unclipped reference's steps included
            "trials_tried": len(tried), "diagnose_seconds": diagnose_seconds,
            "profile_seconds": trials.profile_seconds if trials else diagnose_seconds,
            "rank_correlation": rank, "grid": {str(k): v for k, v in grid.items()},
            "trials": None if trials is None else {
                "steps": trials.steps, "start_held_out": trials.start_held_out, "winner": trials.winner,
                "learned": trials.learned, "longest": trials.longest, "stopped": say(trials.stopped),
                "runs": [{"threshold": t.threshold, "losses": list(t.losses), "norms": list(t.norms),
                          "held_out": t.held_out, "held_out_batches": list(t.held_out_batches),
                          "unstable": t.unstable, "checkpoints": [[c.steps, c.held_out, list(c.held_out_batches)]
                                                                  for c in t.checkpoints]}
                         for t in (trials.reference, *trials.trials)]},
            "regret": {k: regret(v) for k, v in results.items()}, "loss": results}


SETS = {"main": SCENARIOS, "heldout": HELDOUT, "kinds": KINDS, "long": LONG}


def _run_pair(job) -> Dict[str, object]:
    registry, name, seed, reuse = job
    torch.set_num_threads(1)
    _exhaustive()
    if registry == "long":
        return run_long(SETS[registry][name], seed, reuse)
    return run_one(SETS[registry][name], seed)


# -- the long set: whole runs under a warm-up and a cosine decay -------------------------------------------
CHECK_EVERY = 50  # held-out checkpoints along a long run, for counting spikes
SPIKE_SHARE = 0.1  # a spike: a checkpoint that gives back this share of the run's progress
LONG_GRID = [lattice(k) for k in range(-4, 5)]  # 0.01 .. 100 in half-decades


def spikes(curve: List[float], l0: float) -> int:
    """Loss spikes along a run: held-out checkpoints (every CHECK_EVERY steps) whose loss exceeds the lowest
    of the earlier ones by more than SPIKE_SHARE of the run's progress (l0 minus its lowest checkpoint: a
    scale-free bar that the noise of a run still near l0 does not clear); a diverged run's non-finite
    checkpoint counts as one."""
    finite = [v for v in curve if math.isfinite(v)]
    bar = SPIKE_SHARE * max(l0 - min(finite, default=l0), 0.0)
    count, best = 0, l0
    for value in curve:
        if not math.isfinite(value) or value > best + bar:
            count += 1
        if math.isfinite(value):
            best = min(best, value)
    return count


UNBOUNDED = Skip(max_consecutive=10 ** 9, max_rate=0.999)  # the guard before it re-based: it could lock
GUARDED = ("skip", "skip-unbounded", "clip+skip")  # the baselines that run gradscope's own guard


def _skip_clipper(threshold: Optional[float] = None, skip: Skip = Skip()) -> gradscope.Clipper:
    if threshold is None:
        return gradscope.Clipper("none", None, skip=skip)
    return gradscope.Clipper("norm", threshold, skip=skip)


# the peers every long pair is scored against, what a user would run instead: "olmo-skip" is OLMo-core's (and
# MaxText's) rule; then gradscope's own rules, shown beside them as ablations: "skip" its guard alone,
# "skip-unbounded" the same without its bounds (the rule before it re-based), "clip+skip" a fixed 1.0 and the guard
LONG_PEERS = ("none", "fixed-1.0", "zclip-percentile", "zclip", "olmo-skip")
LONG_BASELINES = (*LONG_PEERS, "skip", "skip-unbounded", "clip+skip")


def run_long(scenario: Scenario, seed: int, reuse: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Every method and every grid threshold over the whole run from the same start, with held-out
    checkpoints; gradscope diagnoses at the start (its profile, through the warm-up to the schedule's peak,
    then its trials) and its advice is applied as ``Clipper.from_report`` applies it, attached to the
    optimizer. With ``reuse``, a row of an earlier run of the same scenario and seed, only the arms that run
    gradscope's code are trained again: its advice, unguarded and guarded, and its guard's baselines."""
    marks = list(range(CHECK_EVERY, LONG_STEPS + 1, CHECK_EVERY))

    def go(policy=None, clipper=None, guard=None):
        points = {m: None for m in marks}
        final = train(scenario.build(seed), policy, clipper=clipper, checkpoints=points, guard=guard)
        curve = [math.inf if points[m] is None else points[m] for m in marks]
        cut = next((i for i, m in enumerate(marks) if points[m] is None), None)
        return final, curve if cut is None else curve[:cut] + [math.inf]
    l0 = eval_loss(scenario.build(seed))
    began = time.perf_counter()
    report = profile(scenario, seed)
    diagnose_seconds = time.perf_counter() - began
    clipper = gradscope.Clipper.from_report(report)
    if reuse is not None:  # the arms gradscope's code does not touch; its guard's are trained again
        runs = {k: tuple(v) for k, v in reuse["runs"].items() if k not in ("gradscope", "unguarded", *GUARDED)}
        runs.update({"skip": go(clipper=_skip_clipper()), "clip+skip": go(clipper=_skip_clipper(1.0))})
        # the unbounded guard never re-bases: its runs stand as they were unless the row lacks them
        runs["skip-unbounded"] = tuple(reuse["runs"]["skip-unbounded"]) if "skip-unbounded" in reuse["runs"] \
            else go(clipper=_skip_clipper(skip=UNBOUNDED))
    else:
        runs = {f"grid {t:g}": go(fixed(t)) for t in LONG_GRID}
        runs.update({"none": go(), "zclip-percentile": go(zclip_percentile()), "zclip": go(zclip()),
                     "olmo-skip": go(guard=olmo_skip()), "skip": go(clipper=_skip_clipper()),
                     "skip-unbounded": go(clipper=_skip_clipper(skip=UNBOUNDED)),
                     "clip+skip": go(clipper=_skip_clipper(1.0))})
        runs["fixed-1.0"] = runs["grid 1"]
    runs["gradscope"] = go(clipper=clipper)
    counts = clipper.counts()
    # the same advice without the skip guard: what the guard adds (the advice before it was armed); kept
    # from a reused row whose advice was the same, since the guard's rule does not touch that arm
    same = reuse is not None and "unguarded" in reuse["runs"] and \
        (reuse["method"], reuse["threshold"]) == (report.recommendation.method, report.recommendation.threshold)
    runs["unguarded"] = tuple(reuse["runs"]["unguarded"]) if same else \
        go(clipper=gradscope.Clipper.from_report(report, skip=None))
    grid = {t: runs[f"grid {t:g}"][0] for t in LONG_GRID}
    best_threshold = min(grid, key=grid.get)
    star = grid[best_threshold]
    loss = {k: v[0] for k, v in runs.items()}

    def regret(value: float) -> float:
        return 0.0 if not l0 > star else (min(value, l0) - star) / (l0 - star)
    trials = report.recommendation.evidence.trials
    return {"scenario": scenario.name, "label": scenario.label, "seed": seed, "l0": l0,
            "flagged": not report.healthy, "method": report.recommendation.method,
            "threshold": report.recommendation.threshold, "advice": repr(clipper),
            "guard_evidence": say(report.recommendation.evidence.basis),
            "schedule_reached": None if report.schedule is None else report.schedule.reached,
            "profile_steps": report.statistics.model.steps, "trial_steps": trials.spent if trials else 0,
            "diagnose_seconds": diagnose_seconds, "best_threshold": best_threshold,
            "runs": {k: [v[0], v[1]] for k, v in runs.items()}, "loss": loss,
            "guard": {k: counts.get(k) for k in ("steps", "skipped", "clipped", "rebased")} if counts else None,
            "spikes": {k: spikes(v[1], l0) for k, v in runs.items()},
            "regret": {k: regret(v) for k, v in loss.items()}}


def long_confirmed(row: Dict[str, object]) -> bool:
    """An explode label holds where some threshold trains the model (l* at least GAIN x |l0| below l0) and
    unclipped training or a fixed 1.0 spikes, or gives back at least a tenth of the grid's progress."""
    l0, star = row["l0"], min(v for k, v in row["loss"].items() if k.startswith("grid"))
    suffers = any(row["spikes"][m] > 0 or row["regret"][m] >= 0.1 for m in ("none", "fixed-1.0"))
    return l0 - star >= GAIN * abs(l0) and suffers


def long_healthy(row: Dict[str, object]) -> bool:
    """A healthy label holds where unclipped training has no spike and ends within 0.05 of the grid's best in R."""
    return row["spikes"]["none"] == 0 and row["regret"]["none"] <= 0.05


def summarise_long(rows: List[Dict[str, object]]) -> str:
    for row in rows:  # from the curves, so that a summary of saved rows counts spikes as defined here
        row["spikes"] = {k: spikes(v[1], row["l0"]) for k, v in row["runs"].items()}
    methods = ["gradscope", *[m for m in LONG_BASELINES if all(m in r["runs"] for r in rows)]] + (
        ["unguarded"] if all("unguarded" in r["runs"] for r in rows) else [])
    lines = ["| scenario | label | advice | " + " | ".join(f"R {m}" for m in methods) + " | spikes "
             + "/".join(methods) + " |", "|---|---|---|" + "---|" * len(methods) + "---|"]
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        advice = ", ".join(sorted({r["method"] + ("" if r["threshold"] is None else f" {r['threshold']:g}")
                                   + (" + skip" if "skip=" in r["advice"] else "") for r in mine}))
        cells = [f"{statistics.mean(r['regret'][m] for r in mine):.3f}" for m in methods]
        spike_cells = "/".join(str(sum(r["spikes"][m] for r in mine)) for m in methods)
        lines.append(f"| {name} | {mine[0]['label']} | {advice} | " + " | ".join(cells) + f" | {spike_cells} |")
    lines.append("")
    lines.append(f"R: normalised regret of the final held-out loss against the best of the grid {LONG_GRID} (mean "
                 f"over seeds); spikes: held-out checkpoints every {CHECK_EVERY} steps that give back more than "
                 f"{SPIKE_SHARE:.0%} of the run's progress from its lowest checkpoint so far, summed over seeds")
    explode = [r for r in rows if r["label"] == "explode"]
    unconfirmed = [f"{r['scenario']} seed {r['seed']}" for r in explode if not long_confirmed(r)]
    wrong = [f"{r['scenario']} seed {r['seed']}" for r in rows if r["label"] == "healthy" and not long_healthy(r)]
    if unconfirmed or wrong:
        lines.append(f"labels the grid does not confirm: {', '.join(unconfirmed + wrong)}")
    scored = [r for r in rows if (r["label"] == "explode" and long_confirmed(r))
              or (r["label"] == "healthy" and long_healthy(r))]
    for label, names in (("the best peer's", LONG_PEERS),
                         ("the best of the peers' and gradscope's own ablations'", LONG_BASELINES)):
        peers = [m for m in names if all(m in r["loss"] for r in rows)]
        best = {id(r): min(peers, key=lambda m: r["loss"][m]) for r in rows}
        wins = [r for r in scored if r["loss"]["gradscope"] <= r["loss"][best[id(r)]] * (1 + TIE)]
        lines.append(f"gradscope's final held-out loss at most {label} (within {TIE:.0%}) in "
                     f"{len(wins)}/{len(scored)} scored scenario-seed pairs; lost: "
                     + (", ".join(f"{r['scenario']} seed {r['seed']} ({r['loss']['gradscope']:.4g} vs "
                                  f"{best[id(r)]} {r['loss'][best[id(r)]]:.4g})" for r in scored if r not in wins)
                        or "none"))
    diverged = [f"{r['scenario']} seed {r['seed']}" for r in rows if not math.isfinite(r["loss"]["gradscope"])]
    lines.append(f"gradscope diverged in {len(diverged)} of {len(rows)} runs" + (f": {', '.join(diverged)}" if diverged
                                                                                else ""))
    confirmed_rows = [r for r in explode if long_confirmed(r)]
    if confirmed_rows:
        for m in methods:
            lines.append(f"  mean R over {len(confirmed_rows)} confirmed explode pairs, {m}: "
                         f"{statistics.mean(r['regret'][m] for r in confirmed_rows):.3f}")
    healthy = [r for r in rows if r["label"] == "healthy"]
    if healthy:
        worst = max(r["loss"]["gradscope"] / r["loss"]["none"] for r in healthy)
        lines.append(f"healthy: gradscope's final held-out loss over unclipped, worst {worst:.4f}")
    guarded = [r for r in rows if r.get("guard")]
    for label in ("explode", "healthy"):
        mine = [r for r in guarded if r["label"] == label]
        if mine:
            lines.append(f"the guard on {label} pairs: skipped " + ", ".join(
                f"{r['guard']['skipped']}" for r in mine) + f" of {mine[0]['guard']['steps']} steps "
                "(each pair, in the order above)")
    better = [r for r in rows if r["loss"]["gradscope"] <= min(r["loss"]["none"], r["loss"]["fixed-1.0"]) * (1 + TIE)]
    lines.append(f"gradscope within {TIE:.0%} of the better of unclipped and a fixed 1.0, or below, in "
                 f"{len(better)}/{len(rows)} pairs" + ("; not in: " + ", ".join(
                     f"{r['scenario']} seed {r['seed']} ({r['loss']['gradscope']:.4g} vs "
                     f"{min(r['loss']['none'], r['loss']['fixed-1.0']):.4g})" for r in rows if r not in better)
                     if len(better) < len(rows) else ""))
    lines.append(no_harm(rows))
    reached = [r for r in rows if r.get("schedule_reached") is False]
    lines.append(f"profile or trials short of the schedule's peak learning rate (said so in the report): "
                 f"{len(reached)} of {len(rows)} pairs")
    return "\n".join(lines)


TIE = 0.01  # a pair where gradscope's R is within this of the best baseline's is a tie, and a tie counts as a win
GAIN = 0.05  # an explode pair counts when the grid's best threshold ends this share of l0 below l0 ...
LOSS = 0.5  # ... and the unclipped run loses at least this share of that gain (R(none) >= LOSS)


def confirmed(row: Dict[str, object]) -> bool:
    """Whether the grid confirms an explode label for this pair: some threshold trains the model well
    (l* at least GAIN x |l0| below l0) and no clipping throws much of that away. Where l0 - l* is a rounding
    error, R = (l - l*) / (l0 - l*) measures noise, so such pairs are reported and left out of R."""
    l0, star = row["l0"], row["loss"]["oracle"]
    return l0 - star >= GAIN * abs(l0) and row["regret"]["none"] >= LOSS


def summarise(rows: List[Dict[str, object]]) -> str:
    methods = ["gradscope", "none", "fixed-1.0", "autoclip", "zclip-percentile", "zclip", "oracle"]
    methods = [m for m in methods if all(m in r["regret"] for r in rows)]  # rows saved before a peer was added
    lines = ["| scenario | label | flagged | advice | " + " | ".join(f"R {m}" for m in methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for name in dict.fromkeys(r["scenario"] for r in rows):
        mine = [r for r in rows if r["scenario"] == name]
        advice = ", ".join(sorted({r["method"] + ("" if r["threshold"] is None else f" {r['threshold']:.3g}")
                                   for r in mine}))
        flagged = f"{sum(r['flagged'] for r in mine)}/{len(mine)}"
        cells = [f"{statistics.median(r['regret'][m] for r in mine):.3f}" for m in methods]
        lines.append(f"| {name} | {mine[0]['label']} | {flagged} | {advice} | " + " | ".join(cells) + " |")
    flagging = [r for r in rows if r["label"] == "explode"]
    explode = [r for r in flagging if confirmed(r)]
    healthy = [r for r in rows if r["label"] == "healthy"]
    detection = (sum(r["flagged"] for r in flagging) + sum(not r["flagged"] for r in healthy)) / max(
        len(flagging) + len(healthy), 1)
    false_alarms = sum(r["flagged"] for r in healthy)
    lines.append("")
    extended = [r for r in rows if r.get("profile_steps", PROFILE_STEPS) > PROFILE_STEPS]
    lines.append(f"detection {detection:.0%} ({false_alarms} false alarm(s) on {len(healthy)} healthy runs); "
                 f"profiling cost {PROFILE_STEPS} steps per scenario and seed, more on {len(extended)} of "
                 f"{len(rows)} pairs whose profile saw nothing yet"
                 + "".join(f"\n  {r['scenario']} seed {r['seed']}: {r['profile_steps']} steps, "
                           f"{'flagged' if r['flagged'] else 'nothing flagged'}" for r in extended))
    unconfirmed = [f"{r['scenario']} seed {r['seed']}" for r in flagging if not confirmed(r)]
    if unconfirmed:
        lines.append(f"explode pairs the grid does not confirm, left out of R: {', '.join(unconfirmed)}")
    if explode:
        regrets = [r["regret"]["gradscope"] for r in explode]
        lines.append(f"explode: gradscope mean R {statistics.mean(regrets):.3f}, median R "
                     f"{statistics.median(regrets):.3f}, max R {max(regrets):.3f} over {len(regrets)} pairs")
        unflagged = [f"{r['scenario']} seed {r['seed']} (R {r['regret']['gradscope']:.3f})" for r in explode
                     if not r["flagged"]]
        flagged = [r["regret"]["gradscope"] for r in explode if r["flagged"]]
        if unflagged and flagged:  # no trial ran where nothing was flagged: the trials' own worst is the next
            lines.append(f"         max R over the {len(flagged)} flagged pairs {max(flagged):.3f}; not flagged, so "
                         f"no trial ran: {', '.join(unflagged)}")
        for m in [m for m in ("none", *BASELINES) if all(m in r["regret"] for r in explode)]:
            lines.append(f"         {m}: mean R {statistics.mean(r['regret'][m] for r in explode):.3f}")
        ranks = [r["rank_correlation"] for r in explode if math.isfinite(r["rank_correlation"])]
        if ranks:
            # rows written before the length was recorded ran the default
            horizon = sorted({r["trials"].get("steps", FIRST_STEPS) for r in explode if r.get("trials")})
            lines.append(f"short-horizon bias: Spearman correlation of the trials' ranking "
                         f"({'/'.join(map(str, horizon))} steps) with the 300-step ranking, median "
                         f"{statistics.median(ranks):.2f} (min {min(ranks):.2f}, {len(ranks)} pairs)")
    tried = [r for r in rows if r["trial_steps"]]
    if tried:
        # against the profile asked for, or the longer one run where it went on (one cut short by a NaN
        # loss took fewer steps than asked, and the budget is stated against the profile asked for)
        profiled = [max(PROFILE_STEPS, r["profile_steps"]) for r in tried]
        cost = [(p + r["trial_steps"]) / p for p, r in zip(profiled, tried)]
        ratio = [r["diagnose_seconds"] / r["profile_seconds"] for r in tried]
        # the same in time against the profile asked for: one cut short by a NaN loss, scaled to its steps
        asked = [r["profile_seconds"] * p / max(r["profile_steps"], 1) for p, r in zip(profiled, tried)]
        scaled = [(a + r["diagnose_seconds"] - r["profile_seconds"]) / a for a, r in zip(asked, tried)]
        lines.append(f"cost where trials ran ({len(tried)} pairs): {statistics.median(profiled):.0f} profiled + "
                     f"{statistics.median(r['trial_steps'] for r in tried):.0f} trial steps (median), "
                     f"{statistics.median(cost):.1f}x the profile in steps (max {max(cost):.1f}x); "
                     f"diagnose time over profiling time median {statistics.median(ratio):.1f}x, "
                     f"max {max(ratio):.1f}x; over the profile asked for (one cut short by a non-finite "
                     f"loss scaled to {PROFILE_STEPS} steps) median {statistics.median(scaled):.1f}x, "
                     f"max {max(scaled):.1f}x")
        exploding = [c for c, r in zip(cost, tried) if r["label"] == "explode"]
        if exploding:
            lines.append(f"cost on the explode-labelled pairs where trials ran ({len(exploding)}): "
                         f"{statistics.median(exploding):.1f}x the profile in steps (max {max(exploding):.1f}x)")
    if healthy:
        ratios = [r["loss"]["gradscope"] / r["loss"]["none"] for r in healthy if r["loss"]["none"] > 0]
        lines.append(f"healthy: gradscope's held-out loss over unclipped: worst {max(ratios):.3f}")
    pairs = [r for r in rows if r["label"] == "healthy" or r in explode]
    peers = [m for m in ("none", *BASELINES) if all(m in r["regret"] for r in rows)]
    wins = sum(all(r["regret"]["gradscope"] <= r["regret"][m] + 1e-9 for m in peers) for r in pairs)
    ties = sum(all(r["regret"]["gradscope"] <= r["regret"][m] + TIE for m in peers) for r in pairs)
    lines.append(f"gradscope R <= every baseline's R in {wins}/{len(pairs)} scenario-seed pairs; within {TIE:g} of "
                 f"the best baseline's (ties count as wins) in {ties}/{len(pairs)}")
    # a healthy run is never told to clip, so where a baseline's clipping edges out unclipped training no
    # advice that keeps that promise can win the pair: the most it could win is every other pair
    lost = [r for r in healthy if any(r["regret"][m] < r["regret"]["none"] - 1e-9 for m in peers[1:])]
    edge = max((r["regret"]["none"] - min(r["regret"][m] for m in peers[1:]) for r in lost), default=0.0)
    lines.append(f"  at most {len(pairs) - len(lost)}/{len(pairs)} for any advice that tells a healthy run not to "
                 f"clip: on {len(lost)} of {len(healthy)} healthy pairs a baseline beats unclipped (by at most "
                 f"{edge:.3f} in R)")
    lines.append(no_harm(rows))
    return "\n".join(lines)


NO_HARM_R = 0.01  # the short sets: gradscope's R at most unclipped training's plus this, on every pair
NO_HARM_LOSS = 0.01  # the long set: gradscope's final held-out loss at most this share above unclipped training's


def no_harm(rows: List[Dict[str, object]]) -> str:
    """The worst pair of the set against unclipped training: no advice may leave a run worse off than doing
    nothing. Every pair counts, labels confirmed or not."""
    if "runs" in rows[0]:
        def excess(r):
            none, mine = r["loss"]["none"], r["loss"]["gradscope"]
            if not math.isfinite(mine):
                return math.inf
            return 0.0 if not math.isfinite(none) else (mine - none) / abs(none)
        bar, unit = NO_HARM_LOSS, "of unclipped training's final held-out loss"
    else:
        def excess(r):
            return r["regret"]["gradscope"] - r["regret"]["none"]
        bar, unit = NO_HARM_R, "in R over unclipped training"
    worst = max(rows, key=excess)
    harmed = [r for r in rows if excess(r) > bar]
    figure = f"{excess(worst):+.1%}" if "runs" in rows[0] else f"{excess(worst):+.3f}"
    return (f"no harm: worst pair {worst['scenario']} seed {worst['seed']}, {figure} {unit}; "
            f"{len(harmed)} of {len(rows)} pairs past the bar of {bar:g}"
            + (" (" + ", ".join(f"{r['scenario']} seed {r['seed']}" for r in harmed) + ")" if harmed else ""))


def placement(rows: List[Dict[str, object]]) -> str:
    """Where the oracle's threshold c* sits against what a profile shows, for every explode pair."""
    lines = ["| scenario | seed | optimizer | c* | start norm | c*/start norm | median norm | lr_eff c*/‖w‖ | "
             "advice | advice/c* | R |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["label"] != "explode" or not confirmed(r):
            continue
        c = r["best_threshold"]
        update = r["lr_eff"] * c / r["weight_norm"] if math.isfinite(r["lr_eff"]) else math.nan
        ratio = r["threshold"] / c if r["threshold"] else math.nan
        lines.append(f"| {r['scenario']} | {r['seed']} | {r['optimizer']} | {c:.2g} | {r['start_norm']:.3g} | "
                     f"{c / r['start_norm']:.2g} | {r['median_norm']:.3g} | {update:.2g} | {r['method']} "
                     f"{r['threshold'] if r['threshold'] is not None else ''} | {ratio:.2g} | "
                     f"{r['regret']['gradscope']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", choices=list(SETS), default="main",
                        help="main: the scenarios the advice was compared on; heldout: ones it never was")
    parser.add_argument("--scenarios", nargs="*", choices=[n for s in SETS.values() for n in s],
                        help="a subset of the set's scenarios (default: all of them)")
    parser.add_argument("--jobs", type=int, default=1, help="scenario-seed pairs run at once, one thread each "
                                                           "(the time ratios are then only indicative)")
    parser.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    parser.add_argument("--exhaustive", action="store_true",
                        help="try every candidate (no budget, no early stop): data for studying the choice rule")
    parser.add_argument("--trial-steps", type=int, metavar="N",
                        help="diagnose's --trial-steps (default: the adaptive horizon): fixed-length trials, and cost")
    parser.add_argument("--summarise", metavar="FILE", help="print the summary of the rows a --json run wrote, "
                                                            "training nothing")
    parser.add_argument("--reuse", metavar="FILE", help="--set long: take the grid and the peers' runs from the rows "
                                                        "a --json run wrote, and train again only the arms that run "
                                                        "gradscope's code (its advice, and its guard's baselines)")
    args = parser.parse_args()
    if args.summarise:
        rows = json.loads(Path(args.summarise).read_text())
        if rows and "runs" in rows[0]:
            print(summarise_long(rows))
            return
        print(summarise(rows))
        print()
        print(placement(rows))
        return
    reuse = {}
    if args.reuse:
        if args.set != "long":
            parser.error("--reuse applies to --set long")
        reuse = {(r["scenario"], r["seed"]): r for r in json.loads(Path(args.reuse).read_text())}
    if args.exhaustive:
        os.environ[EXHAUSTIVE] = "1"  # inherited by the worker processes
    if args.trial_steps is not None:
        os.environ[TRIAL_LENGTH] = str(args.trial_steps)
    seeds = range(1 if args.quick else args.seeds)
    registry = SETS[args.set]
    names = args.scenarios or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        parser.error(f"not in --set {args.set}: {', '.join(unknown)}")
    jobs = [(args.set, name, seed, reuse.get((name, seed))) for name in names for seed in seeds]
    rows = []
    start = time.perf_counter()
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for row in pool.imap(_run_pair, jobs):
                rows.append(row)
                _progress(row, start)
    else:
        for job in jobs:
            rows.append(_run_pair(job))
            _progress(rows[-1], start)
    if args.set == "long":
        print(summarise_long(rows))
    else:
        print(summarise(rows))
        print()
        print(placement(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float) + "\n")


def _progress(row: Dict[str, object], start: float) -> None:
    if "runs" in row:
        print(f"  {row['scenario']} seed {row['seed']}: advice {row['advice']}, best grid {row['best_threshold']}, "
              f"R {row['regret']['gradscope']:.3f}, loss {row['loss']['gradscope']:.4g} against the best baseline's "
              f"{min(row['loss'][m] for m in LONG_BASELINES if m in row['loss']):.4g} "
              f"({time.perf_counter() - start:.0f}s)",
              file=sys.stderr, flush=True)
        return
    print(f"  {row['scenario']} seed {row['seed']}: advice {row['method']} {row['threshold']}, best grid "
          f"{row['best_threshold']}, R {row['regret']['gradscope']:.3f} ({time.perf_counter() - start:.0f}s)",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
