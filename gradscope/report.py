"""The Report: statistics, findings and a recommendation, and its stable JSON document."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .analyse.evaluate import Finding, worst_severity
from .errors import GradscopeError
from .advise.cause import Cause
from .advise.judge import Trial, TrialSet
from .advise.reasons import Reason, Reasons
from .advise.recommend import Recommendation
from .analyse.ruleset import SEVERITIES, RuleSet
from .analyse.clipping import METHODS, NONE, rate_windows
from .analyse.stats import CLIP_METRICS, Statistics

SCHEMA_VERSION = 2  # 2: recommendation.trials names its steps by what they count (first_steps, steps_spent)


@dataclasses.dataclass(frozen=True)
class ScheduleReach:
    """How far towards its learning-rate schedule's peak a diagnose went: the peak within the steps read
    ahead, and the highest rate the profile's and the trials' steps used."""

    peak_lr: float
    peak_step: int  # the first step (counted from 0) that uses the peak rate
    looked_ahead: int  # steps of the schedule read
    profile_steps: int
    profile_lr: float
    trial_steps: int = 0  # the longest horizon a trial reached (0: no trial ran)
    trial_lr: float = 0.0

    REACHED = 0.9  # a rate at this share of the peak counts as the peak

    @property
    def reached(self) -> bool:
        """Whether the profile or a trial trained at the peak rate (within REACHED of it)."""
        return max(self.profile_lr, self.trial_lr) >= self.REACHED * self.peak_lr


@dataclasses.dataclass(frozen=True)
class Report:
    model: str
    statistics: Statistics
    findings: Tuple[Finding, ...]
    recommendation: Recommendation
    rules: Optional[RuleSet] = None
    stopped_reason: Optional[str] = None  # set when the run ended before the steps asked for
    seed: Optional[int] = None
    steps_requested: Optional[int] = None
    extended: Optional[Reason] = None  # why the profile ran past the steps asked for (diagnose's plateau rule)
    schedule: Optional[ScheduleReach] = None  # with a learning-rate scheduler: how far towards its peak it went
    cause: Optional[Cause] = None  # the likely cause of the trouble the findings name (advise.cause)

    @property
    def healthy(self) -> bool:
        """No finding at warning or error severity."""
        return all(f.severity == "info" for f in self.findings)

    @property
    def partial(self) -> bool:
        return self.stopped_reason is not None

    @property
    def worst_severity(self) -> Optional[str]:
        return worst_severity(self.findings)

    # -- display hooks: the declared exception to the one-way flow (tests/test_package.py AGAINST_THE_FLOW)
    # The flow runs collect -> analyse -> advise -> report -> present: present/ imports this module, never
    # the reverse at load time. These four hooks (render, __str__, _repr_html_, __rich__) run the flow's
    # last stage from the Report itself, so that print(report), rich and Jupyter show it, as to_dict()
    # words its reasons; they import present/ lazily, inside the call, so that importing the Report loads
    # no renderer and no cycle forms.
    def render(self, width: int = 100, *, all_layers: bool = False) -> str:
        """The terminal report as plain text at ``width`` columns (what ``print(report)`` shows at 100)."""
        from .present.render import render_text
        return render_text(self, width, all_layers=all_layers)

    def __str__(self) -> str:
        return self.render()

    def _repr_html_(self) -> str:
        """Jupyter shows the HTML report, plots included (needs the html extra: matplotlib)."""
        from .present.html import to_html
        return to_html(self)

    def __rich__(self):
        """``rich.print(report)`` and a rich Console show the report in colour at the console's width."""
        from .present.render import render
        return render(self)

    def to_dict(self) -> Dict[str, Any]:
        # The JSON carries every reason in words too, and the words live in present/: imported here, when a
        # document is made (a display hook, as render() is), so that loading a Report loads no renderer.
        from .present.wording import say
        s, m = self.statistics, self.statistics.model
        rec = self.recommendation
        doc = {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "healthy": self.healthy,
            # the rules whose warnings or errors made it unhealthy (empty when healthy), most severe first
            "unhealthy_because": list(dict.fromkeys(f.rule_id for f in sorted(
                (f for f in self.findings if f.severity != "info"), key=lambda f: -SEVERITIES.index(f.severity)))),
            "partial": self.partial,
            "stopped_reason": self.stopped_reason,
            "steps": m.steps,
            "steps_requested": self.steps_requested,
            "extended": None if self.extended is None else say(self.extended),
            "extended_because": None if self.extended is None else _because((self.extended,)),
            "schedule": None if self.schedule is None else {**dataclasses.asdict(self.schedule),
                                                            "reached": self.schedule.reached},
            "seed": self.seed,
            "measurement": m.measurement,
            "device": m.device,
            "ranks": m.ranks,
            "sharded": m.sharded,
            "rules": list(self.rules.sources) if self.rules else [],
            "global": {
                "steps": m.series_steps.tolist(),
                "norm": m.global_norm.tolist(),
                "cosine": m.cosine.tolist(),
                "loss": m.loss.tolist(),
                "summary": dict(m.metrics),
                "first_nonfinite": None if m.first_nonfinite is None else
                {"step": m.first_nonfinite[0], "layer": m.first_nonfinite[1]},
                "before_nonfinite": _before_nonfinite(m.before_nonfinite),
            },
            "clipping": _clipping(m),
            "layers": [
                {"name": l.name, "kind": l.kind, "params": l.params, "frozen_params": l.frozen_params,
                 "status": l.status, "param_names": list(l.param_names), "grad_norm": l.norm_series.tolist(),
                 "stats": dict(l.metrics)}
                for l in s.layers
            ],
            "findings": [dataclasses.asdict(f) for f in self.findings],
            "cause": None if self.cause is None else {"kind": self.cause.kind, "words": say(self.cause.reasons),
                                                      "because": _because(self.cause.reasons)},
            "spikes": [spike_dict(spike) for spike in m.spikes],
            "optimizer": _optimizer(m.optimizer),
            "recommendation": {
                "method": rec.method,
                "threshold": rec.threshold,
                "evidence": {**{k: v for k, v in dataclasses.asdict(rec.evidence).items() if k not in ("trials", "basis")},
                             "basis": say(rec.evidence.basis), "basis_because": _because(rec.evidence.basis)},
                "snippets": dict(rec.snippets),
                "trials": None if rec.evidence.trials is None else trials_dict(rec.evidence.trials),
                "guard": None if rec.guard is None else {
                    "kind": "skip", **dataclasses.asdict(rec.guard.skip), "armed": rec.guard.armed,
                    "reasons": list(rec.guard.reasons),
                    "profiled_steps": rec.guard.steps, "judged_steps": rec.guard.judged, "would_skip": list(rec.guard.would_skip),
                    "trial_skips": rec.guard.trial_skips, "basis": say(rec.guard.basis),
                    "basis_because": _because(rec.guard.basis)},
            },
        }
        return _clean(doc)

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    @staticmethod
    def from_json(source: Union[str, Path, Mapping[str, Any]]) -> "ReportDocument":
        """A JSON report read back (``to_json()``, or the CLI's JSON format): a path to it, or the parsed
        document. The one reader of the format: the Clipper reads its advice here, the baseline a
        report's findings and metrics. Raises GradscopeError, with what to do, for anything else."""
        return ReportDocument.read(source)


