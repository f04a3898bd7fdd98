"""The package as users install it: the built wheel carries every module, the rules and a working CLI."""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gradscope
from gradscope.cli import main

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = Path(gradscope.__file__).resolve().parent


@pytest.fixture
def wheel():
    """Skip where gradscope comes from the checkout (an editable install); fail so under CI, which tests the wheel."""
    if INSTALLED == ROOT / "gradscope":
        if os.environ.get("GRADSCOPE_REQUIRE_WHEEL"):
            pytest.fail(f"gradscope was imported from the checkout ({INSTALLED}), not from the installed wheel")
        pytest.skip("gradscope is imported from the checkout; CI installs the built wheel and runs these")
    return INSTALLED


def test_the_installed_package_has_every_module_and_the_default_rules(wheel):
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "gradscope").rglob("*.py")
               if "__pycache__" not in p.parts and not (wheel / p.relative_to(ROOT / "gradscope")).is_file()]
    assert not missing, f"the installed package lacks {missing}"
    assert (wheel / "rules" / "default.yaml").read_text() == (ROOT / "rules" / "default.yaml").read_text()
    assert gradscope.load_rules().rules  # loaded from the installed package


@pytest.mark.parametrize("module", ["lightning", "transformers", "tensorboard"])
def test_every_integration_imports_from_the_installed_package(wheel, module):
    imported = importlib.import_module(f"gradscope.integrations.{module}")
    assert Path(imported.__file__).resolve().parent == wheel / "integrations"


def test_the_console_script_runs_the_bundled_sample(wheel, tmp_path):
    script = Path(sys.executable).parent / "gradscope"
    result = subprocess.run([str(script), "diagnose", str(ROOT / "samples" / "exploding_rnn.py"), "--trials", "off",
                             "--format", "json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["recommendation"]["method"] == "norm"


def test_the_version_is_the_package_metadata(capsys):
    assert gradscope.__version__ == importlib.metadata.version("gradscope")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"gradscope {gradscope.__version__}"


PACKAGE = Path(__file__).resolve().parents[1] / "gradscope"
PURE_FOLDERS = ("analyse", "advise", "present")  # a folder rule: nothing under these imports torch or runs training
DISPLAY = [f"gradscope.{folder}.{path.stem}" for folder in PURE_FOLDERS
           for path in sorted((PACKAGE / folder).glob("*.py")) if path.stem != "__init__"]
DISPLAY += ["gradscope.report", "gradscope.pipeline", "gradscope.integrations.common"]


@pytest.mark.parametrize("module", [*DISPLAY, "gradscope.collect.ledger", "gradscope.collect.clipping",
                                    "gradscope.collect.history"])
def test_the_display_layer_stands_alone(module):
    """Every module under analyse/, advise/ and present/, and the Profile -> Report pipeline, imports no torch
    and nothing that trains; nor do the Monitor's host-side ledger, history and clipping tally."""
    code = (f"import sys, {module}; "
            "bad = {'torch', 'gradscope.run.diagnose', 'gradscope.collect.monitor', 'gradscope.run.trials', "
            "'gradscope.run.experiment', 'matplotlib'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def _user_facing_strings(path: Path):
    """The string literals of a module that can reach a user: all but docstrings."""
    import ast
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_library_string_names_a_command_line_flag():
    """The library says what to do in Python's terms and names a fix as data (``GradscopeError.remedy``);
    the CLI alone words it with its flags (``cli.REMEDIES``, ``cli.SHOW_ALL``)."""
    from gradscope.cli import build_parser
    flags = {option for action in build_parser()._subparsers._group_actions[0].choices["diagnose"]._actions
             for option in action.option_strings if option.startswith("--")}
    assert {"--write-baseline", "--all-layers", "--trials", "--format"} <= flags
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for line, text in _user_facing_strings(path):
            found += [f"{path.relative_to(PACKAGE)}:{line}: {flag}" for flag in flags
                      if re.search(re.escape(flag) + r"(?![\w-])", text)]
    assert not found, found


def test_the_monitor_loads_no_analysis_until_a_report_is_asked_for():
    """``import gradscope.collect.monitor`` (what a training loop pays) loads neither the rules (yaml) nor
    the statistics (scipy); ``report()`` loads them."""
    code = ("import sys, gradscope.collect.monitor; "
            "bad = {'yaml', 'scipy', 'gradscope.pipeline', 'gradscope.analyse.stats'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_a_report_of_a_run_loads_no_scipy_stats():
    """scipy.stats takes most of a second to import; report() reads its trends and kurtosis with numpy,
    and loads it only for a series with tied values."""
    code = ("import sys, torch; from torch import nn; from gradscope import Monitor\n"
            "torch.manual_seed(0); m = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)); mon = Monitor(m)\n"
            "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "for _ in range(40):\n"
            "    opt.zero_grad(); loss = m(torch.randn(16, 8)).pow(2).mean(); loss.backward(); mon.observe(loss); opt.step()\n"
            "mon.report(); assert 'scipy.stats' not in sys.modules, 'scipy.stats was loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
