"""Per-step records in bounded memory: a decimating series store, a ring of the latest steps and online spike
statistics."""
from __future__ import annotations

from typing import Dict, List

import numpy as np

SPIKE_WARMUP = 5  # earlier steps a z-score needs before it is trusted
SPIKE_STD_FLOOR = 0.1  # decades: a 26% wobble is never a spike, however flat the history


class SeriesStore:
    """Keeps every step appended until ``capacity`` rows, then every 2nd, 4th, ... one (counted in
    appends, so that steps observed every N-th thin alike): memory never grows past it.

    Each field is one 2-D array (rows x layers), grown by doubling up to ``capacity + 1`` rows and
    compacted in place when thinned, so a row is copied in as it comes (a view would pin the whole
    flushed block of rows it was cut from) and reading a field is one copy, not a stack of rows."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.stride = 1
        self.appended = 0
        self.count = 0  # rows kept
        self._steps = np.zeros(0, dtype=np.int64)
        self._index = np.zeros(0, dtype=np.int64)  # each kept row's place among the appends
        self.fields: Dict[str, np.ndarray] = {}  # rows [:count] are kept

    @property
    def steps(self) -> List[int]:
        return self._steps[:self.count].tolist()

    def append(self, step: int, **values: np.ndarray) -> None:
        index, self.appended = self.appended, self.appended + 1
        if index % self.stride:
            return
        k = self.count
        if k == len(self._steps):
            self._grow()
        for name, value in values.items():
            value = np.asarray(value, dtype=np.float64)
            if name not in self.fields:
                self.fields[name] = np.full((len(self._steps),) + value.shape, np.nan)
            self.fields[name][k] = value
        self._steps[k], self._index[k] = step, index
        self.count += 1
        if self.count > self.capacity:
            self.stride *= 2
            keep = np.flatnonzero(self._index[:self.count] % self.stride == 0)
            for rows in (self._steps, self._index, *self.fields.values()):
                rows[:len(keep)] = rows[keep]
            self.count = len(keep)

    def _grow(self) -> None:
        rows = min(max(2 * len(self._steps), 64), self.capacity + 1)
        self._steps = np.resize(self._steps, rows)
        self._index = np.resize(self._index, rows)
        for name, old in self.fields.items():
            grown = np.full((rows,) + old.shape[1:], np.nan)
            grown[:len(old)] = old
            self.fields[name] = grown

    def amend(self, step: int, name: str, value: np.ndarray) -> None:
        """Overwrite one field of the row for ``step``, if that row is the latest one kept."""
        if self.count and self._steps[self.count - 1] == step and name in self.fields:
            self.fields[name][self.count - 1] = np.asarray(value, dtype=np.float64)

    def array(self, name: str, copy: bool = True) -> np.ndarray:
        """The stored rows of one field: shape (rows,) or (rows, layers); ``copy=False``: a view, valid
        until the next append."""
        rows = self.fields.get(name)
        if rows is None:
            return np.empty((0,))
        return rows[:self.count].copy() if copy else rows[:self.count]


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
