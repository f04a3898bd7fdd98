"""TensorBoard: write a Report's per-layer |g| histograms and per-step norms as event files.

Needs the ``tensorboard`` package (``pip install 'gradscope[tensorboard]'``); it is imported only when
``write_tensorboard`` runs. The histograms are gradscope's own bins, written with ``add_histogram_raw``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from ..analyse import histogram as hist
from ..errors import GradscopeError
from ..report import Report


def write_tensorboard(report: Report, log_dir: Union[str, Path]) -> Path:
    """Write scalars for every kept step and one pooled |g| histogram per layer; returns the event folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise GradscopeError("TensorBoard output needs the tensorboard package",
                             "pip install 'gradscope[tensorboard]'") from None
    m = report.statistics.model
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for step, norm, loss in zip(m.series_steps, m.global_norm, m.loss):
            _scalar(writer, "gradscope/global_norm", norm, step)
            _scalar(writer, "gradscope/loss", loss, step)
        for layer in report.statistics.active_layers:
            for step, norm in zip(m.series_steps, layer.norm_series):
                _scalar(writer, f"gradscope/grad_norm/{layer.name}", norm, step)
            _histogram(writer, f"gradscope/grad_abs/{layer.name}", layer.histogram, m.steps)
    finally:
        writer.close()
    return Path(log_dir)


def _scalar(writer, tag: str, value: float, step: int) -> None:
    if np.isfinite(value):
        writer.add_scalar(tag, float(value), int(step))


def _histogram(writer, tag: str, counts: np.ndarray, step: int) -> None:
    """add_histogram_raw from the finite bins between the first and the last non-empty one."""
    finite = hist.finite(counts).astype(np.float64)
    filled = np.flatnonzero(finite)
    if not len(filled):
        return
    lo, hi = filled[0], filled[-1]
    centres, kept = hist.CENTRES[lo:hi + 1], finite[lo:hi + 1]
    writer.add_histogram_raw(
        tag, min=float(hist.EDGES[lo]), max=float(hist.EDGES[hi + 1]), num=float(kept.sum()),
        sum=float((kept * centres).sum()), sum_squares=float((kept * centres**2).sum()),
        bucket_limits=hist.EDGES[lo + 1:hi + 2].tolist(), bucket_counts=kept.tolist(), global_step=int(step))
