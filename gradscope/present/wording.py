"""The report's vocabulary, in one home for every renderer: numbers, counts, names, severities, advice,
and why (``REASONS``: the words of every :class:`~gradscope.advise.reasons.Reason` the advice and the
runs behind it give, said by :func:`say`).

Pure string functions; the rich report, the HTML report, the machine formats and the JSON report all
word things the same way because they all word them here. What is worded where it arises instead: a
rule's message (its YAML), an error's one line and its remedy (``GradscopeError``), a trial's short
instability verdict (``judge.assess``: "the loss blew up to x12 its start") and a partial report's
stopped reason (``gradscope.recorder``), each a single phrase that names its own figures.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

from ..advise.reasons import Reason, Reasons
from ..advise.recommend import FREQUENT_OUTLIERS, Recommendation
from ..analyse.ruleset import SEVERITIES

METHOD_WORDS = {"norm": "clip by norm", "value": "clip by value", "agc": "adaptive gradient clipping (AGC)"}
SEVERITY_RANK = {s: i for i, s in enumerate(reversed(SEVERITIES))}  # 0 is the worst: error, warning, info
ELLIPSIS = "…"


CAUSE_WORDS = {"data": "the data", "optimizer": "the optimizer's configuration", "numerics": "numerics",
               "learning_rate": "the learning rate"}


def cause_line(cause) -> str:
    """The likely cause in one line (``cause`` an advise.cause.Cause): 'the data: at step 12, sample 5 ...'."""
    return f"{CAUSE_WORDS[cause.kind]}: {say(cause.reasons)}"


def spike_lines(spikes) -> list:
    """One line per spike taken apart (analyse.profile.SpikeSamples): its step and the samples that carry it."""
    lines = []
    for spike in spikes:
        head = f"step {spike.step} ({'non-finite' if spike.why == 'nonfinite' else f'spike, z {fmt(spike.z)}'}), taken apart"
        if not spike.samples:
            lines.append(f"{head}: no sample could be measured alone ({spike.error})")
            continue
        named = ", ".join(f"#{s.index} {fmt(100 * s.share) + '%' if math.isfinite(s.share) else 'non-finite'}"
                          for s in spike.samples[:3])
        ratio = spike.batch_loss / spike.previous_loss if spike.previous_loss > 0 else math.nan
        lines.append(f"{head}: samples by share of its squared norm {named} of {spike.batch_size}"
                     + (f"; its loss x{fmt(ratio)} the batch before's at the same weights" if math.isfinite(ratio)
                        else ""))
    return lines


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
    """What the run's own clipping did, in one line (``record`` a clipping.ClippingSummary, ``metrics`` the
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
        exact = "" if guard.get("skip_kind", "gradient zeroed") != "gradient zeroed" else \
            " (gradient zeroed only: attach the Clipper to the optimizer to skip the whole step)"
        words.append(f"the guard skipped {plural(int(guard['skipped']), 'step')}{exact}")
    if guard.get("rebased"):
        words.append(f"re-based {plural(int(guard['rebased']), 'time')} on a new level of the norm or loss "
                     f"(from step {', '.join(str(s) for s in guard.get('rebase_steps', [])[:3])})")
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


# -- why: every Reason's words (see gradscope.advise.reasons) -------------------------------------------
def _steps_list(steps: Sequence[int]) -> str:
    return f" (step{'s' if len(steps) != 1 else ''} {', '.join(map(str, steps))})" if steps else ""


def _after(f: Mapping[str, Any], words: str) -> str:
    return words if f.get("steps") is None else f"after {f['steps']} steps, {words}"


def _guard_rule(f: Mapping[str, Any]) -> str:
    trial = "" if f["trial_skips"] is None else f", and {f['trial_skips']} of the winning trial's {f['trial_steps']}"
    return (f"a step whose loss or global norm lies more than {f['z']:g} standard deviations above the mean of "
            f"the last {f['window']} steps is skipped; over the {f['profiled']} profiled steps it would have skipped "
            f"{len(f['skipped'])}{_steps_list(f['skipped'])}{trial}. It judges a step once {f['min_history']} steps "
            "are in its window. On a run without such outliers it changes nothing; its cost is one norm and one "
            "multiply of the gradients per step, with no host sync")


