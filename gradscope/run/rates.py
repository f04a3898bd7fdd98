"""The learning rates the user's schedule will use, read by stepping it ahead and putting it back.

A profile that ends inside a warm-up has seen only the low rates, and a run whose peak rate is too hot
looks healthy there. So diagnose steps the Experiment's scheduler ahead (without training) to find
where the schedule peaks, then restores the scheduler's state and every hyperparameter of the
optimizer's groups, and the report says how far towards that peak the profile and the trials went.
"""
from __future__ import annotations

import warnings
from typing import List

from .experiment import Experiment

LOOK_AHEAD = 10_000  # steps of the schedule read ahead: the peak of a warm-up this long or shorter is found


def ahead(experiment: Experiment, steps: int = LOOK_AHEAD) -> List[float]:
    """The largest learning rate over the optimizer's groups at each of the next ``steps`` steps (fewer where
    the schedule ends sooner, as OneCycleLR does at its total_steps); empty without a scheduler."""
    scheduler = experiment.scheduler
    if scheduler is None:
        return []
    groups = experiment.optimizer.param_groups
    saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    saved = scheduler.state_dict()
    rates = [_largest(groups)]
    try:
        with warnings.catch_warnings():  # stepping a scheduler with no optimizer step between: on purpose here
            warnings.simplefilter("ignore")
            for _ in range(steps - 1):
                scheduler.step()
                rates.append(_largest(groups))
    except Exception:  # noqa: BLE001 - a schedule that runs out ends the look-ahead there; training would say so
        pass
    finally:
        scheduler.load_state_dict(saved)
        for group, values in zip(groups, saved_groups):
            group.update(values)
    return rates


def _largest(groups) -> float:
    return max(float(g["lr"]) for g in groups)
