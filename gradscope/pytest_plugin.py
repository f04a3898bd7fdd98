"""pytest plugin (entry point ``pytest11``): the ``gradscope_report`` fixture.

Registered on install; it imports nothing heavy until a test uses the fixture.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def gradscope_report(request):
    """A function ``(experiment_or_target, steps=30, rules=None, seed=0) -> Report``.

    Each report it makes is attached to the test, so a failing test shows the full gradscope report.
    """
    from gradscope.testing import report_text, run_diagnosis

    def make(experiment_or_target, steps=None, rules=None, seed=0):
        from gradscope.run.diagnose import DEFAULT_STEPS

        report = run_diagnosis(experiment_or_target, steps=steps or DEFAULT_STEPS, rules=rules, seed=seed)
        request.node.add_report_section("call", f"gradscope {report.model}", report_text(report))
        return report
    return make
