"""Apply a RuleSet to Statistics: each rule that holds yields a Finding with its message and observed values."""
from __future__ import annotations

import dataclasses
import math
import operator
import re
from fnmatch import fnmatchcase
from typing import Dict, List, Mapping, Optional, Tuple

from .ruleset import AllOf, Compare, Condition, Not, Rule, RuleSet, SEVERITIES, TEMPLATE_FIELD
from .stats import LayerStats, Statistics

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


@dataclasses.dataclass(frozen=True)
class Finding:
    rule_id: str
    severity: str
    layer: Optional[str]
    message: str
    observed: Mapping[str, float]
    remedy: str = "none"  # the clipping mode that addresses the condition ("norm", "value", "agc"), or "none"


def evaluate(statistics: Statistics, rules: RuleSet) -> Tuple[Finding, ...]:
    """All findings, most severe first, then in rule order and layer order."""
    model_values = _model_values(statistics)
    shared = {**{f"model.{k}": v for k, v in statistics.model.metrics.items()},
              **{k: v for k, v in model_values.items() if not isinstance(v, float)}}
    layer_values: Dict[str, Mapping[str, object]] = {}  # built once per layer, read by every layer rule
    findings: List[Finding] = []
    for rule in rules.rules:
        if rule.scope == "model":
            if _holds(rule.when, model_values):
                findings.append(_finding(rule, None, model_values))
            continue
        for layer in statistics.layers:
            if not layer.metrics or not _matches(rule, layer):  # frozen layers have no metrics
                continue
            values = layer_values.get(layer.name)
            if values is None:
                values = layer_values[layer.name] = {**layer.metrics, **shared, "layer": layer.name,
                                                     "kind": layer.kind}
            if _holds(rule.when, values):
                findings.append(_finding(rule, layer.name, values))
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    return tuple(sorted(findings, key=lambda f: rank[f.severity]))  # stable: keeps rule and layer order


def worst_severity(findings: Tuple[Finding, ...]) -> Optional[str]:
    present = {f.severity for f in findings}
    return next((s for s in reversed(SEVERITIES) if s in present), None)


def _model_values(statistics: Statistics) -> Dict[str, object]:
    m = statistics.model
    first = m.first_nonfinite
    return {
        **m.metrics,
        "model": "model",
        "first_nonfinite_layer": first[1] if first else "none",
        "first_nonfinite_step": first[0] if first else "none",
        "spike_step": m.global_spike_step,
        "loss_nonfinite_step": m.loss_nonfinite_step if m.loss_nonfinite_step is not None else "none",
        **clip_context(m.clip, m.metrics),
        **optimizer_context(m.optimizer),
        "spike_samples": spike_words(m.spikes),
    }


def _names(names, most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "") or "none"


def optimizer_context(setup) -> Dict[str, object]:
    """The words an optimizer rule's message may name: its class, and the parameters a rule is about."""
    if setup is None:
        return {"optimizer_name": "none", "decayed_exempt_names": "none", "missed_names": "none"}
    return {"optimizer_name": setup.name, "decayed_exempt_names": _names(setup.decayed_exempt),
            "missed_names": _names(setup.missed)}


NAMED_SHARE = 0.05  # a second sample is named beside the first where it carries at least this share


def spike_words(spikes) -> str:
    """The first spike taken apart, in words: its step and the samples that carry it."""
    if not spikes:
        return "none"
    spike = spikes[0]
    if spike.nonfinite_inputs:
        return (f"at step {spike.step}, sample(s) {', '.join(map(str, spike.nonfinite_inputs[:3]))} of "
                f"{spike.batch_size} hold an inf or a NaN in their own inputs or targets")
    if not spike.samples:
        return f"at step {spike.step}, no sample could be measured alone ({spike.error})"
    broken = [s for s in spike.samples if not math.isfinite(s.grad_norm)]
    if broken:
        return (f"sample(s) {', '.join(str(s.index) for s in broken[:3])} of {spike.batch_size} at step "
                f"{spike.step} had a non-finite gradient")
    top = [s for s in spike.samples[:2] if s.share >= NAMED_SHARE] or spike.samples[:1]
    return (f"at step {spike.step}, sample {top[0].index} of {spike.batch_size} carries {top[0].share:.0%} of the "
            f"spike's squared norm" + (f" and sample {top[1].index} {top[1].share:.0%}" if len(top) > 1 else ""))


