"""Shared fixtures: the golden-file comparison and single-threaded, seeded torch; the Hypothesis profiles."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The property-based suites (rules, baselines, [tool.gradscope], TARGET strings, Clipper.from_json) set
# their own example counts. "ci" (chosen when $CI is set, as .ci/run sets it) derandomizes them: the same
# examples every run, so CI fails only on a change to the code. "dev" draws new examples each run, to go
# on finding cases; a case it finds is kept with @example. $HYPOTHESIS_PROFILE picks one by name.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

GOLDEN = Path(__file__).parent / "golden"
# A subprocess that has not finished in this long is hung: no test's work takes a tenth of it, even on a loaded
# 2-core machine. Tests that run one wait this long, so none fails on a slow machine, and a hang still ends.
HANG_S = 1800


def pytest_addoption(parser):
    parser.addoption("--overwrite", action="store_true", help="rewrite the golden files from the current output")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-stable reductions, so golden output does not depend on the core count
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def golden(request):
    """Compare text with tests/golden/<name>; ``pytest --overwrite`` rewrites the file instead."""
    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if request.config.getoption("--overwrite") or not path.exists():
            path.write_text(text, encoding="utf-8")
            if not request.config.getoption("--overwrite"):
                pytest.fail(f"golden file {path.name} was missing and has been written; run again")
            return
        assert text == path.read_text(encoding="utf-8"), f"output differs from {path}; pytest --overwrite updates it"
    return check
