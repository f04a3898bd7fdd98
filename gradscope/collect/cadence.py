"""When a Monitor measures what: the calls that end an optimizer step, the steps it observes, and the
cadences of the sampled figures.

Counting only: this module touches no tensor. Under ``accumulation_steps=k`` every k-th call is an
optimizer step; under ``every=N`` every N-th optimizer step is observed; of the observed steps every
``histogram_every``-th counts the |g| histogram and the sums, and the weights are copied on the step
before every ``update_every``-th, whose row reads their norms and the update since.
"""
from __future__ import annotations

from typing import Dict, Tuple

# What a step between two observed ones (under ``every``) measures for the next observed one's row: the
# update of an observed step that took the weights' snapshot, and the previous step's squared norm (with
# its sample, for the cosine). Carried as extras (see gradscope.collect.rows).
BETWEEN = ("update_base_sq", "update_sq", "previous_norm_sq")


class Cadence:
    """The counters of one Monitor, and every decision that follows from them."""

    def __init__(self, *, every: int, accumulation_steps: int, update_every: int, histogram_every: int) -> None:
        self.every, self.accumulation_steps = every, accumulation_steps
        self.update_every, self.histogram_every = update_every, histogram_every
        self.calls = 0  # observe() calls
        self.optimizer_steps = 0  # optimizer steps seen, observed or not
        self.snapshot_step = -1  # the optimizer step whose weights the snapshot holds (-1: none, or spent)
        self.carried: Dict[str, object] = {}  # what steps between observed ones measured for the next (BETWEEN, "noted")

    def call(self) -> bool:
        """Count an ``observe()`` call; whether it ends an optimizer step (the k-th of an accumulation)."""
        self.calls += 1
        return self.calls % self.accumulation_steps == 0

    def next_step(self) -> Tuple[int, bool]:
        """Count an optimizer step: its number, and whether it is observed."""
        step = self.optimizer_steps
        self.optimizer_steps += 1
        return step, step % self.every == 0

    def counted(self, step: int) -> bool:
        """Whether the ``step``-th observed step counts the |g| histogram and the sums."""
        return step % self.histogram_every == 0

    def measures_update(self, step: int, optimizer_step: int) -> bool:
        """Whether this observed step's row reads the update since the snapshot: carried from the step
        after it, or taken on the step just before this one."""
        return "update_sq" in self.carried or (step > 0 and self.snapshot_step == optimizer_step - 1)

    def snapshots(self, step: int) -> bool:
        """Whether the ``step``-th observed step copies the weights (the one before every update_every-th)."""
        return (step + 1) % self.update_every == 0

    def follows_snapshot(self, optimizer_step: int) -> bool:
        """Whether an unobserved step comes right after an observed one that copied the weights."""
        return self.after_observed(optimizer_step) and self.snapshot_step == optimizer_step - 1

    def after_observed(self, optimizer_step: int) -> bool:
        return (optimizer_step - 1) % self.every == 0

    def before_observed(self, optimizer_step: int) -> bool:
        return (optimizer_step + 1) % self.every == 0

    def took_snapshot(self, optimizer_step: int) -> None:
        """The weights were copied at ``optimizer_step``: its update is read once the optimizer has stepped."""
        self.snapshot_step = optimizer_step

    def spent_snapshot(self) -> None:
        """The snapshot's update was recorded: none is pending."""
        self.snapshot_step = -1

    @property
    def last_observed(self) -> bool:
        """Whether the last optimizer step seen was an observed one."""
        return (self.optimizer_steps - 1) % self.every == 0

    @property
    def snapshot_pending(self) -> bool:
        """Whether the last optimizer step copied the weights and its update is still to be read."""
        return self.snapshot_step >= 0 and self.snapshot_step == self.optimizer_steps - 1
