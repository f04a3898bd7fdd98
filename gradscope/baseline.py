"""Baselines: record a known-good run, then compare later runs with it (a ratchet that does not flap).

Findings are keyed by (rule id, layer), never by raw values, so a finding that is still there with
slightly different numbers is not new. Numbers are compared only through tolerances on a few
model-level metrics (a global-norm p95 more than ``tolerance`` x the baseline's is a regression).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from . import outputs
from .errors import GradscopeError
from .analyse.evaluate import Finding
from .report import Report
from .analyse.ruleset import SEVERITIES

BASELINE_KIND = "gradscope-baseline"
BASELINE_VERSION = 1
DEFAULT_TOLERANCE = 3.0
# Model metrics compared with the baseline: a value above tolerance x the baseline's is a regression.
WATCHED = ("global_norm_p95", "global_norm_max")
SAME_MODEL_SHARE = 0.5  # a baseline shares at least this share of the layers of the model it gates

Key = Tuple[str, Optional[str]]


@dataclasses.dataclass(frozen=True)
class Baseline:
    model: str
    findings: Mapping[Key, str]  # (rule id, layer) -> severity
    metrics: Mapping[str, float]
    layers: Tuple[str, ...]
    source: str


@dataclasses.dataclass(frozen=True)
class Regression:
    metric: str
    baseline: float
    current: float
    tolerance: float


@dataclasses.dataclass(frozen=True)
class Comparison:
    new: Tuple[Finding, ...]  # not in the baseline, or more severe than there
    known: Tuple[Finding, ...]  # in the baseline at the same or a lower severity
    fixed: Tuple[Key, ...]  # in the baseline, gone now
    stale: Tuple[Key, ...]  # baseline entries for a layer or rule that no longer exists
    regressions: Tuple[Regression, ...]
    source: str


def baseline_document(report: Report) -> Dict[str, Any]:
    m = report.statistics.model.metrics
    return {
        "kind": BASELINE_KIND,
        "schema_version": BASELINE_VERSION,
        "model": report.model,
        "findings": [{"rule_id": f.rule_id, "layer": f.layer, "severity": f.severity} for f in report.findings],
        "metrics": {k: (m[k] if math.isfinite(m[k]) else None) for k in WATCHED},
        "layers": [layer.name for layer in report.statistics.layers],
    }


def write_baseline(report: Report, path: Union[str, Path]) -> None:
    outputs.write(path, json.dumps(baseline_document(report), indent=2) + "\n", "baseline")


def load_baseline(path: Union[str, Path]) -> Baseline:
    path = Path(path)
    hint = (f"record one from a report of this model: gradscope.baseline.write_baseline(report, {str(path)!r}), "
            "or point at a JSON report of a known-good run")
    remedy = ("record-baseline", str(path))
    if not path.is_file():
        raise GradscopeError(f"baseline file not found: {path}", hint, remedy=remedy)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GradscopeError(f"{path}: not a JSON baseline ({exc})", hint, remedy=remedy) from None
    if isinstance(doc, dict) and "kind" not in doc and "recommendation" in doc:  # a JSON report serves as one
        return _of_report(Report.from_json(doc), str(path))
    if not isinstance(doc, dict) or doc.get("kind") != BASELINE_KIND:
        raise GradscopeError(f"{path}: not a gradscope baseline (no kind: {BASELINE_KIND}) nor a JSON report",
                             hint, remedy=remedy)
    if doc.get("schema_version") != BASELINE_VERSION:
        raise GradscopeError(f"{path}: baseline schema_version {doc.get('schema_version')!r} is not supported", hint, remedy=remedy)
    def bad(what: str) -> GradscopeError:
        return GradscopeError(f"{path}: malformed baseline: {what}", hint, remedy=remedy)

    entries, metrics_doc, layers_doc, model = (doc.get(k) for k in ("findings", "metrics", "layers", "model"))
    if not isinstance(entries, list):
        raise bad("'findings' must be a list")
    findings: Dict[Key, str] = {}
    for i, f in enumerate(entries):
        if not (isinstance(f, dict) and isinstance(f.get("rule_id"), str)
                and (f.get("layer") is None or isinstance(f.get("layer"), str))):
            raise bad(f"findings[{i}] needs a string rule_id and a string or null layer")
        if f.get("severity") not in SEVERITIES:
            raise bad(f"findings[{i}] has severity {_short(f.get('severity'))}, not one of {', '.join(SEVERITIES)}")
        findings[(f["rule_id"], f.get("layer"))] = f["severity"]
    if not isinstance(metrics_doc, dict):
        raise bad("'metrics' must be a mapping of metric names to numbers")
    metrics: Dict[str, float] = {}
    for name, value in metrics_doc.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise bad(f"metrics.{_short(name)} is {_short(value)}, not a finite number or null")
        metrics[name] = float(value)
    if not (isinstance(layers_doc, list) and all(isinstance(x, str) for x in layers_doc)):
        raise bad("'layers' must be a list of layer names")
    if not isinstance(model, str):
        raise bad("'model' must be the model's name")
    return Baseline(model=model, findings=findings, metrics=metrics, layers=tuple(layers_doc), source=str(path))


def _of_report(doc, source: str) -> Baseline:
    """The baseline a JSON report (a ReportDocument, read by ``Report.from_json``) holds: its findings, the
    watched metrics and its layers, as ``write_baseline`` would have recorded them from the Report."""
    metrics = {k: float(v) for k, v in doc.metrics.items()
               if k in WATCHED and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return Baseline(model=doc.model, findings={(f["rule_id"], f.get("layer")): f["severity"] for f in doc.findings},
                    metrics=metrics, layers=tuple(doc.layer_names), source=source)


def _short(value: Any, most: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= most else text[:most - 1] + "…"


def check_same_model(report: Report, baseline: Baseline) -> None:
    """Refuse a baseline recorded from another model: its findings would all read as fixed or new, and
    its norm tolerances would compare unrelated scales. Layers are the model's fingerprint here."""
    current = [layer.name for layer in report.statistics.layers]
    if not baseline.layers or not current:
        return
    shared = len(set(current) & set(baseline.layers))
    if shared / max(len(current), len(baseline.layers)) < SAME_MODEL_SHARE:
        raise GradscopeError(
            f"{baseline.source} was recorded from another model ({baseline.model or 'unnamed'}: "
            f"{len(baseline.layers)} layers, {shared} of them in {report.model}'s {len(current)})",
            f"re-record it from a report of this model: gradscope.baseline.write_baseline(report, {baseline.source!r})",
            remedy=("re-record-baseline", str(baseline.source)))


def compare(report: Report, baseline: Baseline, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    check_same_model(report, baseline)
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    new: List[Finding] = []
    known: List[Finding] = []
    for f in report.findings:
        before = baseline.findings.get((f.rule_id, f.layer))
        (known if before is not None and rank[f.severity] <= rank.get(before, -1) else new).append(f)
    current = {(f.rule_id, f.layer) for f in report.findings}
    layers = {layer.name for layer in report.statistics.layers}
    rules = {r.id for r in report.rules.rules} if report.rules else {k[0] for k in baseline.findings}
    stale = tuple(k for k in baseline.findings if (k[1] is not None and k[1] not in layers) or k[0] not in rules)
    fixed = tuple(k for k in baseline.findings if k not in current and k not in stale)
    regressions = []
    for name, before in baseline.metrics.items():
        now = report.statistics.model.metrics.get(name, float("nan"))
        if before > 0 and (not math.isfinite(now) or now > tolerance * before):
            regressions.append(Regression(name, before, now, tolerance))
    return Comparison(tuple(new), tuple(known), fixed, stale, tuple(regressions), baseline.source)
