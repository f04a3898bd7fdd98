"""Output formats for machines and CI systems: one small pure function per format, chosen in FORMATS
(json, JUnit, SARIF, GitHub workflow commands, GitLab Code Quality, Markdown, HTML).

Each takes the Report and the gate's Verdict and returns text. ``rich`` is the terminal report as
plain text (the CLI prints it with colour when writing to a terminal).
"""
from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .. import __version__
from ..analyse.evaluate import Finding
from ..gate import Verdict
from .render import render_text
from ..report import Report
from .wording import advice, cause_line, fmt, spike_lines, plural, say, schedule_caveat

TOOL_URI = "https://pypi.org/project/gradscope/"
SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}
GITHUB_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}
# GitLab's scale is info, minor, major, critical, blocker; a failed gate (a regression, a run that did not
# finish) is critical, above any one finding
GITLAB_SEVERITY = {"error": "major", "warning": "minor", "info": "info"}


def to_json(report: Report, verdict: Verdict) -> str:
    doc = report.to_dict()
    doc["gate"] = gate_dict(verdict)
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def gate_dict(verdict: Verdict) -> Dict[str, object]:
    gate: Dict[str, object] = {
        "fail_on": verdict.fail_on,
        "exit_code": verdict.exit_code,
        "passed": verdict.passed,
        "unfinished": verdict.unfinished,
        "failing": [{"rule_id": f.rule_id, "layer": f.layer} for f in verdict.failing],
    }
    c = verdict.comparison
    if c is not None:
        gate["baseline"] = {
            "file": c.source,
            "new": [{"rule_id": f.rule_id, "layer": f.layer, "severity": f.severity} for f in c.new],
            "fixed": [{"rule_id": r, "layer": l} for r, l in c.fixed],
            "stale": [{"rule_id": r, "layer": l} for r, l in c.stale],
            "regressions": [{"metric": r.metric, "baseline": r.baseline, "current": r.current,
                             "tolerance": r.tolerance} for r in c.regressions],
        }
    return gate


def to_junit(report: Report, verdict: Verdict) -> str:
    """xunit2: one test case per rule; a finding at or above --fail-on is a failure, others are notes."""
    by_rule: Dict[str, List[Finding]] = {}
    for f in report.findings:
        by_rule.setdefault(f.rule_id, []).append(f)
    rule_ids = [r.id for r in report.rules.rules] if report.rules else list(by_rule)
    cases = []
    for rule_id in rule_ids + [r for r in by_rule if r not in rule_ids]:
        case = ET.Element("testcase", classname=f"gradscope.{_slug(report.model)}", name=rule_id, time="0")
        found = by_rule.get(rule_id, [])
        failing = [f for f in found if f in verdict.failing]
        if failing:
            failure = ET.SubElement(case, "failure", type=failing[0].severity, message=_line(failing[0]))
            failure.text = "\n".join(_line(f) for f in failing)
        notes = [f for f in found if f not in failing]
        if notes:
            ET.SubElement(case, "system-out").text = "\n".join(_line(f) for f in notes)
        cases.append(case)
    if verdict.comparison is not None:
        case = ET.Element("testcase", classname=f"gradscope.{_slug(report.model)}", name="baseline-regressions",
                          time="0")
        for r in verdict.comparison.regressions:
            ET.SubElement(case, "failure", type="regression",
                          message=f"{r.metric} {fmt(r.current)} > {r.tolerance:g}x baseline {fmt(r.baseline)}")
        cases.append(case)
    if verdict.unfinished is not None:  # the run itself failed: an error, not a passing suite
        case = ET.Element("testcase", classname=f"gradscope.{_slug(report.model)}", name="run", time="0")
        ET.SubElement(case, "error", type="unfinished", message=verdict.unfinished).text = (
            f"the run did not finish (exit code {verdict.exit_code}): {verdict.unfinished}")
        cases.append(case)
    failures = sum(1 for c in cases if c.find("failure") is not None)
    errors = sum(1 for c in cases if c.find("error") is not None)
    suites = ET.Element("testsuites", name="gradscope", tests=str(len(cases)), failures=str(failures),
                        errors=str(errors), skipped="0")
    suite = ET.SubElement(suites, "testsuite", name=f"gradscope: {report.model}", tests=str(len(cases)),
                          failures=str(failures), errors=str(errors), skipped="0", time="0")
    suite.extend(cases)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def to_sarif(report: Report, verdict: Verdict) -> str:
    """SARIF 2.1.0 for GitHub code scanning; ruleId is the rule id, the location the module's class."""
    rules = list(report.rules.rules) if report.rules else []
    index = {r.id: i for i, r in enumerate(rules)}
    results = []
    for f in report.findings:
        result = {
            "ruleId": f.rule_id,
            "level": SARIF_LEVEL[f.severity],
            "message": {"text": f.message},
            "partialFingerprints": {"gradscopeFinding/v1": f"{f.rule_id}:{f.layer or '<model>'}"},
            "locations": [_sarif_location(report, f)],
        }
        if f.rule_id in index:
            result["ruleIndex"] = index[f.rule_id]
        results.append(result)
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "gradscope", "version": __version__, "informationUri": TOOL_URI,
                "rules": [{
                    "id": r.id,
                    "shortDescription": {"text": r.description.split(". ")[0] or r.id},
                    "fullDescription": {"text": r.description or r.id},
                    "defaultConfiguration": {"level": SARIF_LEVEL[r.severity]},
                } for r in rules],
            }},
            "originalUriBaseIds": {"SRCROOT": {"uri": Path.cwd().as_uri() + "/"}},
            "invocations": [{
                "executionSuccessful": verdict.unfinished is None, "exitCode": verdict.exit_code,
                **({"toolExecutionNotifications": [{"level": "error", "message": {"text": verdict.unfinished}}]}
                   if verdict.unfinished is not None else {}),
            }],
            "results": results,
        }],
    }
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def to_github(report: Report, verdict: Verdict) -> str:
    """GitHub Actions workflow commands: one annotation per finding, escaped as GitHub specifies."""
    lines = []
    for f in report.findings:
        where = _source(report, f)
        props = [f"file={_gh_property(where[0])}", f"line={where[1]}"] if where else []
        props.append(f"title={_gh_property(f'gradscope {f.rule_id}' + (f' ({f.layer})' if f.layer else ''))}")
        lines.append(f"::{GITHUB_LEVEL[f.severity]} {','.join(props)}::{_gh_data(f.message)}")
    if verdict.comparison is not None:
        for r in verdict.comparison.regressions:
            lines.append(f"::error title=gradscope baseline regression::{_gh_data(_regression_text(r))}")
    if verdict.unfinished is not None:
        lines.append(f"::error title=gradscope run did not finish::{_gh_data(verdict.unfinished)}")
    rec = report.recommendation
    lines.append(f"::notice title=gradscope recommendation::{_gh_data(advice(rec) + ': ' + say(rec.evidence.basis))}")
    return "\n".join(lines) + "\n"


