"""Per-step records in bounded memory: a decimating series store, a ring of the latest steps and online spike
statistics."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

SPIKE_WARMUP = 5  # earlier steps a z-score needs before it is trusted
SPIKE_STD_FLOOR = 0.1  # decades: a 26% wobble is never a spike, however flat the history


class SeriesStore:
    """Keeps every step appended until ``capacity`` rows, then every 2nd, 4th, ... one (counted in
    appends, so that steps observed every N-th thin alike): memory never grows past it."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.stride = 1
        self.appended = 0
        self.steps: List[int] = []
        self._index: List[int] = []  # each kept row's place among the appends
        self.fields: Dict[str, List[np.ndarray]] = {}

    def append(self, step: int, **values: np.ndarray) -> None:
        index, self.appended = self.appended, self.appended + 1
        if index % self.stride:
            return
        self.steps.append(step)
        self._index.append(index)
        for name, value in values.items():
            # a copy: a view would pin the whole flushed batch of rows it was cut from
            self.fields.setdefault(name, []).append(np.array(value, dtype=np.float64))
        if len(self.steps) > self.capacity:
            self.stride *= 2
            keep = [i for i, at in enumerate(self._index) if at % self.stride == 0]
            self.steps = [self.steps[i] for i in keep]
            self._index = [self._index[i] for i in keep]
            self.fields = {k: [v[i] for i in keep] for k, v in self.fields.items()}

    def amend(self, step: int, name: str, value: np.ndarray) -> None:
        """Overwrite one field of the row for ``step``, if that row is the latest one kept."""
        if self.steps and self.steps[-1] == step and name in self.fields:
            self.fields[name][-1] = np.array(value, dtype=np.float64)

    def array(self, name: str) -> np.ndarray:
        """The stored rows of one field, stacked: shape (rows,) or (rows, layers)."""
        rows = self.fields.get(name, [])
        return np.stack(rows) if rows else np.empty((0,))


class RecentSteps:
    """The per-layer figures of the latest ``capacity`` steps, in a ring: a flight recorder's black box.

    ``SeriesStore`` thins old steps out once it is full; this keeps every one of the last few, so that the
    steps just before a failure are whole however long the run was. Memory: ``capacity`` rows of each field.
    """

    FIELDS = ("grad_norm", "grad_abs_max", "nonfinite")

    def __init__(self, capacity: int, width: int) -> None:
        self.capacity = capacity
        self.rows = {name: np.full((capacity, width), np.nan) for name in self.FIELDS}
        self.global_norm = np.full(capacity, np.nan)
        self.steps = np.full(capacity, -1, dtype=np.int64)
        self.count = 0

    def append(self, step: int, global_norm: float, **values: np.ndarray) -> None:
        if self.capacity == 0:
            return
        at = self.count % self.capacity
        self.steps[at], self.global_norm[at] = step, global_norm
        for name in self.FIELDS:
            self.rows[name][at] = values[name]
        self.count += 1

    def snapshot(self) -> Dict[str, np.ndarray]:
        """The kept steps, oldest first, as copies: ``steps``, ``global_norm`` and each field (steps × layers)."""
        n = min(self.count, self.capacity)
        order = (np.arange(n) + self.count - n) % max(self.capacity, 1)
        return {"steps": self.steps[order].copy(), "global_norm": self.global_norm[order].copy(),
                **{name: self.rows[name][order].copy() for name in self.FIELDS}}


class SpikeTracker:
    """Online z-score of log10 values against the running mean and std of all earlier steps (Welford)."""

    def __init__(self, width: int) -> None:
        self.count = np.zeros(width)
        self.mean = np.zeros(width)
        self.m2 = np.zeros(width)
        self.max_z = np.full(width, np.nan)
        self.max_z_step = np.full(width, -1, dtype=np.int64)

    def update(self, step: int, values: np.ndarray) -> np.ndarray:
        """Score this step's values, then fold them into the running statistics; returns the z-scores."""
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.log10(values)
        ok = np.isfinite(x)
        std = np.sqrt(np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), 0.0))
        z = np.where(ok & (self.count >= SPIKE_WARMUP), (x - self.mean) / np.maximum(std, SPIKE_STD_FLOOR), np.nan)
        better = np.isfinite(z) & ~(z <= self.max_z)  # NaN max_z counts as lower
        self.max_z = np.where(better, z, self.max_z)
        self.max_z_step = np.where(better, step, self.max_z_step)
        n = self.count + ok
        delta = np.where(ok, x - self.mean, 0.0)
        self.mean = self.mean + np.where(ok, delta / np.maximum(n, 1), 0.0)
        self.m2 = self.m2 + np.where(ok, delta * (np.where(ok, x, 0.0) - self.mean), 0.0)
        self.count = n
        return z
