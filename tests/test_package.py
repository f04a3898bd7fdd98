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
from conftest import HANG_S

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


@pytest.mark.parametrize("module", ["lightning", "transformers", "accelerate", "tensorboard"])
def test_every_integration_imports_from_the_installed_package(wheel, module):
    imported = importlib.import_module(f"gradscope.integrations.{module}")
    assert Path(imported.__file__).resolve().parent == wheel / "integrations"


def test_the_console_script_runs_the_bundled_sample(wheel, tmp_path):
    script = Path(sys.executable).parent / "gradscope"
    result = subprocess.run([str(script), "diagnose", str(ROOT / "samples" / "exploding_rnn.py"), "--trials", "off",
                             "--format", "json"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
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
                                    "gradscope.collect.history", "gradscope.collect.cadence"])
def test_the_display_layer_stands_alone(module):
    """Every module under analyse/, advise/ and present/, and the Profile -> Report pipeline, imports no torch
    and nothing that trains; nor do the Monitor's host-side ledger, history, clipping tally and cadence."""
    code = (f"import sys, {module}; "
            "bad = {'torch', 'gradscope.run.diagnose', 'gradscope.collect.observer', 'gradscope.monitor', 'gradscope.run.trials', "
            "'gradscope.run.experiment', 'matplotlib'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def _import_graph(anywhere: bool = False):
    """Each gradscope module's imports of other gradscope modules: at load time (module level), or with
    ``anywhere`` also those inside functions and methods, which load lazily when called. Imports under
    ``if TYPE_CHECKING`` are never edges: they do not run."""
    import ast
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def statements(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield node
            if anywhere:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from statements(getattr(node, field, []) or [])
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in statements(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                edges[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    if target in modules:
                        edges[name].add(target)
    return edges


def test_the_imports_form_no_cycle():
    """No module imports, at load time, one that imports it back (imports inside functions load when
    called, after every module has loaded)."""
    edges = _import_graph()
    state: dict = {}
    cycles = []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


# The flow, stage by stage: each may import only the stages before it. A stage is a folder, or one of the
# top-level modules that sit inside the flow (the Report between advise/ and present/, and the errors every
# stage raises). collect/ fills a Profile (analyse/'s plain data) and writes nothing; analyse/, advise/ and
# present/ never import the training side; run/ drives collect/ and reads the advice. The other top-level
# modules are the edge (cli, monitor, recorder, outputs, pipeline, gate, baseline, ...): they assemble the
# stages and are bound only by the no-cycle test.
FLOW_IMPORTS = {
    "errors": set(),
    "analyse": {"errors"},
    "advise": {"analyse", "errors"},
    "collect": {"analyse", "errors"},
    "report": {"analyse", "advise", "errors"},
    "present": {"analyse", "advise", "report", "errors", "gradscope", "gradscope.gate", "gradscope.baseline"},
    "run": {"analyse", "advise", "collect", "report", "errors", "gradscope.interrupts", "gradscope.pipeline",
            "gradscope.monitor", "gradscope.recorder"},
    # the live log: the Monitor's steps (collect) and the report's rules (the pipeline's assess), to a sink
    "live": {"analyse", "advise", "collect", "report", "errors", "gradscope.pipeline"},
    "integrations": {"analyse", "advise", "collect", "run", "present", "report", "errors", "gradscope.gate",
                     "gradscope.outputs", "gradscope.monitor", "gradscope.recorder", "live", "gradscope.live"},
}
# The imports that run against the flow, each inside a function (so it loads only when called), with why.
AGAINST_THE_FLOW = {
    # A Report prints itself: its display hooks (render, __str__, _repr_html_, __rich__) import present/.
    ("gradscope.report", "present"),
}


def _stage(module: str) -> str:
    """The stage a module belongs to: its folder, "report" or "errors" for those two top-level modules, or
    the module's own name for the rest of the top level."""
    parts = module.split(".")
    if len(parts) > 2:
        return parts[1]
    return {"gradscope.report": "report", "gradscope.errors": "errors"}.get(module, module)


def test_no_import_runs_back_up_the_flow_at_any_level():
    """Imports at load time and inside functions alike: each stage imports only the stages before it, but
    for the commented exceptions in AGAINST_THE_FLOW (and those must still be needed)."""
    loaded = _import_graph()
    found, used = [], set()
    for name, targets in _import_graph(anywhere=True).items():
        stage = _stage(name)
        if stage not in FLOW_IMPORTS:
            continue
        for target in targets:
            if _stage(target) in FLOW_IMPORTS[stage] | {stage}:
                continue
            if (name, _stage(target)) in AGAINST_THE_FLOW and target not in loaded[name]:
                used.add((name, _stage(target)))
            else:
                found.append(f"{name} -> {target}")
    assert not found, found
    assert used == AGAINST_THE_FLOW, AGAINST_THE_FLOW - used


def test_nothing_under_collect_reaches_the_report_side():
    """The hot path hands data on and writes nothing: no module under collect/, at any level, imports
    present/, advise/, run/, live/, the gate, the pipeline, the outputs, the report, the Monitor or the
    recorder."""
    banned = {"present", "advise", "run", "gradscope.gate", "gradscope.pipeline", "gradscope.outputs", "report",
              "gradscope.monitor", "gradscope.recorder", "live", "gradscope.live"}
    found = [f"{name} -> {target}" for name, targets in _import_graph(anywhere=True).items()
             if _stage(name) == "collect" for target in targets if _stage(target) in banned]
    assert not found, found


def test_no_class_on_the_hot_path_sets_more_than_15_attributes():
    """The Monitor and its helpers stay small enough to read: each class under collect/, and the public
    Monitor with what it inherits from the Observer, sets at most 15 attributes on ``self`` (a helper
    class is the way to add state)."""
    import ast
    own, bases = {}, {}
    for path in [*sorted((PACKAGE / "collect").glob("*.py")), PACKAGE / "monitor.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                own[node.name] = {target.attr for inner in ast.walk(node)
                                  if isinstance(inner, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                                  for t in (inner.targets if isinstance(inner, ast.Assign) else [inner.target])
                                  for target in ast.walk(t)
                                  if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                                  and target.value.id == "self"}
                bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
    assert "Monitor" in own and bases["Monitor"] == ["Observer"]
    large = []
    for name, names in own.items():
        total = set(names).union(*(own.get(b, set()) for b in bases[name]))
        if len(total) > 15:
            large.append(f"{name}: {len(total)} attributes")
    assert not large, large


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


def test_every_reason_the_library_gives_has_its_words_and_every_sentence_is_given():
    """Reasons travel as data (``because(code, **figures)``); present/wording.py words each code. A code
    without words would fail at render time; words no code uses are dead."""
    import ast
    from gradscope.present.wording import REASONS
    given = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "because" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                given.add(node.args[0].value)
    assert given, "the scan found no reason: it is not looking where the library gives them"
    assert given <= set(REASONS), sorted(given - set(REASONS))
    assert set(REASONS) <= given, sorted(set(REASONS) - given)


def test_the_monitor_loads_no_analysis_until_a_report_is_asked_for():
    """``import gradscope.monitor`` (what a training loop pays) loads neither the rules (yaml) nor
    the statistics (scipy); ``report()`` loads them."""
    code = ("import sys, gradscope.monitor; "
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


def test_one_writer_writes_every_report():
    """The CLI, the callbacks and the flight recorder write a report only through ``outputs.write_reports``:
    no other module formats a report into a file itself (the baseline, which is not a report, and the
    GitHub step summary, appended, are the writes that remain)."""
    import ast
    direct = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "outputs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "outputs"):
                direct.append(str(path.relative_to(PACKAGE)))
    assert direct == ["baseline.py"], direct


def test_the_clipping_methods_are_listed_once():
    """One place names the clipping methods together (analyse/clipping.py); every other list of them is
    built from it, so that a new method cannot be known to one layer and not another."""
    import ast
    names = {"norm", "value", "agc", "adaptive"}
    lists = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                named = {e.value for e in node.elts if isinstance(e, ast.Constant)} & names
                if len(named) >= 2:
                    lists.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert [entry.split(":")[0] for entry in lists] == ["analyse/clipping.py"], lists
