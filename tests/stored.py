"""Stored runs: real profiles kept as plain data (tests/stored/<name>.json), and the Report the pure core builds
from one. A golden rendered from a stored run depends on gradscope alone, not on the float kernels of the
machine that runs the suite: a chaotic run's last bits differ from one CPU to the next.

A stored run holds what a diagnose run measured (its Profile), the trials it ran where it ran them (its
TrialSet) and what the report says of the run itself; statistics, findings, the recommendation and every
format are computed from them anew on each test. ``python tests/stored.py`` trains the runs again and
rewrites the files (then ``pytest --overwrite`` rewrites the goldens rendered from them).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np

import gradscope
from gradscope.advise.recommend import recommend
from gradscope.pipeline import build_report
from gradscope.run.diagnose import trial_outcome

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
STORED = TESTS / "stored"
HERE = "{root}/"  # a path in this repository (a sample, tests/models.py), stored relative to it, resolved where it runs


def encode(value: Any) -> Any:
    """Plain JSON for a Profile or a TrialSet: dataclasses by their type's name, arrays with their dtype,
    tuples kept apart from lists, and non-finite floats as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value)
        return {"__dataclass__": f"{kind.__module__}:{kind.__qualname__}",
                **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if type(value).__module__.startswith("torch"):  # a spike's batch: a stored run keeps none
        return None
    if isinstance(value, np.ndarray):
        return {"__array__": encode(value.tolist()), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return encode(value.item())
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return {"__dict__": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, str) and value.startswith(f"{ROOT}/"):
        return HERE + value[len(f"{ROOT}/"):]
    if isinstance(value, str) and value.startswith("/") and "/site-packages/" in value:  # torch's own modules
        return "/site-packages/" + value.split("/site-packages/", 1)[1]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(HERE):
        return f"{ROOT}/{value[len(HERE):]}"
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__dataclass__" in value:
        module, name = value["__dataclass__"].split(":")
        if not module.startswith("gradscope."):
            raise ValueError(f"a stored run names a type outside gradscope: {module}")
        kind = importlib.import_module(module)
        for part in name.split("."):
            kind = getattr(kind, part)
        return kind(**{k: decode(v) for k, v in value.items() if k != "__dataclass__"})
    if "__array__" in value:
        return np.asarray(decode(value["__array__"]), dtype=value["dtype"]).reshape(value["shape"])
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {decode(k): decode(v) for k, v in value["__dict__"]}
    if "__float__" in value:
        return float(value["__float__"])
    return {k: decode(v) for k, v in value.items()}


def save(name: str, report: gradscope.Report, profile, adaptive_optimizer=None) -> None:
    trials = report.recommendation.evidence.trials
    doc = {"model": report.model, "seed": report.seed, "steps_requested": report.steps_requested,
           "stopped_reason": report.stopped_reason, "adaptive_optimizer": adaptive_optimizer,
           "profile": encode(profile), "trials": None if trials is None else encode(trials)}
    STORED.mkdir(exist_ok=True)
    (STORED / f"{name}.json").write_text(json.dumps(doc, indent=None, separators=(",", ":")) + "\n")


def load(name: str) -> gradscope.Report:
    """The Report of a stored run, built by the pure core: statistics, findings, recommendation."""
    doc = json.loads((STORED / f"{name}.json").read_text())
    profile = decode(doc["profile"])
    if doc["trials"] is not None and profile.trials is None:  # stored before the rules read the trials
        profile = dataclasses.replace(profile, trials=trial_outcome(decode(doc["trials"])))
    report = build_report(profile, model_name=doc["model"], stopped_reason=doc["stopped_reason"],
                          seed=doc["seed"], steps_requested=doc["steps_requested"],
                          adaptive_optimizer=doc["adaptive_optimizer"])
    if doc["trials"] is not None:
        trials = decode(doc["trials"])
        report = dataclasses.replace(report, recommendation=recommend(report.statistics, report.findings, trials))
    return report


def _record(make, steps: int, seed: int = 0, trials=True):
    """Run diagnose on ``make()`` and keep the Profile it built its report from."""
    from gradscope.run import diagnose as run_diagnose
    kept: Dict[str, Any] = {}
    original = run_diagnose._Context.report

    def keep(self, profile, stopped_reason=None):
        kept["profile"], kept["adaptive"] = profile, self.adaptive_optimizer
        return original(self, profile, stopped_reason)
    run_diagnose._Context.report = keep
    try:
        report = gradscope.diagnose(make(), steps=steps, seed=seed, trials=gradscope.TrialOptions() if trials else 0,
                                    profile=gradscope.ProfileOptions(extend=False))
    finally:
        run_diagnose._Context.report = original
    return report, kept["profile"], kept["adaptive"]


def write_all() -> None:
    """Train each stored run again (on this machine's kernels) and rewrite its file."""
    import torch
    from models import exploding_rnn, healthy_mlp, hot_resnet, tiny_bert
    from test_default_rules import corrupted_sample
    torch.set_num_threads(1)
    runs = {
        "explosion": (exploding_rnn, 12, True),  # a tanh RNN whose gradients blow up, with its trials
        "healthy": (healthy_mlp, 8, False),
        "non_finite": (lambda: hot_resnet(20.0), 30, False),  # a ResNet at SGD lr 20: NaN within the profile
        "guard": (lambda: healthy_mlp(lr=1.0), 30, True),  # Adam too hot: trials, and the skip guard armed
        "resnet": (hot_resnet, 8, False),  # 31 layers, for the layout at 80 and 120 columns
        "bert": (tiny_bert, 8, False),  # Hugging Face's dotted layer names
        "spike": (corrupted_sample, 30, False),  # one corrupted sample at step 20: a spike taken apart
    }
    only = set(sys.argv[1:])  # python tests/stored.py spike: retrain only the runs named
    for name, (make, steps, trials) in runs.items():
        if only and name not in only:
            continue
        report, profile, adaptive = _record(make, steps, trials=trials)
        save(name, report, profile, adaptive)
        print(f"{name}: {report.statistics.model.steps} steps, healthy={report.healthy}, "
              f"advice {report.recommendation.method} {report.recommendation.threshold}, "
              f"guard {report.recommendation.guard is not None}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    write_all()
