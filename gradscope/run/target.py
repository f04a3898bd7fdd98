"""Resolve a TARGET string (``file.py``, ``file.py:callable`` or ``package.module:callable``) to an Experiment."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ..errors import USER_ERRORS, GradscopeError, TargetError, describe_exception
from .experiment import Experiment

DEFAULT_CALLABLE = "experiment"


def split_target(target: str) -> tuple[str, str]:
    """Split TARGET into (module or file, callable name); a bare file uses DEFAULT_CALLABLE."""
    where, sep, name = target.rpartition(":")
    if not sep or (len(where) == 1 and where.isalpha()):  # no colon, or a Windows drive letter
        where, name = target, DEFAULT_CALLABLE
    if not where or not name:
        raise TargetError(f"malformed target {target!r}", "write path/to/file.py[:callable] or package.module:callable")
    return where, name


def load_experiment(target: str) -> Experiment:
    """Import the target's module, call its factory and check it returned an Experiment."""
    where, name = split_target(target)
    module = _import_file(where) if where.endswith(".py") or "/" in where or "\\" in where else _import_module(where)
    factory = getattr(module, name, None)
    if factory is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise TargetError(
            f"{where} has no callable named {name!r}",
            f"define {name}() returning gradscope.Experiment, or name one: {where}:<callable>"
            + (f" (callables there: {', '.join(public[:8])})" if public else ""),
        )
    if not callable(factory):
        raise TargetError(f"{where}:{name} is a {type(factory).__name__}, not a callable", "point TARGET at a function")
    try:
        experiment = factory()
    except GradscopeError:
        raise
    except USER_ERRORS as exc:
        raise TargetError(
            f"{where}:{name}() raised {describe_exception(exc)}",
            "run it by hand to see where it fails",
        ) from exc
    if not isinstance(experiment, Experiment):
        raise TargetError(
            f"{where}:{name}() returned {type(experiment).__name__}, not a gradscope.Experiment",
            "return gradscope.Experiment(model=..., optimizer=..., batches=..., loss_fn=...)",
        )
    return experiment


def _import_file(path_text: str) -> ModuleType:
    path = Path(path_text)
    if not path.is_file():
        raise TargetError(f"no such file: {path_text}", "check the path; TARGET is path/to/file.py[:callable]")
    path = path.resolve()
    module_name = f"gradscope_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot import {path_text} as Python", "TARGET files must be .py modules")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))  # let the file import its siblings
    try:
        spec.loader.exec_module(module)
    except USER_ERRORS as exc:
        sys.modules.pop(module_name, None)
        raise TargetError(f"importing {path_text} failed: {describe_exception(exc)}", _import_hint(exc)) from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise TargetError(
                f"no module named {name!r}",
                "install the package, run from its folder, or give a file path: path/to/file.py:callable",
            ) from exc
        raise TargetError(f"importing {name} failed: {describe_exception(exc)}", _import_hint(exc)) from exc
    except USER_ERRORS as exc:
        raise TargetError(f"importing {name} failed: {describe_exception(exc)}", _import_hint(exc)) from exc


def _import_hint(exc: BaseException) -> str:
    if isinstance(exc, ModuleNotFoundError):
        return f"install the missing module {exc.name!r} in this environment"
    if isinstance(exc, SyntaxError):
        return "fix the syntax error, then run again"
    return "fix the error in the target module"
