"""The report: JSON keys and determinism, and the rendered text (golden, 80 columns, no colour)."""
from __future__ import annotations

import io
import json
import re

import pytest
from rich.console import Console

import gradscope
from gradscope.metrics import LAYER_METRICS, MODEL_METRICS
from gradscope.render import render, render_text

from models import exploding_rnn, healthy_mlp

STEPS = 12


@pytest.fixture(scope="module")
def exploding():
    return gradscope.diagnose(exploding_rnn(), steps=STEPS, seed=0)


def test_json_has_the_documented_keys(exploding):
    doc = json.loads(exploding.to_json())
    assert doc["schema_version"] == 1 and list(doc)[0] == "schema_version"
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


def test_json_is_strict_json_with_nulls_for_missing_values(exploding):
    text = exploding.to_json()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


def test_same_seed_gives_byte_identical_json():
    first = gradscope.diagnose(healthy_mlp(), steps=8, seed=3).to_json()
    second = gradscope.diagnose(healthy_mlp(), steps=8, seed=3).to_json()
    assert first == second


def test_rendered_report_golden(exploding, golden):
    golden("exploding_rnn_12_steps.txt", render_text(exploding, width=100))


def test_rendered_healthy_report_golden(golden):
    golden("healthy_mlp_8_steps.txt", render_text(gradscope.diagnose(healthy_mlp(), steps=8, seed=0), width=100))


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
