"""Why the advice is what it is, as data: a code and the figures it rests on.

The advice (``judge``, ``recommend``) and the runs behind it (``run/``) say *why* with a
:class:`Reason`; the words are :mod:`gradscope.present.wording`'s (``wording.say``), where every
renderer and the JSON report get them, so that a sentence is written once and a machine can read the
code and the figures without parsing it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple


@dataclasses.dataclass(frozen=True)
class Reason:
    """One clause of an explanation: ``code`` names it (a key of ``wording.REASONS``), ``figures`` holds
    what it rests on (numbers, names, and nested reasons)."""

    code: str
    figures: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """The reason as JSON-ready data: its code and its figures (nested reasons as their own dicts)."""
        return {"code": self.code, **{name: _plain(value) for name, value in self.figures.items()}}


Reasons = Tuple[Reason, ...]  # clauses, in the order they are said


def because(code: str, **figures: Any) -> Reason:
    """A :class:`Reason`: ``because("lowest_held_out", best=0.41, start=0.52)``."""
    return Reason(code, figures)


def _plain(value: Any) -> Any:
    if isinstance(value, Reason):
        return value.to_dict()
    if isinstance(value, tuple) and value and all(isinstance(v, Reason) for v in value):
        return [v.to_dict() for v in value]
    return value