def to_gitlab(report: Report, verdict: Verdict) -> str:
    """GitLab Code Quality (the subset of the Code Climate spec a merge request's widget reads): one issue
    per finding, with a fingerprint stable across runs (rule and layer, as SARIF's), located at the
    layer's class where it is the user's code, else at the model's; and one per baseline regression
    and for a run that did not finish."""
    def issue(check: str, description: str, severity: str, key: str, where: Optional[Tuple[str, int]]) -> dict:
        path, line = where or (report.model, 1)  # no file of the user's: the model by name
        return {"description": description, "check_name": check,
                "fingerprint": hashlib.md5(f"gradscope:{key}".encode()).hexdigest(), "severity": severity,
                "location": {"path": path, "lines": {"begin": line}}}
    issues = [issue(f.rule_id, _line(f), GITLAB_SEVERITY[f.severity], f"{f.rule_id}:{f.layer or '<model>'}",
                    _source(report, f)) for f in report.findings]
    if verdict.comparison is not None:
        issues += [issue("baseline-regression", _regression_text(r), "critical", f"regression:{r.metric}", None)
                   for r in verdict.comparison.regressions]
    if verdict.unfinished is not None:
        issues.append(issue("run-did-not-finish", f"the run did not finish (exit code {verdict.exit_code}): "
                            f"{verdict.unfinished}", "critical", "unfinished", None))
    return json.dumps(issues, indent=2, allow_nan=False) + "\n"


def to_markdown(report: Report, verdict: Verdict) -> str:
    m = report.statistics.model
    state = "✔ healthy" if report.healthy else ("✖ unhealthy" if report.worst_severity == "error" else "▲ at risk")
    out = [f"## gradscope: {report.model} ({state})", "",
           f"{m.steps} steps on {m.device}; measured: {m.measurement}."
           + (f" The profile went on: {say(report.extended)}." if report.extended else "")
           + (f" **Learning rate:** {schedule_caveat(report.schedule)}." if schedule_caveat(report.schedule) else "")
           + (f" **Partial report:** {report.stopped_reason}." if report.partial else ""),
           f"Gate: fail on {verdict.fail_on}; exit code {verdict.exit_code}."
           + (f" **The run did not finish:** {_md_cell(verdict.unfinished)}." if verdict.unfinished else ""), ""]
    if report.findings:
        out += ["| severity | rule | layer | message |", "|---|---|---|---|"]
        out += [f"| {f.severity} | `{f.rule_id}` | {f.layer or '(model)'} | {_md_cell(f.message)} |"
                for f in report.findings]
        out.append("")
    else:
        out += ["No findings.", ""]
    if report.cause is not None:
        out += [f"**Likely cause:** {_md_cell(cause_line(report.cause))}.", ""]
    out += [f"- {_md_cell(line)}" for line in spike_lines(m.spikes)] + ([""] if m.spikes else [])
    c = verdict.comparison
    if c is not None:
        out.append(f"Baseline `{c.source}`: {len(c.new)} new or worse, {len(c.known)} known, {len(c.fixed)} fixed, "
                   f"{len(c.stale)} stale, {len(c.regressions)} regression{'' if len(c.regressions) == 1 else 's'}.")
        out += [f"- regression: {_regression_text(r)}" for r in c.regressions]
        out.append("")
    rec = report.recommendation
    out.append(f"**Recommendation:** {advice(report.recommendation)}. {say(rec.evidence.basis)}.")
    if rec.method != "none":
        where = "the winning trial's steps" if rec.evidence.trials is not None and rec.evidence.trials.winner \
            else "the profiled steps"
        out.append(f"It would have clipped {rec.evidence.clip_fraction:.0%} of {where}.")
    if rec.guard is not None:
        out.append(f"The skip-step guard ({', '.join(rec.guard.reasons)}): {say(rec.guard.basis)}.")
    if rec.snippets:
        out += ["", "```python"] + [f"# {name}\n{code}" if "\n" in code else f"{code}  # {name}" if name != "timm"
                                    else f"# timm: {code}" for name, code in rec.snippets.items()] + ["```"]
    return "\n".join(out) + "\n"


