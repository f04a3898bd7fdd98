"""gradscope: profile a model's gradients, diagnose explosion risk, and recommend a clipping threshold.

The public names load on first use (PEP 562), so ``import gradscope`` and ``gradscope --version`` do not
pay for importing torch until something needs it.
"""
import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"
_PUBLIC = {
    "Clipper": "run.clipper", "DEFAULT_STEPS": "run.diagnose", "diagnose": "run.diagnose", "GradscopeError": "errors",
    "Experiment": "run.experiment", "Monitor": "monitor", "Report": "report", "RuleSet": "analyse.ruleset",
    "load_rules": "analyse.ruleset", "MonitorOptions": "collect.options", "TrialOptions": "run.options", "ProfileOptions": "run.options", "Skip": "advise.guards",
    "LiveLog": "live",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on its package. gradscope.diagnose is both a module and the public
        # function; the function keeps the name, as it did when this file imported it eagerly.
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
