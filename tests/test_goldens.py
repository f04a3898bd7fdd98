"""Every output format, rendered from stored runs (tests/stored/): golden files that a change in torch's
numerics cannot move, since no test here trains. ``pytest --overwrite`` rewrites them after a change to
gradscope's output; ``python tests/stored.py`` retrains the stored runs themselves."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

import gradscope
from gradscope.gate import decide
from gradscope.present.formats import FORMATS

import stored

RUNS = ("explosion", "healthy", "non_finite", "guard", "spike")
SUFFIX = {"rich": "txt", "json": "json", "junit": "junit.xml", "sarif": "sarif", "github": "github.txt",
          "gitlab": "gitlab.json", "markdown": "md", "html": "html.txt"}  # one file name per format


@pytest.fixture(autouse=True)
def _in_tests(monkeypatch):
    """Paths in SARIF and the annotations are relative to the working directory: run from tests/."""
    monkeypatch.chdir(stored.TESTS)
    monkeypatch.delenv("GITHUB_WORKSPACE", raising=False)


@pytest.fixture(scope="module", params=RUNS)
def run(request):
    return request.param, stored.load(request.param)


def _normalised(text: str) -> str:
    """What differs by machine or release, not by gradscope's output: the working directory and the version."""
    return text.replace(stored.TESTS.as_uri(), "file:///TESTS").replace(gradscope.__version__, "VERSION")


class _Structure(HTMLParser):
    """The HTML report's structure: its tags, their classes and ids, and its text; what lies inside an svg,
    a style or a script left out (matplotlib's drawing depends on matplotlib's version)."""

    OPAQUE = ("svg", "style", "script")

    def __init__(self) -> None:
        super().__init__()
        self.lines, self._inside = [], 0

    def handle_starttag(self, tag, attrs):
        if not self._inside:
            kept = " ".join(f'{k}="{v}"' for k, v in attrs if k in ("class", "id", "href") and v)
            self.lines.append(f"<{tag}{' ' + kept if kept else ''}>")
        self._inside += tag in self.OPAQUE

    def handle_endtag(self, tag):
        self._inside -= tag in self.OPAQUE and self._inside > 0

    def handle_data(self, data):
        if not self._inside and data.strip():
            self.lines.append("  " + " ".join(data.split()))


def _rendered(report, fmt: str) -> str:
    if fmt == "rich":
        return report.render(width=100)
    out = FORMATS[fmt](report, decide(report, "error"))
    if fmt == "html":
        parser = _Structure()
        parser.feed(out)
        return "\n".join(parser.lines) + "\n"
    return out


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_every_format_of_every_stored_run_matches_its_golden(run, fmt, golden):
    if fmt == "html":
        pytest.importorskip("matplotlib")
    name, report = run
    golden(f"stored/{name}.{SUFFIX[fmt]}", _normalised(_rendered(report, fmt)))


def test_the_stored_runs_are_the_kinds_of_run_they_stand_for():
    explosion, healthy, non_finite, guard, spike = (stored.load(n) for n in RUNS)
    assert not explosion.healthy and explosion.recommendation.evidence.trials is not None
    assert healthy.healthy and healthy.recommendation.method == "none"
    assert non_finite.statistics.model.first_nonfinite is not None or non_finite.stopped_reason
    assert guard.recommendation.evidence.trials is not None and guard.recommendation.guard.armed
    assert spike.statistics.model.spikes[0].samples[0].index == 5 and spike.cause.kind == "data"


def test_a_stored_run_builds_the_report_its_run_gave(tmp_path, monkeypatch):
    """Train, store, load: the same report, figure for figure (one process, so the same kernels)."""
    from models import healthy_mlp
    monkeypatch.setattr(stored, "STORED", tmp_path)
    report, profile, adaptive = stored._record(lambda: healthy_mlp(lr=1.0), 30, trials=True)
    stored.save("again", report, profile, adaptive)
    again = stored.load("again")
    assert again.render(width=100) == report.render(width=100)
    assert json.loads(again.to_json()) == json.loads(report.to_json())


def test_the_golden_files_hold_no_path_of_the_machine_that_wrote_them():
    for path in (stored.TESTS / "golden" / "stored").iterdir():
        text = path.read_text()
        assert not re.search(r"/(work|home|root|tmp|Users)/", text), path.name