def clip_context(record, metrics: Mapping[str, float]) -> Dict[str, object]:
    """The words a clipping rule's message may name: the method, who set it, the spike steps, and whether
    the norms fell or rose since the threshold was set (from the metrics the statistics already hold)."""
    if record is None:
        return {"clip_method": "none", "clip_source": "none", "clip_spike_steps": "none", "clip_drift_direction": "none"}
    spikes = ", ".join(str(s) for s in record.spikes[:8]) + (", ..." if len(record.spikes) > 8 else "")
    fell = metrics["clip_recent_norm"] < metrics["clip_reference_norm"]
    return {"clip_method": record.spec.method, "clip_source": record.spec.source,
            "clip_spike_steps": spikes or "none", "clip_drift_direction": "fell" if fell else "rose"}


def _matches(rule: Rule, layer: LayerStats) -> bool:
    if rule.match_kind and layer.kind not in rule.match_kind:
        return False
    return not rule.match_name or any(fnmatchcase(layer.name, pattern) for pattern in rule.match_name)


def _truth(condition: Condition, values: Mapping[str, object]) -> Optional[bool]:
    """Three-valued: None when a metric the condition needs is unavailable (NaN), so it never fires."""
    if isinstance(condition, Compare):
        value = values.get(condition.metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return None
        return _OPS[condition.op](value, condition.value)
    if isinstance(condition, Not):
        inner = _truth(condition.item, values)
        return None if inner is None else not inner
    results = [_truth(c, values) for c in condition.items]
    if isinstance(condition, AllOf):
        return False if False in results else (None if None in results else True)
    return True if True in results else (None if None in results else False)


def _holds(condition: Condition, values: Mapping[str, object]) -> bool:
    return _truth(condition, values) is True


def _metrics_of(condition: Condition) -> List[str]:
    if isinstance(condition, Compare):
        return [condition.metric]
    if isinstance(condition, Not):
        return _metrics_of(condition.item)
    return [m for c in condition.items for m in _metrics_of(c)]


def _finding(rule: Rule, layer: Optional[str], values: Mapping[str, object]) -> Finding:
    observed = {m: float(values[m]) for m in dict.fromkeys(_metrics_of(rule.when)) if m in values}
    message = render_message(rule.message, {**rule.params, **values})  # metrics win over a same-named param
    return Finding(rule.id, rule.severity, layer, message, observed, rule.remedy)


def render_message(template: str, values: Mapping[str, object]) -> str:
    """Fill {name} and {name:spec} fields; the names were checked when the rule file loaded."""
    def fill(match) -> str:
        value = values.get(match.group(1), "n/a")
        spec, times = match.group(2) or "", match.group(3)  # "{ratio:.3g}x": a multiple, the x kept with it
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a" if math.isnan(value) else str(value) + times  # never "n/ax"
        if isinstance(value, float) and not spec:
            spec = ".3g"
        try:
            return EXPONENT.sub(_plain_exponent, format(value, spec)) + times
        except (ValueError, TypeError):
            return str(value) + times
    return MESSAGE_FIELD.sub(fill, template)


MESSAGE_FIELD = re.compile(TEMPLATE_FIELD.pattern + r"(x?)")
EXPONENT = re.compile(r"(\d)e([+-]?)0*(\d)")


def _plain_exponent(match: re.Match) -> str:
    """3.92e+10 reads as 3.92e10, 4.1e-05 as 4.1e-5."""
    return f"{match.group(1)}e{match.group(2).replace('+', '')}{match.group(3)}"

