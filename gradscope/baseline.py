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

from .errors import GradscopeError
from .evaluate import Finding
from .report import Report
from .ruleset import SEVERITIES

BASELINE_KIND = "gradscope-baseline"
BASELINE_VERSION = 1
DEFAULT_TOLERANCE = 3.0
# Model metrics compared with the baseline: a value above tolerance x the baseline's is a regression.
WATCHED = ("global_norm_p95", "global_norm_max")

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
    Path(path).write_text(json.dumps(baseline_document(report), indent=2) + "\n", encoding="utf-8")


def load_baseline(path: Union[str, Path]) -> Baseline:
    path = Path(path)
    hint = f"write one with: gradscope diagnose TARGET --write-baseline {path}"
    if not path.is_file():
        raise GradscopeError(f"baseline file not found: {path}", hint)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise GradscopeError(f"{path}: not a JSON baseline ({exc})", hint) from None
    if not isinstance(doc, dict) or doc.get("kind") != BASELINE_KIND:
        raise GradscopeError(f"{path}: not a gradscope baseline (no kind: {BASELINE_KIND})", hint)
    if doc.get("schema_version") != BASELINE_VERSION:
        raise GradscopeError(f"{path}: baseline schema_version {doc.get('schema_version')!r} is not supported", hint)
    try:
        findings = {(f["rule_id"], f["layer"]): f["severity"] for f in doc["findings"]}
        metrics = {k: float(v) for k, v in doc["metrics"].items() if v is not None}
        layers = tuple(doc["layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GradscopeError(f"{path}: malformed baseline ({type(exc).__name__}: {exc})", hint) from None
    return Baseline(model=str(doc.get("model", "")), findings=findings, metrics=metrics, layers=layers,
                    source=str(path))


def compare(report: Report, baseline: Baseline, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
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