WRITE_JSON_HINT = "write the report as JSON first: Path(FILE).write_text(report.to_json())"


class ReportDocument(Mapping):
    """A gradscope JSON report as read back: the document itself (a read-only mapping of its keys) and its
    parts as the readers need them, each checked as it is read. ``source`` names where it came from."""

    def __init__(self, doc: Mapping[str, Any], source: str) -> None:
        self._doc, self.source = doc, source

    @classmethod
    def read(cls, source: Union[str, Path, Mapping[str, Any]]) -> "ReportDocument":
        if isinstance(source, ReportDocument):
            return source
        if isinstance(source, Mapping):
            doc, where = source, "the document given"
        else:
            path, where = Path(source), str(source)
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise GradscopeError(f"cannot read a gradscope report from {path}: {exc}", WRITE_JSON_HINT,
                                     remedy=("write-json-report", str(path))) from None
        if not (isinstance(doc, Mapping) and isinstance(doc.get("recommendation"), Mapping)):
            raise GradscopeError(f"{where} is not a gradscope JSON report (it has no recommendation)",
                                 WRITE_JSON_HINT, remedy=("write-json-report", "FILE"))
        return cls(doc, where)

    def __getitem__(self, key: str) -> Any:
        return self._doc[key]

    def __iter__(self):
        return iter(self._doc)

    def __len__(self) -> int:
        return len(self._doc)

    def _bad(self, what: str) -> GradscopeError:
        return GradscopeError(f"{self.source}: malformed gradscope report: {what}", WRITE_JSON_HINT,
                              remedy=("write-json-report", "FILE"))

    @property
    def recommendation(self) -> Mapping[str, Any]:
        """The advice: ``method`` (one of the clipping methods, or none), ``threshold``, ``evidence``, ``guard``."""
        advice = self._doc["recommendation"]
        if advice.get("method") not in METHODS + (NONE,):
            raise self._bad(f"recommendation.method is {advice.get('method')!r}, not a known clipping method")
        return advice

    @property
    def findings(self) -> List[Mapping[str, Any]]:
        """The findings, each with a string ``rule_id``, a ``layer`` (a name or None) and a known ``severity``."""
        found = self._doc.get("findings")
        if not isinstance(found, list):
            raise self._bad("'findings' must be a list")
        for i, f in enumerate(found):
            if not (isinstance(f, Mapping) and isinstance(f.get("rule_id"), str)
                    and (f.get("layer") is None or isinstance(f.get("layer"), str)) and f.get("severity") in SEVERITIES):
                raise self._bad(f"findings[{i}] needs a string rule_id, a string or null layer and a severity")
        return found

    @property
    def metrics(self) -> Mapping[str, Any]:
        """The model-level metrics (``global.summary``): numbers, or None where a metric had no value."""
        whole = self._doc.get("global")
        summary = whole.get("summary") if isinstance(whole, Mapping) else None
        if not isinstance(summary, Mapping):
            raise self._bad("'global.summary' must be a mapping of metric names to numbers")
        return summary

    @property
    def layer_names(self) -> List[str]:
        layers = self._doc.get("layers")
        if not (isinstance(layers, list) and all(isinstance(x, Mapping) and isinstance(x.get("name"), str) for x in layers)):
            raise self._bad("'layers' must be a list of layers, each with a name")
        return [x["name"] for x in layers]

    @property
    def model(self) -> str:
        model = self._doc.get("model")
        if not isinstance(model, str):
            raise self._bad("'model' must be the model's name")
        return model