def _trials(f: Mapping[str, Any]) -> str:
    carried = "" if f["carried"] is None else f", the contenders carried to {f['carried']}"
    return (f"{f['tried']} trial{'s' if f['tried'] != 1 else ''} of {f['steps']} steps from the same start{carried}, "
            f"judged on held-out batches: {say(f['ruling'])}")


def _agc_ratio(f: Mapping[str, Any]) -> str:
    layers = f["layers"]
    which = f"layer{'s' if len(layers) != 1 else ''} {', '.join(layers)}" if layers else "no single layer"
    return (f"the findings call for AGC ({which}); λ is the largest median grad/weight ratio of the other "
            f"layers ({f['level']:.3g}), so AGC reins in what stands out and leaves the rest "
            "(clip rate estimated layer-wise; AGC acts unit-wise)")


REASONS: Dict[str, Callable[[Mapping[str, Any]], str]] = {
    # the trials' ruling (advise.judge.ruling)
    "no_stable_trial": lambda f: ("no threshold tried kept training stable; clipping alone does not rescue this "
                                  "run: lower the learning rate as well"),
    "lowest_held_out": lambda f: _after(f, f"the lowest held-out loss of the stable trials, {f['best']:.4g} "
                                           f"(start {f['start']:.4g})"),
    "least_clipping_near_best": lambda f: _after(f, (
        f"the least clipping within {f['tie']:.0%} of the best held-out improvement (or {f['signal']:.0%} of the "
        f"start loss): {f['chosen']:.4g}, against {f['best']:.4g} at {f['best_threshold']:g} (start {f['start']:.4g})")),
    "below_unstable_neighbour": lambda f: _after(f, (
        f"one step below the loosest near-best threshold, whose looser neighbour went unstable (held-out "
        f"{f['chosen']:.4g}; best {f['best']:.4g} at {f['best_threshold']:g}, start {f['start']:.4g})")),
    "some_unstable": lambda f: f"{f['unstable']} of {f['tried']} went unstable, the loosest at {f['loosest']:g}",
    "nothing_learned": lambda f: (f"no trial trained measurably (the best held-out loss, {f['best']:.4g}, is not "
                                  f"{f['signal']:.0%} below the start's), so the pick rests on stability alone"),
    "no_trial_fitted": lambda f: "no trial fitted in the budget",
    # where the trials stopped (run.schedule, advise.judge.promote)
    "first_rung_most": lambda f: f"the first rung may try {f['most']} thresholds",
    "first_rung_budget": lambda f: f"the first rung's share of the budget, {f['steps']} steps, would run out",
    "trial_time_limit": lambda f: f"another trial would pass the {f['seconds']:g} s limit",
    "then": lambda f: f"then {say(f['reason'])}",
    "none_stable": lambda f: "no threshold stayed stable",
    "rung_past_longest": lambda f: (f"the next rung, {f['next']} steps, would pass the longest trial allowed, "
                                    f"{f['longest']}"),
    "one_left": lambda f: f"one threshold was left standing at {f['steps']} steps",
    "nothing_learned_within": lambda f: f"no threshold trained measurably within {f['steps']} steps",
    "pick_held": lambda f: f"the pick held its place from {f['since']} to {f['steps']} steps",
    "pick_moved": lambda f: f"the pick moved between {f['since']} and {f['steps']} steps",
    "pick_clear": lambda f: f"the pick was clearly ahead of the thresholds beside it at {f['steps']} steps",
    "neighbours_tied": lambda f: f"the thresholds beside the pick could not be told apart at {f['steps']} steps",
    "no_room_for_rung": lambda f: (f"{say(f['why'])}, and the budget, {f['budget']} steps, has no room for a rung "
                                   f"of {f['next']}"),
    "rung_time_limit": lambda f: f"{say(f['why'])}, and another rung would pass the {f['seconds']:g} s limit",
    "batches_repeat": lambda f: ("Experiment.batches repeats within the trials, so the held-out batches were also "
                                 "trained on"),
    # the recommendation's basis (advise.recommend)
    "trials": lambda f: _trials(f),
    "fix_first": lambda f: (f"{', '.join(f['rules'])}: the run measured is not training, so no threshold read from "
                            "it means anything; fix that first, then diagnose again"),
    "no_finite_norm": lambda f: ("no finite gradient norm was observed: fix the non-finite gradients first; no "
                                 "threshold can be derived"),
    "safety_net": lambda f: (f"no finding calls for clipping; as a safety net, norm clipping at {f['net']:.3g} "
                             f"({f['headroom']:g}x the largest global norm seen, {f['largest']:.3g}) would clip no step"),
    "estimate_runaway": lambda f: (f"an estimate: {f['fraction']:g}x the global norm of the first steps "
                                   f"({f['level']:.3g}), before training ran away (peak {f['peak']:.3g}): clipping "
                                   "has to bind on nearly every step"),
    "estimate_typical": lambda f: (f"an estimate: {f['headroom']:g}x the typical global norm ({f['typical']:.3g}, the "
                                   f"median of steps without spikes); the largest was {f['largest']:.3g}"),
    "fallback": lambda f: f"{say(f['ruling'])}. Fallback, {say(f['estimate'])}",
    "not_confirmed": lambda f: "no trial ran, so the threshold is not confirmed",
    "value_quantile": lambda f: (f"the 99.9th percentile of |g| over all layers and steps ({f['threshold']:.3g}): "
                                 "capping elements there removes the outliers and keeps the gradient's direction "
                                 f"(cosine {f['cosine']:.3f})"),
    "agc_ratio": _agc_ratio,
    "guard_rule": _guard_rule,
    "guard_not_armed": lambda f: (f"Not armed: those outliers came in {f['seen']} of {f['judged']} steps it judged, "
                                  f"more often than 1 in {f['one_in']}: they are part of the data, and the clipping "
                                  "handles them"),
    # the likely cause (advise.cause)
    "cause_data": lambda f: f"{f['samples']}: the spike comes from the data, not the model",
    "cause_batch": lambda f: (f"at step {f['step']}, the batch's loss was {fmt(f['loss'])}, x{fmt(f['ratio'])} the loss "
                              f"of the batch before it ({fmt(f['previous'])}) at the same weights: the batch is the "
                              "outlier, not the model"),
    "cause_missed": lambda f: ("the optimizer holds none of the model's trainable parameters: no step moves the "
                               "model, and its gradients pile up step after step"),
    "cause_eps": lambda f: (f"Adam's eps ({f['eps']:.3g}) outweighs the gradient's RMS for {f['share']:.0%} of the "
                            f"weights of {f['first']}" + (f" and {f['layers'] - 1} more layer(s)" if f['layers'] > 1 else "")
                            + ": eps sets their step and learning stalls"),
    "cause_numerics": lambda f: ("a value went non-finite" + (f" at step {f['step']}" if f['step'] is not None else "")
                                 + (f" (first in {f['layer']})" if f['layer'] else "") + " while the gradient norm had "
                                 f"not grown before it (x{fmt(f['rise'])} its start): an overflow in the computation, "
                                 "not a run that grew into it"),
    "cause_learning_rate": lambda f: (f"the gradient norm grew (x{fmt(f['growth'])} per step, peak x{fmt(f['rise'])} its "
                                      f"start) and the largest update moved its layer by {fmt(f['update_ratio'])} of "
                                      "its weights per step: the learning rate is too hot for this model"),
    "cause_beta2": lambda f: (f"the run spiked (z {f['z']:.3g}) under beta2 = {f['beta2']:.4g}: Adam's second moment "
                              "trails a sudden gradient by hundreds of steps; 0.95 follows it within tens"),
    # the profile (run.diagnose)
    "profile_extended": lambda f: (f"after {f['asked']} steps nothing was flagged and the loss had not fallen by "
                                   f"{f['fallen']:.0%}, so the profile went on to {f['steps']}"),
    "profile_to_peak": lambda f: (f"the learning-rate schedule peaks at step {f['peak'] + 1}, after the {f['asked']} steps "
                                  f"asked for, so the profile went on through the warm-up to {f['steps']}"),
}
SEPARATORS = {"guard_not_armed": ". "}  # a clause said as a sentence of its own; the others follow a "; "


def say(reasons: Union[Reason, Reasons]) -> str:
    """A reason, or reasons in order, in words: the one place their sentences are written."""
    if isinstance(reasons, Reason):
        reasons = (reasons,)
    words = ""
    for k, reason in enumerate(reasons):
        if k:
            words += SEPARATORS.get(reason.code, "; ")
        words += REASONS[reason.code](reason.figures)
    return words
