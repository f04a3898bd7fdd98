"""The HTML report, read back with a real HTML parser: its plots are there, self-contained, and the
threshold line sits where the JSON says."""
from __future__ import annotations

import dataclasses
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import gradscope
from gradscope.cli import main

import stored
from models import healthy_mlp
from test_cli import GOOD, target

pytest.importorskip("matplotlib")


class Document(HTMLParser):
    """Every element with its attributes and the ids of the SVG groups it sits in; the page's text."""

    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements, self.stack, self.text = [], [], []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs, tuple(a.get("id") for _, a in self.stack)))
        if tag not in self.VOID and not tag.endswith("/"):
            self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), tuple(a.get("id") for _, a in self.stack)))

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        self.text.append(data)

    def inside(self, group_id: str):
        return [(tag, attrs) for tag, attrs, groups in self.elements if group_id in groups]

    def points(self, group_id: str, markers: bool = False):
        """The (x, y) vertices of the line in a group, or with ``markers`` the positions of its markers."""
        out = []
        for tag, attrs in self.inside(group_id):
            if not markers and tag == "path" and "d" in attrs and "clip-path" in attrs:
                nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", attrs["d"])]
                out += list(zip(nums[0::2], nums[1::2]))
            if markers and tag == "use" and "x" in attrs:
                out.append((float(attrs["x"]), float(attrs["y"])))
        return out


@pytest.fixture(scope="module")
def exploding():
    """The exploding RNN's 12 steps, stored: what the formats say of it depends on gradscope alone."""
    return stored.load("explosion")


@pytest.fixture(scope="module")
def page(exploding):
    return Document(exploding._repr_html_())


def test_the_page_has_every_plot_and_the_advice(page, exploding):
    ids = {attrs.get("id") for _, attrs, _ in page.elements}
    assert {"global-norm", "threshold", "clipped", "heatmap", "histogram-0", "trial-0"} <= ids
    assert sum(tag == "svg" for tag, _, _ in page.elements) == 4  # norm, heatmap, histograms, trials
    text = " ".join(page.text)
    assert "clip by norm at" in text and "torch.nn.utils.clip_grad_norm_" in text
    assert "large-update-ratio in 2 layers: rnn, head" in re.sub(r"\s+", " ", text)
    assert "winner" in text


def test_the_page_needs_no_network(exploding):
    text = exploding._repr_html_()
    for tag, attrs, _ in Document(text).elements:
        for key in ("src", "href", "xlink:href"):
            value = attrs.get(key) or ""
            assert not re.match(r"(https?:)?//", value), f"<{tag} {key}={value}> reaches the network"
    assert "<script" not in text and "@import" not in text


@pytest.mark.parametrize("where", ["advised", "median"])
def test_the_threshold_line_sits_where_the_json_says(exploding, where):
    report = exploding
    if where == "median":  # a threshold inside the cloud of points, so the line must split it right
        median = float(np.median(exploding.statistics.model.global_norm))
        report = dataclasses.replace(exploding, recommendation=dataclasses.replace(
            exploding.recommendation, threshold=median))
    page = Document(report._repr_html_())
    doc = json.loads(report.to_json())
    threshold = doc["recommendation"]["threshold"]
    norms = np.array([np.inf if v is None else v for v in doc["global"]["norm"]], dtype=float)
    over = int(np.sum(np.isfinite(norms) & (norms > threshold)))
    assert over > 0 and (where == "advised" or over < len(norms))
    (x0, y_line), (x1, y_line_end) = page.points("threshold")
    assert y_line == pytest.approx(y_line_end)
    curve = page.points("global-norm")
    assert len(curve) == int(np.sum(np.isfinite(norms)))
    above = sum(y < y_line for _, y in curve)  # SVG y grows downwards: above the line is a smaller y
    assert above == over
    marked = page.points("clipped", markers=True)
    assert len(marked) == over  # and the circled points are exactly the ones above the line
    expected = np.array(sorted(p for p in curve if p[1] < y_line))
    assert np.allclose(np.array(sorted(marked)), expected, atol=0.01)


def test_a_healthy_model_shows_the_safety_net_and_no_trials():
    report = gradscope.diagnose(healthy_mlp(), steps=8, seed=0)
    page = Document(report._repr_html_())
    ids = {attrs.get("id") for _, attrs, _ in page.elements}
    assert "threshold" in ids and "clipped" not in ids and "trial-0" not in ids
    assert "safety net" in " ".join(page.text)


def test_cli_writes_html_beside_any_format_and_as_a_format(tmp_path, capsys):
    page = tmp_path / "report.html"
    code = main(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--format", "json", "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["steps"] == 5
    assert Document(page.read_text(encoding="utf-8")).inside("global-norm")
    code = main(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--format", "html"])
    assert code == 0 and capsys.readouterr().out.startswith("<!DOCTYPE html>")


def test_html_without_matplotlib_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = main(["diagnose", target(tmp_path, GOOD), "--steps", "5", "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "matplotlib" in err and "gradscope[html]" in err
    assert not (tmp_path / "r.html").exists()
