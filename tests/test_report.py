"""The report: JSON keys and determinism, and the rendered text (golden, 80 columns, no colour)."""
from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

import gradscope
from gradscope.analyse.metrics import LAYER_METRICS, MODEL_METRICS
from gradscope.present.render import render, render_text
from gradscope.report import SCHEMA_VERSION
from gradscope.present.wording import shorten_names

import stored
from models import exploding_rnn, healthy_mlp

STEPS = 12


@pytest.fixture(scope="module")
def exploding():
    """The exploding RNN's 12 steps, stored (tests/stored.py): its figures do not depend on this CPU's kernels."""
    return stored.load("explosion")


def test_the_exploding_rnn_is_found_exploding_on_any_kernel():
    """The training run behind the stored one, asserting what holds on any float kernel."""
    report = gradscope.diagnose(exploding_rnn(), steps=STEPS, seed=0, trials=0)
    assert not report.healthy and report.recommendation.method == "norm"
    assert {"global-norm-growing", "loss-diverging"} & {f.rule_id for f in report.findings if f.severity == "error"}


def test_json_has_the_documented_keys(exploding):
    doc = json.loads(exploding.to_json())
    assert doc["schema_version"] == SCHEMA_VERSION == 2 and list(doc)[0] == "schema_version"
    for key in ("healthy", "steps", "measurement", "global", "layers", "findings", "recommendation"):
        assert key in doc
    assert doc["healthy"] is False and doc["steps"] == STEPS
    assert len(doc["global"]["norm"]) == STEPS and "global_norm_median" in doc["global"]["summary"]
    layer = doc["layers"][0]
    assert {"name", "kind", "params", "stats"} <= set(layer)
    assert set(layer["stats"]) == set(LAYER_METRICS)
    assert set(doc["global"]["summary"]) == set(MODEL_METRICS)
    finding = doc["findings"][0]
    assert {"rule_id", "severity", "layer", "message", "observed"} <= set(finding)
    assert finding["severity"] in ("error", "warning", "info")
    rec = doc["recommendation"]
    assert rec["method"] in ("norm", "value", "agc", "none")
    assert {"clip_fraction", "cosine", "basis"} <= set(rec["evidence"])
    trials = rec["trials"]  # schema 2: the steps are named by what they count
    assert {"first_steps", "adaptive", "longest_steps", "steps_spent", "stopped"} <= set(trials)
    assert "trial_steps" not in trials and "steps" not in trials
    assert all({"horizon", "checkpoints"} <= set(run) for run in trials["runs"])


def test_json_is_strict_json_with_nulls_for_missing_values(exploding):
    text = exploding.to_json()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_same_seed_gives_byte_identical_json():
    first = gradscope.diagnose(healthy_mlp(), steps=8, seed=3).to_json()
    second = gradscope.diagnose(healthy_mlp(), steps=8, seed=3).to_json()
    assert first == second


def test_report_fits_80_columns_and_keeps_its_parts(exploding):
    text = render_text(exploding, width=80)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for part in ("measured:", "global norm", "layers, worst first", "findings", "recommendation:",
                 "UNHEALTHY"):
        assert part in text
    assert re.search(r"global norm\s+[▁▂▃▄▅▆▇█]+", text)
    table = text[text.index("layers, worst first"):text.index("findings")]
    assert "…" not in table.split("─")[-1], "a number in the layer table was cut"


def test_no_colour_codes_without_a_terminal_or_with_no_color(exploding, monkeypatch):
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(render(exploding))
    assert "\x1b[" not in buffer.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    buffer = io.StringIO()
    Console(file=buffer, width=100, force_terminal=True).print(render(exploding))
    assert "\x1b[31" not in buffer.getvalue() and "\x1b[1;31" not in buffer.getvalue()


def test_worst_layers_come_first(exploding):
    text = render_text(exploding, width=100)
    table = text[text.index("layers, worst first"):text.index("findings")]
    assert table.index("rnn") < table.index("head")


# -- long models: a ResNet's 31 layers and a BERT's dotted names --------------------------------------
@pytest.fixture(scope="module")
def resnet():
    return stored.load("resnet")


