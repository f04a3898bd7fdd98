"""Typed errors for user mistakes: each says what went wrong and what to do next."""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Optional, Tuple

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# What user code (a target, a model, a loss, a data source, an optimizer) may raise that gradscope reports
# as the user's error: SystemExit too, so that a sys.exit(0) in a loss function cannot pass a CI gate.
USER_ERRORS = (Exception, SystemExit)


class GradscopeError(Exception):
    """A problem the user can fix. The CLI prints it in one or two lines and exits with ``exit_code``.

    ``partial`` may carry a partial :class:`~gradscope.report.Report` of what was measured before the
    problem, so that nothing seen is lost. ``hint`` says what to do in Python's terms; ``remedy`` names
    the fix as data, a code and its argument (``("record-baseline", path)``), for a front end to word in
    its own (the CLI names its flags; see ``gradscope.cli.REMEDIES``).
    """

    exit_code = EXIT_USAGE

    def __init__(self, problem: str, hint: str = "", *, partial: Optional[Any] = None,
                 remedy: Optional[Tuple[str, str]] = None) -> None:
        self.problem = problem
        self.hint = hint
        self.partial = partial
        self.remedy = remedy
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.problem}\n  hint: {self.hint}" if self.hint else self.problem


class TargetError(GradscopeError):
    """The TARGET string does not lead to a usable Experiment."""


class ExperimentError(GradscopeError):
    """The Experiment is malformed, or the user's model, loss or data raised."""


class RuleError(GradscopeError):
    """A rule file is malformed: it names the file, the rule id and, where known, the line."""


def describe_exception(exc: BaseException) -> str:
    """One line naming an exception from user code and the last user frame it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    package = Path(__file__).resolve().parent
    user = [f for f in frames if not _inside(Path(f.filename), package) and "torch" not in Path(f.filename).parts]
    where = f" at {Path(user[-1].filename).name}:{user[-1].lineno}" if user else ""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}{': ' + lines[0] if lines else ''}{where}"


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` or any folder below it: gradscope's own frames, run/ and collect/ too."""
    try:
        path.resolve().relative_to(folder)
    except ValueError:
        return False
    return True