def trials_dict(trials: TrialSet) -> Dict[str, Any]:
    """The trials as JSON-ready data: the unclipped reference first (threshold null), then loosest first."""
    from .present.wording import say  # see Report.to_dict
    def one(t: Trial) -> Dict[str, Any]:
        return {"threshold": None if math.isinf(t.threshold) else t.threshold, "held_out_loss": t.held_out,
                "stable": t.stable, "unstable_because": t.unstable or None, "clip_fraction": t.clip_fraction,
                "steps_run": len(t.losses), "horizon": t.horizon,
                "checkpoints": [{"steps": c.steps, "held_out_loss": c.held_out} for c in t.checkpoints],
                "losses": list(t.losses), "held_out_losses": list(t.held_out_batches)}
    # Wall-clock times stay out, so that the same target and seed give the same document; the cost is in steps.
    return {"first_steps": trials.steps, "adaptive": trials.adaptive, "longest_steps": trials.longest,
            "start_held_out_loss": trials.start_held_out, "winner": trials.winner,
            "reason": say(trials.reason), "reason_because": _because(trials.reason), "learned": trials.learned,
            "steps_spent": trials.spent, "untried": list(trials.untried), "stopped": say(trials.stopped) or None,
            # memory on this rank: one copy of the model's and the optimizer's state (its shards under FSDP2)
            # and the most copies kept at once; null in a report recorded before they were counted
            "state_bytes": trials.state_bytes, "states_kept_most": trials.states_most,
            "stopped_because": _because(trials.stopped), "notes": [say(n) for n in trials.notes],
            "runs": [one(trials.reference), *(one(t) for t in trials.trials)]}


def spike_dict(spike) -> Dict[str, Any]:
    """One spike taken apart (analyse.profile.SpikeSamples) as JSON-ready data (its wall-clock time left out,
    as the trials' is, so that the same target and seed give the same document)."""
    return {"step": spike.step, "global_norm": spike.global_norm, "z": spike.z, "why": spike.why,
            "batch_size": spike.batch_size, "method": spike.method, "error": spike.error,
            "samples": [{"index": s.index, "grad_norm": s.grad_norm, "loss": s.loss, "share": s.share,
                         "finite": math.isfinite(s.grad_norm)} for s in spike.samples]}


def _optimizer(setup) -> Optional[Dict[str, Any]]:
    """The optimizer's configuration as read (analyse.profile.OptimizerSetup), or None where not known."""
    if setup is None:
        return None
    return {"name": setup.name, "eps": setup.eps, "beta2": setup.beta2, "trainable": setup.trainable,
            "missed": list(setup.missed), "decayed_exempt": list(setup.decayed_exempt),
            "decayed_exempt_weight_decay": setup.weight_decay}


def _because(reasons: Reasons) -> List[Dict[str, Any]]:
    """Reasons as data for machines: each one's code and figures (the words are beside them)."""
    return [r.to_dict() for r in reasons]


def _clipping(m) -> Optional[Dict[str, Any]]:
    """The run's own clipping (see gradscope.collect.clipping), or None where gradscope was not told of it."""
    if m.clip is None:
        return None
    record, mm = m.clip, m.metrics
    first, steps, rate = rate_windows(record)
    return {
        "method": record.spec.method, "threshold": record.spec.threshold, "source": record.spec.source,
        "steps": record.steps, "clipped": record.clipped,
        **{key[len("clip_"):]: mm[key] for key in CLIP_METRICS if key not in ("clip_threshold", "clip_steps")},
        "spike_steps": list(record.spikes),
        "windows": {"first_step": first.astype(int).tolist(), "steps": steps.astype(int).tolist(), "rate": rate.tolist()},
        "post_clip_norm": m.post_clip_norm.tolist(), "cosine": m.clip_cosine.tolist(),
        "guard": None if record.guard is None else {k: v for k, v in record.guard.items()},
    }


def _before_nonfinite(box: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The black box as JSON: the steps, the global norm, and each layer's figures over those steps."""
    if box is None:
        return None
    return {"steps": box["steps"].tolist(), "global_norm": box["global_norm"].tolist(),
            "layers": {name: {field: box[field][:, k].tolist() for field in ("grad_norm", "grad_abs_max", "nonfinite")}
                       for k, name in enumerate(box["layers"])}}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become null, numpy scalars become Python numbers, tuples become lists."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.6g}")
    return value