@pytest.fixture(scope="module")
def bert():
    return stored.load("bert")


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("model", ["resnet", "bert"])
def test_long_model_goldens_fit_their_width(model, width, request, golden):
    report = request.getfixturevalue(model)
    text = report.render(width=width)
    golden(f"stored/{model}.{width}.txt", text)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width and all(line == line.rstrip() for line in lines)
    if width == 80:  # the skip-step guard (Adam's family) adds its finding, its row and its snippets' lines
        assert len(lines) <= 50 + 6 * (report.recommendation.guard is not None), f"{len(lines)} lines at 80 columns"
    header = next(line for line in lines if re.match(r"layer( |$)", line))
    assert header.split()[-7:] == ["params", "norm", "p50", "max", "g/w", "upd/w", "norm/step"], "a header was cut"
    table = text[text.index("layers, worst first"):text.index("findings")]
    rows = [line for line in table.split("─")[-1].splitlines() if line and not line.lstrip().startswith("…")]
    names = [row.split()[0] for row in rows]
    assert len(set(names)) == len(names), "two layers read the same"
    assert all(not name.endswith("…") for name in names), "a name was cut at its end instead of its middle"
    assert all(re.search(r"[▁▂▃▄▅▆▇█]{8}$", row) for row in rows), "a sparkline was cut"


def test_findings_are_grouped_by_rule_with_the_worst_layers_named(resnet):
    text = resnet.render(width=100)
    count = sum(f.rule_id == "large-update-ratio" for f in resnet.findings)
    assert count > 10
    table = text[text.index("layers, worst first"):text.index("findings")]
    first_three = [line.split()[0] for line in table.split("─")[-1].splitlines() if line.strip()][:3]
    line = next(line for line in text.splitlines() if "large-update-ratio" in line)
    assert f"large-update-ratio in {count} layers: {', '.join(first_three)}, … ({count - 3} more)" in line
    assert text.count("large-update-ratio") == 1


def test_the_layer_table_is_capped_and_all_layers_lifts_the_cap(resnet):
    layers = len(resnet.statistics.layers)
    assert f"… and {layers - 12} more layers (all_layers=True shows every one)" in resnet.render()
    every = resnet.render(all_layers=True)
    assert "more layers" not in every
    assert all(layer.name in every for layer in resnet.statistics.layers)


def test_print_and_rich_show_the_report(exploding, capsys):
    print(exploding)
    assert capsys.readouterr().out == exploding.render(width=100) + "\n"
    buffer = io.StringIO()
    Console(file=buffer, width=90, color_system=None).print(exploding)
    assert [line.rstrip() for line in buffer.getvalue().splitlines()] == exploding.render(width=90).splitlines()


@pytest.mark.parametrize("width", [8, 14, 22, 30])
def test_shortened_names_stay_unique_and_within_width(width):
    names = [f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1, 10) for k in ("query", "key", "value")]
    names += ["classifier", "bert.embeddings.word_embeddings"]
    short = shorten_names(names, width)
    assert len(set(short.values())) == len(names)
    assert all(len(s) <= max(width, 5) or s == n for n, s in short.items())
    for name in names:  # a name that fits stays whole
        if len(name) <= width:
            assert short[name] == name


def test_a_shortened_name_keeps_its_start_and_its_end():
    short = shorten_names(["bert.encoder.layer.0.attention.self.query", "bert.pooler.dense"], 36)
    cut = short["bert.encoder.layer.0.attention.self.query"]
    head, tail = cut.split("…")
    assert len(cut) == 36 and head.startswith("bert.enc") and tail.endswith(".0.attention.self.query")
    assert len(tail) > 2 * len(head)  # the end tells siblings apart, so it keeps the most
    assert short["bert.pooler.dense"] == "bert.pooler.dense"


def test_the_json_says_which_warnings_made_a_run_unhealthy():
    """A run with warnings and no error exits 0 under --fail-on error, yet is not healthy: the JSON names why."""
    guard = json.loads(stored.load("guard").to_json())
    assert guard["healthy"] is False and guard["unhealthy_because"] == ["large-update-ratio"]
    explosion = json.loads(stored.load("explosion").to_json())
    severities = {f["rule_id"]: f["severity"] for f in explosion["findings"]}
    ranks = [("info", "warning", "error").index(severities[r]) for r in explosion["unhealthy_because"]]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] == 2  # errors first
    assert json.loads(stored.load("healthy").to_json())["unhealthy_because"] == []
