"""gradscope: profile a model's gradients, diagnose explosion risk, and recommend a clipping threshold."""
from .clipper import Clipper
from .diagnose import DEFAULT_STEPS, diagnose
from .errors import GradscopeError
from .experiment import Experiment
from .monitor import Monitor
from .report import Report
from .ruleset import RuleSet, load_rules

__version__ = "0.1.0"
__all__ = ["Clipper", "DEFAULT_STEPS", "Experiment", "GradscopeError", "Monitor", "Report", "RuleSet", "diagnose", "load_rules"]