def to_rich_text(report: Report, verdict: Verdict) -> str:
    """The terminal report as plain text, gate included (a baseline's verdict, a run that did not finish)."""
    return render_text(report, width=100, gate=verdict)


def html_available() -> None:
    """Raise a GradscopeError, with the install command, when the HTML report cannot be drawn here."""
    from .html import matplotlib_parts  # the plotting code itself loads matplotlib only when it draws
    matplotlib_parts()


def to_html(report: Report, verdict: Verdict) -> str:
    """One self-contained HTML file with plots (needs the html extra: matplotlib)."""
    from .html import to_html as draw  # matplotlib and the plotting code load only when asked for
    return draw(report)


def findings_table(report: Report, verdict: Optional[Verdict] = None) -> str:
    """One line per finding, failing ones marked, then the advice: short enough for an assertion message."""
    failing = verdict.failing if verdict else report.findings
    head = (f"gradscope: {report.model}: {plural(len(failing), 'finding')} at or above "
            f"{verdict.fail_on if verdict else 'info'}")
    rows = [(("✖ " if f in failing else "  ") + f.severity, f.rule_id, f.layer or "(model)", f.message)
            for f in report.findings]
    widths = [max([len(r[i]) for r in rows] + [0]) for i in range(3)]
    lines = [head] + [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.append(f"  advice: {advice(report.recommendation)} ({say(report.recommendation.evidence.basis)})")
    return "\n".join(lines)


FORMATS: Dict[str, Callable[[Report, Verdict], str]] = {
    "rich": to_rich_text,
    "json": to_json,
    "junit": to_junit,
    "sarif": to_sarif,
    "github": to_github,
    "gitlab": to_gitlab,
    "markdown": to_markdown,
    "html": to_html,
}


# a file's format by its name
SUFFIXES = {".json": "json", ".xml": "junit", ".sarif": "sarif", ".md": "markdown", ".html": "html"}


def format_for(path: str) -> str:
    """The format a file name asks for: by its suffix, else the plain-text report."""
    return SUFFIXES.get(Path(path).suffix.lower(), "rich")


# -- small pieces ---------------------------------------------------------------------------------------
def _line(f: Finding) -> str:
    return f"[{f.severity}] {f.rule_id}" + (f" ({f.layer})" if f.layer else "") + f": {f.message}"


def _regression_text(r) -> str:
    return f"{r.metric} is {fmt(r.current)}, more than {r.tolerance:g}x the baseline's {fmt(r.baseline)}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text.split(" ")[0]) or "model"


def _source(report: Report, f: Finding) -> Optional[Tuple[str, int]]:
    """Where the finding's layer is defined, as a path relative to the repository root ($GITHUB_WORKSPACE,
    else the working directory): the layer's class if it is the user's own code, else the model's class
    (a torch.nn.Linear points at the model that holds it). None where neither lies under the root: code
    scanning drops an absolute path or one into site-packages."""
    layer = next((l for l in report.statistics.layers if l.name == f.layer), None)
    candidates = [s for s in (layer.source if layer else None, report.statistics.model.source) if s]
    root = Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd()).resolve()
    for path, line in candidates:
        resolved = Path(path).resolve()
        if {"site-packages", "dist-packages"} & set(resolved.parts):
            continue
        try:
            return resolved.relative_to(root).as_posix(), line
        except ValueError:
            continue
    return None


def _sarif_location(report: Report, f: Finding) -> Dict[str, object]:
    location: Dict[str, object] = {"logicalLocations": [{"fullyQualifiedName": f.layer or report.model,
                                                          "kind": "module"}]}
    where = _source(report, f)
    if where:
        path, line = where
        location["physicalLocation"] = {"artifactLocation": {"uri": path, "uriBaseId": "SRCROOT"},
                                        "region": {"startLine": line}}
    return location


def _gh_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
