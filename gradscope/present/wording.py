"""The report's vocabulary, in one home for every renderer: numbers, counts, names, severities, advice.

Pure string functions; the rich report, the HTML report and the machine formats all word things the
same way because they all word them here.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from ..advise.recommend import FREQUENT_OUTLIERS, Recommendation
from ..analyse.ruleset import SEVERITIES

METHOD_WORDS = {"norm": "clip by norm", "value": "clip by value", "agc": "adaptive gradient clipping (AGC)"}
SEVERITY_RANK = {s: i for i, s in enumerate(reversed(SEVERITIES))}  # 0 is the worst: error, warning, info
ELLIPSIS = "…"


def advice(rec: Recommendation) -> str:
    """The advice in a few words: 'clip by norm at 0.32', or 'no clipping needed', and the guard if armed."""
    words = "no clipping needed" if rec.method == "none" else f"{METHOD_WORDS[rec.method]} at {fmt(rec.threshold)}"
    return words + guard_words(rec)


def guard_summary(guard) -> str:
    """The guard's evidence in one line (``guard`` is a recommend.GuardAdvice)."""
    where = f" (step{'s' if len(guard.would_skip) != 1 else ''} {', '.join(map(str, guard.would_skip[:5]))}" \
        f"{', ...' if len(guard.would_skip) > 5 else ''})" if guard.would_skip else ""
    trial = "" if guard.trial_skips is None else f", {guard.trial_skips} of the winning trial's"
    if not guard.armed:
        return (f"not armed: it would skip {len(guard.would_skip)} profiled steps{where}{trial}, too often for "
                f"outliers (more than 1 in {1 / FREQUENT_OUTLIERS:.0f}): they are data")
    return (f"skip a step {guard.skip.z:g} std above the last {guard.skip.window} steps' mean (loss or norm): "
            f"{len(guard.would_skip)} of {guard.steps} profiled steps{where}{trial}")


def guard_words(rec: Recommendation) -> str:
    """', with the skip-step guard' where the advice arms it, else ''."""
    return "" if rec.guard is None or not rec.guard.armed else ", with the skip-step guard"


def clip_summary(record, metrics: Dict[str, float]) -> str:
    """What the run's own clipping did, in one line (``record`` a clipping.ClipRecord, ``metrics`` the
    model metrics): 'norm clipping at 1 (max_grad_norm): acted on 97% of 500 steps, post/pre 0.31x'."""
    spec = record.spec
    at = "" if spec.threshold is None else f" at z {fmt(spec.threshold)}" if spec.method == "adaptive" \
        else f" at {fmt(spec.threshold)}"
    head = f"{spec.method} clipping{at}, set in the {spec.source}"
    steps = metrics.get("clip_steps", math.nan)
    if math.isnan(steps) or steps == 0:
        return head + ": no step judged yet"
    words = [f"acted on {metrics['clip_rate']:.0%} of {fmt_count(int(steps))} steps"]
    if metrics.get("clip_rate", 0) > 0 and math.isfinite(metrics.get("clip_scale_mean", math.nan)):
        words.append(f"post/pre norm {fmt(metrics['clip_scale_mean'])}x when it acted")
    if math.isfinite(metrics.get("clip_capped_fraction", math.nan)):
        what = "elements" if spec.method == "value" else "units"
        words.append(f"{metrics['clip_capped_fraction']:.1%} of {what} capped")
    if spec.method != "norm" and math.isfinite(metrics.get("clip_cosine_min", math.nan)):
        words.append(f"cosine to the unclipped gradient ≥ {fmt(metrics['clip_cosine_min'])}")
    guard = record.guard or {}
    if guard.get("skipped"):
        words.append(f"the guard skipped {plural(int(guard['skipped']), 'step')}")
    return head + ": " + ", ".join(words)


def clip_rate_words(metrics: Dict[str, float]) -> str:
    """The clip rate's shape over the run: its highest over a long window, and the norms' drift."""
    window, span = metrics.get("clip_rate_window", math.nan), metrics.get("clip_window_steps", math.nan)
    if not math.isfinite(window):
        return ""
    drift = metrics.get("clip_norm_drift", math.nan)
    words = f"highest {window:.0%} over {fmt_count(int(span))} steps in a row"
    if math.isfinite(drift):
        words += (f" · pre-clip norm from {fmt(metrics['clip_reference_norm'])} to "
                  f"{fmt(metrics['clip_recent_norm'])} ({fmt(drift)}x)")
    return words


def schedule_caveat(reach) -> Optional[str]:
    """What the report says when the profile and the trials stopped short of the schedule's peak rate
    (``reach`` is a report.ScheduleReach, or None without a scheduler); None when they reached it."""
    if reach is None or reach.reached:
        return None
    went = f"the profile's {plural(reach.profile_steps, 'step')} reached {reach.profile_lr / reach.peak_lr:.0%} of it"
    if reach.trial_steps:
        went += f", the trials' {reach.trial_steps} {reach.trial_lr / reach.peak_lr:.0%}"
    return (f"the learning-rate schedule peaks at {fmt(reach.peak_lr)} at step {reach.peak_step + 1}; {went}: "
            "this advice has not seen the run at its peak rate. Diagnose a checkpoint from after the warm-up, "
            "or watch the whole run with gradscope.Monitor")


def fmt(value: Optional[float]) -> str:
    """A number in at most 7 characters: 1234, 12.3, 0.012, 4.4e-5, 3.9e10; '–' when unavailable."""
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    a = abs(value)
    if a == 0:
        return "0"
    if 1000 <= a < 1e4:
        return f"{value:.0f}"
    if 1 <= a < 1000:
        return f"{value:.3g}"
    if 0.01 <= a < 1:
        return f"{value:.2g}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def plural(n: int, word: str) -> str:
    """'1 finding', '3 findings'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def shorten_names(names: Sequence[str], width: int) -> Dict[str, str]:
    """Each name cut to at most ``width`` characters, every shortened name unique.

    First from the middle, keeping the start and the larger end, which tells siblings apart:
    ``bert.encoder.layer.0.attention.self.query`` becomes ``bert.enc…layer.0.attention.self.query``.
    Where siblings differ only in the middle, dotted parts are abbreviated from the left instead, indices
    kept whole: ``b.e.l.10.a.self.query``. Names that still clash stay whole: never ambiguous.
    """
    width = max(width, 5)
    for head in range(max(2, width // 4), 0, -1):
        out = {name: _cut(name, width, head) for name in names}
        if len(set(out.values())) == len(out):
            return out
    out = {name: _cut(_abbreviate(name, width), width, max(2, width // 4)) for name in names}
    if len(set(out.values())) == len(out):
        return out
    return {name: name for name in names}


def _abbreviate(name: str, width: int) -> str:
    """Dotted parts cut to their first letter, leftmost first, until the name fits; numbers stay whole."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= width:
            break
        if not parts[i].isdigit():
            parts[i] = parts[i][:1]
    return ".".join(parts)


def _cut(name: str, width: int, head: int) -> str:
    if len(name) <= width:
        return name
    tail = width - head - len(ELLIPSIS)
    return name[:head] + ELLIPSIS + name[len(name) - tail:]
