"""The report as one self-contained HTML file: inline SVG plots drawn by matplotlib, no network, no script.

Plots: the global norm over the steps on a log axis with the advised threshold and the steps it would
clip; a layers x steps heatmap of the gradient norm, worst layers first; the |g| histograms of the worst
layers, with a value threshold where one is advised; the run's own clipping (pre- and post-clip norm,
and its clip rate over the run) where gradscope was told of it; when a gradient went non-finite, the worst layers'
norms over the steps just before it; the trials' loss curves when trials ran. Then the
findings, grouped by rule, and the advice with its snippets.

matplotlib is an optional extra (``pip install gradscope[html]``) and is imported only when a report is
drawn, so ``import gradscope`` stays light. Each plotted element carries an SVG id (``global-norm``,
``threshold``, ``clipped``, ``heatmap``, ``histogram-N``, ``before-nonfinite-N``, ``pre-clip-norm``,
``post-clip-norm``, ``clip-threshold``, ``clip-rate``, ``trial-N``) so tests and tools can find it.
"""
from __future__ import annotations

import html
import io
import math
from typing import List, Sequence

import numpy as np

from ..analyse import histogram as hist
from ..errors import GradscopeError
from ..analyse.evaluate import Finding
from ..advise.judge import TrialSet
from .render import MARK, grouped, ordered_layers
from ..report import Report
from ..analyse.clipping import rate_windows
from .wording import advice, cause_line, clip_summary, fmt, plural, say, schedule_caveat

