"""The rule loader: strict validation with file, line and rule id; overrides; hostile YAML refused."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradscope.errors import GradscopeError, RuleError
from gradscope.analyse.ruleset import Compare, RuleSet, load_rules, parse_rules_text

GOOD = """
version: 1
rules:
  - id: big-norm
    severity: warning
    scope: model
    params: {limit: 10}
    when: {metric: global_norm_max, op: ">", value: limit}
    message: "norm {global_norm_max:.2f}"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return path


def test_default_rules_load_and_cover_the_required_pathologies():
    ids = {r.id for r in load_rules().rules}
    for required in ("nonfinite-gradients", "global-norm-growing", "gradient-spike", "layer-dominates",
                     "heavy-tailed-gradients", "vanishing-layer", "dead-layer", "large-update-ratio",
                     "recurrent-norm-growing", "recurrent-norm-high"):
        assert required in ids


def test_user_file_extends_defaults(tmp_path):
    rules = load_rules(write(tmp_path, GOOD))
    assert rules.get("big-norm").when == Compare("global_norm_max", ">", 10.0)
    assert rules.get("nonfinite-gradients") is not None
    assert rules.sources[-1].endswith("rules.yaml")


def test_user_file_disables_changes_severity_and_params(tmp_path):
    text = """
rules:
  - id: gradient-spike
    enabled: false
  - id: dead-layer
    severity: error
  - id: global-norm-growing
    params: {over_run: 1.0e3}
"""
    rules = load_rules(write(tmp_path, text))
    assert rules.get("gradient-spike") is None
    assert rules.get("dead-layer").severity == "error"
    growing = rules.get("global-norm-growing")
    assert growing.params["over_run"] == 1000.0 and growing.params["growth_low"] == 1.0
    assert Compare("global_norm_growth_over_run", ">", 1000.0) in growing.when.items


@pytest.mark.parametrize("text, expected", [
    ("rules:\n  - id: x\n    severity: fatal\n    scope: model\n    when: {metric: steps, op: '>', value: 1}\n"
     "    message: m\n", r"rules\.yaml:2: rule x: unknown severity 'fatal'"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: nope, op: '>', value: 1}\n"
     "    message: m\n", r"rules\.yaml:2: rule x: unknown metric 'nope'"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '=~', value: 1}\n"
     "    message: m\n", r"rule x: unknown operator '=~'"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    colour: red\n"
     "    when: {metric: steps, op: '>', value: 1}\n    message: m\n", r"rule x: unknown key\(s\) \['colour'\]"),
    ("rules:\n  - id: x\n    severity: error\n    scope: layer\n    when: {metric: steps, op: '>', value: 1}\n"
     "    message: m\n", r"rule x: unknown metric 'steps' for a layer rule"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: lim}\n"
     "    message: m\n", r"rule x: value 'lim' is neither a number nor an entry of params"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: 1}\n"
     "    message: 'at {layer}'\n", r"rule x: message names unknown field \{layer\}"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: 1}\n"
     "    message: '{steps:zz}'\n", r"rule x: bad format 'zz'"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {all: []}\n    message: m\n",
     r"rule x: 'all' takes a non-empty list"),
    ("rules:\n  - id: brand-new\n    severity: error\n", r"rule brand-new: missing scope, when, message"),
    ("rules:\n  - id: x\n    severity: error\n  bad indent: [\n", r"rules\.yaml:\d+: not valid rule YAML"),
    ("rules: 3\n", r"'rules' must be a list"),
    ("version: 2\nrules: []\n", r"unsupported version 2"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: 1"
     + "0" * 400 + "}\n    message: m\n", r"rule x: value 10000.*… is not a finite number a float can hold"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: 1e999}\n"
     "    message: m\n", r"rule x: value '1e999' is not a finite number"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: 1}\n"
     "    message: '{steps:>999999999}'\n", r"rule x: format '>999999999' in \{steps:>999999999\} asks for over 40"),
    ("rules:\n  - id: x\n    severity: error\n    scope: model\n    when: {metric: steps, op: '>', value: 1}\n"
     "    message: '{steps:.99999999f}'\n", r"rule x: format '\.99999999f'"),
    ("rules: " + "[" * 5000 + "]" * 5000 + "\n", r"rules\.yaml: rule file is nested too deeply"),
])
def test_malformed_rule_files_name_file_line_and_rule(tmp_path, text, expected):
    with pytest.raises(RuleError, match=expected):
        load_rules(write(tmp_path, text))


def test_the_documented_rule_example_loads_and_its_message_names_a_param(tmp_path):
    import re

    import gradscope
    from models import exploding_rnn
    page = (Path(__file__).resolve().parents[1] / "docs" / "rules.md").read_text(encoding="utf-8")
    example = re.search(r"A rule file looks like:\n\n```yaml\n(.*?)```", page, re.S).group(1)
    report = gradscope.diagnose(exploding_rnn(), steps=12, seed=0, rules=str(write(tmp_path, example)), trials=0)
    finding = next(f for f in report.findings if f.rule_id == "big-global-norm")
    assert re.fullmatch(r"global norm reached \S+ \(limit 100\)", finding.message), finding.message


def test_python_tags_are_refused(tmp_path):
    text = "rules:\n  - !!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(RuleError, match=r"rules\.yaml:2: not valid rule YAML.*") as info:
        load_rules(write(tmp_path, text))
    assert "!!python/object" in info.value.hint


def test_billion_laughs_is_refused(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("rules: [*a8]")
    with pytest.raises(RuleError, match="too large or too deeply nested"):
        load_rules(write(tmp_path, "\n".join(lines) + "\n"))


def test_missing_rule_file_is_a_clear_error(tmp_path):
    with pytest.raises(RuleError, match="rule file not found"):
        load_rules(tmp_path / "absent.yaml")


def test_yaml_exponent_without_sign_is_a_number():
    rules = parse_rules_text(GOOD.replace("limit: 10", "limit: 1.0e3"))
    assert rules.get("big-norm").when.value == 1000.0


TEXT = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "severity", "scope", "when", "message", "metric", "op", "value", "all", "any",
                         "not", "params", "match", "kind", "name", "rules", "version", "enabled", "remedy"]) |
        st.text(max_size=6), children, max_size=5),
    max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=TEXT)
def test_fuzzed_documents_give_a_rule_set_or_a_gradscope_error(document):
    import yaml
    text = yaml.safe_dump({"rules": [document]} if not isinstance(document, dict) else document)
    try:
        assert isinstance(parse_rules_text(text, "fuzz.yaml"), RuleSet)
    except GradscopeError:
        pass


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_raw_text_gives_a_rule_set_or_a_gradscope_error(text):
    try:
        assert isinstance(parse_rules_text(text, "fuzz.yaml"), RuleSet)
    except GradscopeError:
        pass


def test_a_missing_multiple_reads_n_a_not_n_ax():
    from gradscope.analyse.evaluate import render_message
    template = "peak {ratio:.3g}x its median, {count} steps"
    assert render_message(template, {"ratio": float("nan"), "count": 3}) == "peak n/a its median, 3 steps"
    assert render_message(template, {"ratio": 12.5, "count": 3}) == "peak 12.5x its median, 3 steps"
    assert render_message("{ratio}x", {"ratio": float("inf")}) == "infx"