HEATMAP_LAYERS = 40  # rows of the heatmap: the worst layers
HISTOGRAM_LAYERS = 4  # the worst layers whose |g| histogram is drawn
BLACK_BOX_LAYERS = 6  # layers drawn over the steps before the first non-finite gradient
TAIL = 1e-4  # a histogram's x axis starts where this share of the smallest |g| is left out
COLOURS = {"error": "#c62828", "warning": "#b26a00", "info": "#1565c0"}
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1000px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
.meta { color: #666; } .verdict { font-size: 1.15em; font-weight: 600; padding: 0.5em 0.8em; border-radius: 6px; }
.error { color: #c62828; } .warning { color: #b26a00; } .info { color: #1565c0; } .ok { color: #2e7d32; }
.verdict.error { background: #fdecea; } .verdict.warning { background: #fff4e5; } .verdict.ok { background: #edf7ed; }
ul.findings { list-style: none; padding-left: 0; } ul.findings li { margin: 0.5em 0; }
.layers { color: #555; } pre { background: #f6f8fa; padding: 0.7em; border-radius: 6px; overflow-x: auto; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; text-align: right; }
th { border-bottom: 1px solid #ccc; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
figure svg { max-width: 100%; height: auto; }
.scroll { overflow-x: auto; } body { overflow-wrap: anywhere; }
"""


def to_html(report: Report) -> str:
    """The whole report as one HTML document."""
    mpl = matplotlib_parts()
    rec = report.recommendation
    m = report.statistics.model
    state = "ok" if report.worst_severity in (None, "info") else report.worst_severity
    words = {"ok": "healthy", "warning": "at risk", "error": "unhealthy"}[state]
    parts = [f"<h1>gradscope: {_e(report.model)}</h1>",
             f"<p class=meta>{plural(m.steps, 'step')} on {_e(m.device)}"
             + (f" · seed {report.seed}" if report.seed is not None else "") + f" · measured: {_e(m.measurement)}</p>",
             f"<p class='verdict {state}'>{words}: {_e(advice(rec))}</p>"]
    if report.extended:
        parts.append(f"<p class=meta>The profile went on: {_e(say(report.extended))}.</p>")
    caveat = schedule_caveat(report.schedule)
    if caveat:
        parts.append(f"<p class=warning>{_e(caveat[0].upper() + caveat[1:])}.</p>")
    if report.partial:
        parts.append(f"<p class=warning><b>Partial report:</b> {_e(report.stopped_reason or '')}</p>")
    parts += ["<h2>Global gradient norm</h2>", _figure(mpl, _norm_plot, report, _norm_caption(report))]
    if m.clip is not None and len(m.clip.blocks):
        parts += ["<h2>Your clipping</h2>", f"<p>{_e(clip_summary(m.clip, m.metrics))}.</p>",
                  _figure(mpl, _clipping_plot, report,
                          "Top: the global norm before and after your clipping"
                          + (", and its threshold" if m.clip.spec.method == "norm" else "")
                          + ". Bottom: the share of steps it acted on, window by window over the run.")]
    if report.statistics.active_layers:
        parts += ["<h2>Layers</h2>", _figure(mpl, _heatmap, report,
                                             "Gradient norm per layer and step (log colour scale); worst layers "
                                             "on top, by worst finding, then share of the global norm.")]
        parts.append(_figure(mpl, _histograms, report,
                             "|g| histograms of the worst layers, pooled over the steps."
                             + (" The dashed line is the advised value threshold." if rec.method == "value" else "")))
    if m.before_nonfinite is not None and len(m.before_nonfinite["steps"]):
        box = m.before_nonfinite
        parts += ["<h2>Before the first non-finite gradient</h2>",
                  _figure(mpl, _before_nonfinite_plot, report,
                          f"Gradient norm of the layers that went non-finite, or grew the most, over the last "
                          f"{plural(len(box['steps']), 'step')} up to step {int(box['steps'][-1])}, where the "
                          f"{'gradient' if m.first_nonfinite else 'global norm'} first went non-finite"
                          + (f" (first in backward order: {m.first_nonfinite[1]})" if m.first_nonfinite else "")
                          + ". Crosses mark a layer's non-finite step; every layer's figures are in the JSON.")]
    parts += ["<h2>Findings</h2>", _findings(report.findings, report)]
    if report.cause is not None:
        parts.append(f"<p><b>Likely cause: {_e(cause_line(report.cause))}</b>.</p>")
    if m.spikes:
        parts += ["<h2>Spikes taken apart</h2>", _spikes_table(m.spikes)]
    if m.optimizer is not None:
        parts += ["<h2>Optimizer state per layer</h2>", _optimizer_table(report)]
    if rec.evidence.trials is not None:
        parts += ["<h2>Trials</h2>", _figure(mpl, _trials_plot, report, _trials_caption(rec.evidence.trials)),
                  _trials_table(rec.evidence.trials)]
    parts += ["<h2>Recommendation</h2>", f"<p><b>{_e(advice(rec))}</b>. {_e(say(rec.evidence.basis))}.</p>"]
    if rec.guard is not None:
        parts.append(f"<p>The skip-step guard ({_e(', '.join(rec.guard.reasons))}): {_e(say(rec.guard.basis))}.</p>")
    if rec.snippets:
        parts.append("<pre>" + _e("\n".join(f"# {name}\n{code}" for name, code in rec.snippets.items())) + "</pre>")
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>gradscope: {_e(report.model)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# -- plots ----------------------------------------------------------------------------------------------
def _norm_plot(fig, report: Report) -> None:
    m, rec = report.statistics.model, report.recommendation
    ax = fig.add_subplot()
    steps, norms = m.series_steps, np.asarray(m.global_norm, dtype=np.float64)
    ok = np.isfinite(norms) & (norms > 0)
    ax.plot(steps[ok], norms[ok], color="#1565c0", marker="o", markersize=3, linewidth=1.2, gid="global-norm",
            label="global norm (pre-clip)")
    line = rec.threshold if rec.method == "norm" else rec.evidence.safety_net if rec.method == "none" else None
    if line is not None and math.isfinite(line):
        label = f"clip at {fmt(line)}" if rec.method == "norm" else f"safety net {fmt(line)}"
        ax.axhline(line, color="#c62828" if rec.method == "norm" else "#888", linestyle="--", linewidth=1.2,
                   gid="threshold", label=label)
        over = ok & (norms > line)
        if over.any():
            ax.plot(steps[over], norms[over], linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                    markeredgecolor="#c62828", gid="clipped", label=f"would clip ({int(over.sum())} steps)")
    bad = ~np.isfinite(norms)
    if bad.any():
        for step in steps[bad]:
            ax.axvline(step, color="#c62828", alpha=0.25, linewidth=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient norm")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)


def _heatmap(fig, report: Report) -> None:
    layers = [layer for layer in ordered_layers(report) if layer.status == "active"][:HEATMAP_LAYERS]
    grid = np.array([np.asarray(layer.norm_series, dtype=np.float64) for layer in layers])
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(np.isfinite(grid) & (grid > 0), np.log10(grid), np.nan)
    fig.set_size_inches(9, max(2.0, 0.22 * len(layers) + 1.0))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(logs), aspect="auto", interpolation="nearest", cmap="magma",
                      extent=(-0.5, grid.shape[1] - 0.5, len(layers) - 0.5, -0.5))
    image.set_gid("heatmap")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([layer.name for layer in layers], fontsize=7)
    ax.set_xlabel("step (as recorded)")
    fig.colorbar(image, ax=ax, label="log10 gradient norm", pad=0.01)


def _histograms(fig, report: Report) -> None:
    layers = [layer for layer in ordered_layers(report) if layer.status == "active" and layer.histogram is not None]
    layers = layers[:HISTOGRAM_LAYERS]
    rec = report.recommendation
    fig.set_size_inches(9, 2.4)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(1, max(len(layers), 1), i + 1)
        counts = hist.finite(np.asarray(layer.histogram, dtype=np.float64))
        octaves = counts.reshape(-1, 8).sum(1)  # 8 bins per octave, aligned with the float exponent
        octaves[0] = 0  # exact zeros (and denormals) have no place on a log axis
        share = np.cumsum(octaves) / max(octaves.sum(), 1.0)
        used = np.nonzero((share > TAIL) & (octaves > 0))[0]  # drop the far-left octaves that hold almost nothing
        if len(used):
            a, b = used[0], np.nonzero(octaves)[0][-1] + 1  # the right tail, where clipping acts, is kept whole
            edges = hist.EDGES[8 * a: 8 * b + 1: 8].copy()
            edges[~np.isfinite(edges)] = 2 * hist.EDGES[-2]  # the last octave's upper edge is inf
            ax.stairs(octaves[a:b], edges, fill=True, color="#1565c0", alpha=0.7,
                      gid=f"histogram-{i}")
            ax.set_xscale("log")
        if rec.method == "value" and rec.threshold:
            ax.axvline(rec.threshold, color="#c62828", linestyle="--", gid=f"value-threshold-{i}")
        ax.set_title(layer.name if len(layer.name) <= 28 else "…" + layer.name[-27:], fontsize=8)
        ax.set_xlabel("|g|", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])


def _clipping_plot(fig, report: Report) -> None:
    """The run's own clipping: pre- and post-clip global norm over the steps, and the clip rate per window."""
    m = report.statistics.model
    record = m.clip
    fig.set_size_inches(9, 4.2)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    steps = m.series_steps
    pre, post = np.asarray(m.global_norm, dtype=np.float64), np.asarray(m.post_clip_norm, dtype=np.float64)
    ok = np.isfinite(pre) & (pre > 0)
    top.plot(steps[ok], pre[ok], color="#1565c0", linewidth=1.0, gid="pre-clip-norm", label="pre-clip norm")
    if len(post) == len(steps):
        good = np.isfinite(post) & (post > 0)
        top.plot(steps[good], post[good], color="#2e7d32", linewidth=1.2, gid="post-clip-norm", label="post-clip norm")
    if record.spec.method == "norm":
        top.axhline(record.spec.threshold, color="#c62828", linestyle="--", linewidth=1.0, gid="clip-threshold",
                    label=f"threshold {fmt(record.spec.threshold)}")
    top.set_yscale("log")
    top.set_ylabel("global norm")
    top.grid(True, which="major", alpha=0.3)
    top.legend(loc="best", fontsize=8, frameon=False)
    first, width, rate = rate_windows(record)
    bottom.bar(first, rate, width=width, align="edge", color="#b26a00", alpha=0.8, gid="clip-rate")
    bottom.set_ylim(0, 1.05)
    bottom.set_ylabel("clip rate")
    bottom.set_xlabel("step")
    bottom.grid(True, axis="y", alpha=0.3)


def _before_nonfinite_plot(fig, report: Report) -> None:
    """The black box: per-layer norms over the kept steps; the layers that went non-finite first, then the
    ones whose norm grew the most from the first kept step to its largest."""
    box = report.statistics.model.before_nonfinite
    steps, norms, bad = box["steps"], np.asarray(box["grad_norm"], dtype=np.float64), box["nonfinite"][-1] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        finite = np.where(np.isfinite(norms) & (norms > 0), norms, np.nan)
        growth = np.nan_to_num(np.nanmax(finite, axis=0) / finite[0], nan=0.0) if len(finite) else np.zeros(len(bad))
    order = sorted(range(len(box["layers"])), key=lambda k: (not bad[k], -growth[k]))[:BLACK_BOX_LAYERS]
    ax = fig.add_subplot()
    for n, (k, colour) in enumerate(zip(order, _palette(len(order)))):
        ok = np.isfinite(finite[:, k])
        ax.plot(steps[ok], finite[ok, k], color=colour, marker="o", markersize=3, linewidth=1.2,
                gid=f"before-nonfinite-{n}", label=box["layers"][k] + (" (non-finite)" if bad[k] else ""))
        gone = box["nonfinite"][:, k] > 0
        if gone.any():
            last = np.nanmax(finite[:, k]) if ok.any() else 1.0
            ax.plot(steps[gone], np.full(int(gone.sum()), last), linestyle="none", marker="x", markersize=8,
                    color=colour)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("layer gradient norm")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)


def _trials_plot(fig, report: Report) -> None:
    trials = report.recommendation.evidence.trials
    ax = fig.add_subplot()
    runs = [trials.reference, *trials.trials]
    colours = _palette(len(runs))
    for i, (t, colour) in enumerate(zip(runs, colours)):
        losses = np.asarray(t.losses, dtype=np.float64)
        name = "none" if math.isinf(t.threshold) else fmt(t.threshold)
        winner = t.threshold == trials.winner
        ax.plot(np.arange(len(losses)), losses, color="#2e7d32" if winner else colour,
                linewidth=2.4 if winner else 1.0, linestyle="-" if t.stable else ":", gid=f"trial-{i}",
                label=f"clip {name}: held-out {fmt(t.held_out)}" + (" (winner)" if winner else "")
                + ("" if t.stable else " (unstable)"))
    ax.axhline(trials.start_held_out, color="#888", linewidth=0.8, linestyle="--", label="held-out at the start")
    finite = np.concatenate([np.asarray(t.losses, dtype=np.float64) for t in runs])
    finite = finite[np.isfinite(finite) & (finite > 0)]
    if len(finite) and finite.max() / max(finite.min(), 1e-300) > 30:
        ax.set_yscale("log")
    ax.set_xlabel("trial step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=7, frameon=False)


# -- text -----------------------------------------------------------------------------------------------
def _findings(findings: Sequence[Finding], report: Report) -> str:
    if not findings:
        return "<p class=ok>No findings.</p>"
    items = []
    for severity, rule_id, group in grouped(findings, ordered_layers(report)):
        where = ""
        if len(group) > 1:
            where = (f" in {plural(len(group), 'layer')}: <span class=layers>"
                     + _e(", ".join(f.layer or "(model)" for f in group)) + "</span>")
        items.append(f"<li><span class={severity}>{MARK[severity]} {severity}</span> <b>{_e(rule_id)}</b>{where}"
                     f"<br>{'worst: ' if len(group) > 1 else ''}{_e(group[0].message)}</li>")
    return "<ul class=findings>" + "".join(items) + "</ul>"


def _spikes_table(spikes) -> str:
    """One row per spike taken apart: its step, norm and z, and the samples that carry it, largest first."""
    rows = []
    for spike in spikes:
        named = "; ".join(f"#{s.index}: {fmt(s.share * 100) + '%' if s.share == s.share else 'non-finite'} "
                          f"(loss {fmt(s.loss)})" for s in spike.samples[:4]) or _e(spike.error or "")
        rows.append(f"<tr><td>{spike.step}</td><td>{_e(spike.why)}</td><td>{fmt(spike.global_norm)}</td>"
                    f"<td>{fmt(spike.z)}</td><td>{spike.batch_size}</td><td>{_e(named)}</td></tr>")
    return ("<div class=scroll><table><tr><th>step</th><th>why</th><th>global norm</th><th>z</th><th>batch</th>"
            "<th>samples, by share of the batch gradient's squared norm</th></tr>" + "".join(rows) + "</table></div>")


def _optimizer_table(report: Report, most: int = 12) -> str:
    """Per layer, worst first: the update's RMS, and Adam's eps-dominated and outlier shares."""
    cells = []
    for layer in ordered_layers(report)[:most]:
        mm = layer.metrics
        cells.append(f"<tr><td>{_e(layer.name)}</td><td>{fmt(mm.get('update_rms_median', float('nan')))}</td>"
                     f"<td>{fmt(mm.get('adam_eps_dominated_share', float('nan')))}</td>"
                     f"<td>{fmt(mm.get('adam_outlier_share', float('nan')))}</td></tr>")
    return ("<div class=scroll><table><tr><th>layer</th><th>update RMS</th><th>share with sqrt(v&#770;) &lt; eps</th>"
            "<th>share of |g| &gt; 6 sqrt(v&#770;)</th></tr>" + "".join(cells) + "</table></div>")


def _trials_table(trials: TrialSet) -> str:
    rows = ["<tr><th>clip at</th><th>steps</th><th>held-out loss at each rung</th><th>clipped</th>"
            "<th>verdict</th></tr>"]
    for t in (trials.reference, *trials.trials):
        verdict = "winner" if t.threshold == trials.winner else ("stable" if t.stable else _e(t.unstable))
        rungs = ", ".join(f"{fmt(c.held_out)} at {c.steps}" for c in t.checkpoints) or fmt(t.held_out)
        rows.append(f"<tr><td>{'none' if math.isinf(t.threshold) else fmt(t.threshold)}</td><td>{len(t.losses)}</td>"
                    f"<td>{rungs}</td><td>{t.clip_fraction:.0%}</td><td>{verdict}</td></tr>")
    stopped = f"<p>The trials stopped: {_e(say(trials.stopped))}.</p>" if trials.stopped else ""
    return "<div class=scroll><table>" + "".join(rows) + "</table></div>" + stopped


def _norm_caption(report: Report) -> str:
    rec = report.recommendation
    if rec.method == "norm":
        return (f"The dashed line is the advised threshold, {fmt(rec.threshold)}; circled steps are the ones it "
                "would have clipped.")
    if rec.method == "none" and rec.evidence.safety_net:
        return f"No clipping is advised; the grey line is the stated safety net, {fmt(rec.evidence.safety_net)}."
    return "The advice is not a global-norm threshold, so no line is drawn."


def _trials_caption(trials: TrialSet) -> str:
    reach = (f"; the contenders went on, the horizon doubling, to {trials.longest}" if trials.longest > trials.steps
             else "")
    return (f"Every trial trains {trials.steps} steps from the same start{reach} ({trials.spent} steps in all) and is "
            f"judged on held-out batches; dotted curves went unstable. The winner: "
            f"{'none' if trials.winner is None else fmt(trials.winner)}.")


# -- plumbing -------------------------------------------------------------------------------------------
def matplotlib_parts():
    """matplotlib's pyplot-free pieces: a Figure and the SVG canvas (no global backend is touched)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_svg import FigureCanvasSVG
        from matplotlib.figure import Figure
    except ImportError:
        raise GradscopeError("the HTML report draws its plots with matplotlib, which is not installed",
                             "pip install 'gradscope[html]'") from None
    return matplotlib, Figure, FigureCanvasSVG


def _figure(mpl, draw, report: Report, caption: str) -> str:
    matplotlib, Figure, FigureCanvasSVG = mpl
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "gradscope", "font.size": 9}):
        fig = Figure(figsize=(9, 3.2))
        draw(fig, report)
        fig.tight_layout()
        buffer = io.StringIO()
        FigureCanvasSVG(fig).print_svg(buffer, metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: the SVG sits inline in HTML
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


def _palette(n: int) -> List[str]:
    base = ["#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#ad1457", "#283593", "#827717", "#37474f", "#c62828"]
    return [base[i % len(base)] for i in range(n)]


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)

